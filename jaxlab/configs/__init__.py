"""Experiment configs (one ml_collections file per experiment), command-line overrides and validation.

`load_config("lm_char_cpu", ["--config.model.num_layers=2"])` -> a locked, validated ConfigDict.
A config is named by module (`jaxlab/configs/NAME.py`) or given as a path to a .py file that defines
`get_config()`. Every mistake raises `ConfigError` with one line that names the key.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import math
import os
import pathlib

import ml_collections

DEFAULT_CONFIG = "lm_char"
_HERE = pathlib.Path(__file__).parent


# Upper bounds shared by the tasks' checks, far beyond any useful run: layers (tracing 100,000 blocks
# hung before the memory check could refuse them), Transformer widths (GPT-3's is 12,288; a width of
# 1e9 spent ~25 s computing RoPE's frequencies in NumPy before the memory check refused it) and tokens
# or samples per `jaxlab sample` call (2e8 aborted XLA allocating the KV cache).
MAX_LAYERS = 1000
MAX_WIDTH = 1 << 17
MAX_SAMPLE = 1_000_000


class ConfigError(ValueError):
  """A config that cannot be run; the message names the offending key."""


def available_configs() -> list[str]:
  return sorted(p.stem for p in _HERE.glob("*.py") if not p.stem.startswith("_")
                and p.stem not in ("validate",))


def _one_line(error: BaseException) -> str:
  """`Type: message` on one line (a SyntaxError as `SyntaxError: msg (line N)`)."""
  if isinstance(error, SyntaxError) and error.lineno is not None:
    text = f"{error.msg} (line {error.lineno})"
  else:
    text = str(error)
  text = " ".join(text.split())
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def get_config(name_or_path: str) -> ml_collections.ConfigDict:
  """The (unvalidated) config named `name_or_path`. A config file that does not import, has no
  get_config(), whose get_config() raises, or returns something other than a ConfigDict (a dict is
  converted) is a ConfigError naming the file."""
  path = pathlib.Path(name_or_path)
  if name_or_path.endswith(".py") or path.is_file():
    if not path.is_file():
      raise ConfigError(f"config file not found: {name_or_path}")
    what = f"config file {name_or_path}"
    spec = (importlib.util.spec_from_file_location(f"jaxlab_user_config_{path.stem}", path)
            if path.suffix == ".py" else None)
    if spec is None or spec.loader is None:
      raise ConfigError(f"{what}: a config file must be a .py file with get_config() (or name "
                        f"one of: {', '.join(available_configs())})")
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
    except Exception as e:  # SyntaxError, ImportError, anything the file raises at import
      raise ConfigError(f"{what}: {_one_line(e)}") from None
  else:
    if name_or_path not in available_configs():
      raise ConfigError(f"unknown config {name_or_path!r}; available: "
                        f"{', '.join(available_configs())} (or a path to a .py file)")
    what = f"config {name_or_path!r}"
    module = importlib.import_module(f"jaxlab.configs.{name_or_path}")
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{what} defines no get_config()")
  try:
    config = module.get_config()
  except Exception as e:
    raise ConfigError(f"{what}: get_config() raised {_one_line(e)}") from None
  if isinstance(config, dict) and not isinstance(config, ml_collections.ConfigDict):
    try:
      config = ml_collections.ConfigDict(config)
    except Exception as e:
      raise ConfigError(f"{what}: get_config() returned a dict that is not a valid config: "
                        f"{_one_line(e)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{what}: get_config() returned {type(config).__name__}, not an "
                      "ml_collections.ConfigDict")
  return config


def _parse_value(text: str, current):
  """Parses an override's text into the type of the value it replaces (the rule of _type_problem:
  an int stands for a float, a scalar for a one-element tuple)."""
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"expected a bool, got {text!r}")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ValueError(f"expected {type(current).__name__}, got {text!r}") from None
  if isinstance(current, (list, tuple)) and not isinstance(value, (list, tuple)):
    value = (value,)  # --config.model.hidden=500 means (500,)
  problem = _type_problem(value, current)
  if problem:
    raise ValueError(problem)
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  return type(current)(value) if isinstance(current, (list, tuple)) else value


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
  """Applies `--config.a.b=value` (or `config.a.b=value`) overrides; unknown keys are errors."""
  for item in overrides:
    body = item[2:] if item.startswith("--") else item
    if not body.startswith("config.") or "=" not in body:
      raise ConfigError(f"override {item!r} must look like --config.section.key=value")
    key, text = body[len("config."):].split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"unknown config key config.{'.'.join(parents[:i + 1])} (in {item!r})")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f"unknown config key config.{key}")
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"config.{key} is a section; override one of its keys: "
                        f"{', '.join(sorted(current.keys()))}")
    try:
      value = _parse_value(text, current)
      with node.unlocked():
        node[leaf] = value
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.{key}: {e}") from None
  return config


def read_config_json(path) -> dict:
  """A workdir's config.json as a dict; ConfigError naming the file when it is not valid JSON or
  not a JSON object."""
  path = pathlib.Path(path)
  try:
    saved = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(saved, dict):
    raise ConfigError(f"{path} holds a JSON {type(saved).__name__}, not a config object")
  return saved


def absolute_data_path(path: str, task: str | None, *, resolve_links: bool = False) -> str:
  """config.data.path made absolute against the working directory ("" stays ""; the LM's
  comma-separated files each; a URL such as gs://... is left as it is), so that a saved config reads
  the same files from anywhere. resolve_links: symlinks resolved too (to compare two paths)."""
  if not isinstance(path, str) or not path:
    return path
  parts = [p.strip() for p in path.split(",")] if task == "lm" else [path]  # "a.txt, b.txt" too
  return ",".join(_absolute(p, resolve_links) for p in parts)


def _absolute(path: str, resolve_links: bool = False) -> str:
  if not path or "://" in path:
    return path
  path = os.path.abspath(os.path.expanduser(path))
  return os.path.realpath(path) if resolve_links else path


def resolve_data_paths(config) -> None:
  """config.data.path and config.data.data_dir made absolute in place (see absolute_data_path)."""
  data = config.get("data")
  if data is None:
    return
  if "path" in data:
    data.path = absolute_data_path(data.path, config.get("task"))
  if isinstance(data.get("data_dir"), str) and data.data_dir:
    data.data_dir = _absolute(data.data_dir)


def load_config(name_or_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None, *,
                check_devices: bool = True, new_run: bool = True):
  """Config by name/path, with overrides applied, data paths made absolute (a run's saved config
  reads the same files from any working directory), validated and locked. new_run=False (resuming a
  run that has checkpoints, whose model section must then equal the saved one) skips the checks only
  a new run gets (the tasks' validate_new_run).

  check_devices=False skips the checks that need JAX's devices (the mesh), so that a caller can still
  choose the host device count before JAX starts (see jaxlab.train.host_devices).
  """
  from jaxlab.configs.validate import validate
  config = get_config(name_or_path)
  check_keys_and_types(config, f"config {name_or_path!r}")
  config.lock()
  apply_overrides(config, overrides or [])
  resolve_data_paths(config)
  try:
    validate(config, check_devices=check_devices, new_run=new_run)
  except (KeyError, AttributeError) as e:  # a config (file) without a key that the checks read
    raise ConfigError(_missing_keys_message(f"config {name_or_path!r}", config, e)) from None
  return config


def flatten(d, prefix: str = "") -> dict:
  """{"a.b": leaf} of a nested dict or ConfigDict."""
  out = {}
  for k, v in d.items():
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def base_config_for_task(task) -> tuple[str, ml_collections.ConfigDict] | None:
  """(name, config) of the first built-in config (in sorted order) whose task is `task`: today's
  defaults for that task."""
  for name in available_configs():
    config = get_config(name)
    if config.get("task") == task:
      return name, config
  return None


def with_task_defaults(saved: dict) -> tuple[dict, dict]:
  """A saved config (as a dict, e.g. WORKDIR/config.json) with the keys it lacks, added to jaxlab after
  it was written, at today's defaults for its task: (merged, {key: default filled in}). A config saved
  before loss scaling existed gets optim.loss_scale="none" (that run had none). A config without a
  known task comes back as it is."""
  found = base_config_for_task(saved.get("task"))
  if found is None:
    return saved, {}
  return _merge_with_base(saved, found[1])[:2]


def read_saved_config(saved: dict, what: str) -> tuple[dict, dict, list[str]]:
  """A saved config (a dict read from `what`, e.g. WORKDIR/config.json) against today's defaults of
  its task, in one pass: (merged as `with_task_defaults` gives it, {key: default filled in}, [keys
  today's defaults lack: typos or hand edits, which nothing reads]). A section that is not a JSON
  object ("model": null) or a value of another type than the default's ("2.0" for a float) is a
  ConfigError naming the key and `what`. A config without a known task comes back as it is."""
  found = base_config_for_task(saved.get("task"))
  if found is None:
    return saved, {}, []
  base = found[1]
  for key, value in base.items():
    if isinstance(value, ml_collections.ConfigDict) and key in saved \
        and not isinstance(saved[key], dict):
      raise ConfigError(f"{what}: {key!r} must be a section (a JSON object), got "
                        f"{json.dumps(saved[key])[:40]}")
  merged, filled, unknown = _merge_with_base(saved, base)
  _check_types_against(flatten(base), merged, what)
  return merged, filled, unknown


def _merge_with_base(saved: dict, base: ml_collections.ConfigDict) -> tuple[dict, dict, list[str]]:
  """fill_defaults of `saved` over the task's `base`, where a config saved before loss scaling
  existed gets optim.loss_scale="none" (that run had none)."""
  if isinstance(saved.get("optim"), dict) and "loss_scale" not in saved["optim"] \
      and "loss_scale" in base.optim:
    saved = {**saved, "optim": {**saved["optim"], "loss_scale": "none"}}
  return fill_defaults(saved, base.to_dict())  # keys of a user's own config are kept


def fill_defaults(saved: dict, base: dict) -> tuple[dict, dict, list[str]]:
  """`base` overwritten by `saved` (nested dicts; keys only `saved` has are kept): (merged,
  {key: default} of the keys that only `base` has, [keys that only `saved` has])."""
  merged, filled, unknown = {}, {}, []

  def walk(s, b, out, prefix):
    for k, v in b.items():
      if k not in s:
        out[k] = v
        filled.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
      elif isinstance(v, dict) and isinstance(s[k], dict):
        out[k] = {}
        walk(s[k], v, out[k], f"{prefix}{k}.")
      else:
        out[k] = s[k]
    for k, v in s.items():
      if k not in b:  # kept: a user's config file may carry keys of its own
        out[k] = v
        unknown.append(f"{prefix}{k}")

  walk(saved, base, merged, "")
  return merged, filled, unknown


def _type_problem(value, default) -> str | None:
  """Why `value` cannot stand where the task's default is `default` (None if it can), for overrides
  and config files alike: an int is a float too, a bool is no int, numbers are finite, a list or
  tuple for either, whose elements follow the rule of the default's elements when those share a
  type (ints stay ints: (64, 32.5) or (True,) is no tuple of ints)."""
  if default is None:
    return None
  if isinstance(value, float) and not math.isfinite(value):  # 1e400 parses as inf
    return f"expected a finite number, got {value!r}"
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif isinstance(default, (list, tuple)):
    if not isinstance(value, (list, tuple)):
      return f"expected {type(default).__name__}, got {value!r}"
    if any(isinstance(v, float) and not math.isfinite(v) for v in value):
      return f"expected finite numbers, got {value!r}"
    if len({type(d) for d in default}) == 1 and any(_type_problem(v, default[0]) for v in value):
      return f"expected {type(default[0]).__name__}s, got {value!r}"
    return None
  else:
    ok = isinstance(value, type(default))
  return None if ok else f"expected {type(default).__name__}, got {value!r}"


# Keys that the code reads with a default (configs written before they existed still run).
OPTIONAL_KEYS = ("optim.loss_scale", "optim.loss_scale_period", "optim.loss_scale_init",
                 "train.microbatches", "train.keep_best")


def _misspelt(key: str, known) -> str | None:
  """The known key that `key` (not known) is most likely a typo of: same section, a leaf name at
  least 80% alike (num_layer -> num_layers); None for a key that is simply a user's own."""
  import difflib
  section, _, leaf = key.rpartition(".")
  leaves = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section]
  close = difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.8)
  return f"{section}.{close[0]}" if close and section else (close[0] if close else None)


def check_keys_and_types(config, what: str) -> None:
  """A config (e.g. from a user's file, maybe written as a dict) against today's defaults of its task:
  a key that looks like a typo of one of the task's keys, a key in one of the task's sections that
  the task does not have (config.model.siglip_bias_init: it looks like a setting, and nothing would
  read it), a key the task needs (but OPTIONAL_KEYS), or a value of another type than the
  default's is a ConfigError naming the key. A file's own top-level keys and sections (notes,
  metadata: config.notes, config.meta.*) are kept, and saved with the run. A config of no known
  task is left to `validate`, which names the task."""
  found = base_config_for_task(config.get("task"))
  if found is None:
    return
  base, given = flatten(found[1]), flatten(config)
  sections = {key.split(".", 1)[0] for key in base if "." in key}
  for key in given:
    if key not in base:
      typo_of = _misspelt(key, base)
      if typo_of is not None:
        raise ConfigError(f"{what}: unknown config key config.{key} (did you mean "
                          f"config.{typo_of}?)")
      if key.split(".", 1)[0] in sections:
        raise ConfigError(f"{what}: unknown config key config.{key}: task {config.task!r} has no "
                          f"such setting, nothing would read it (its keys: "
                          f"jaxlab/configs/{found[0]}.py)")
  missing = sorted(set(base) - set(given) - set(OPTIONAL_KEYS))
  if missing:
    raise ConfigError(_lacks_keys(what, config.task, missing, found[0]))
  _check_types_against(base, config, what)


def _check_types_against(base: dict, config, what: str) -> None:
  """A value of `config` of another type than the default in `base` (flattened; keys it lacks are
  not checked) is a ConfigError naming the key and `what` (a file, say)."""
  for key, value in flatten(config).items():
    problem = _type_problem(value, base[key]) if key in base else None
    if problem:
      raise ConfigError(f"config.{key}: {problem} (in {what})")


def _missing_keys_message(what: str, config, error: BaseException) -> str:
  found = base_config_for_task(config.get("task"))
  missing = sorted(set(flatten(found[1])) - set(flatten(config))) if found else []
  if not missing:
    return f"{what}: a key is missing: {_one_line(error)}"
  return _lacks_keys(what, config.task, missing, found[0])


def _lacks_keys(what: str, task: str, missing: list[str], base_name: str) -> str:
  """One line naming (the first five of) the keys `missing` that task `task` needs."""
  shown = ", ".join(f"config.{k}" for k in missing[:5]) + (", ..." if len(missing) > 5 else "")
  return f"{what} lacks keys that task {task!r} needs: {shown} (see jaxlab/configs/{base_name}.py)"
