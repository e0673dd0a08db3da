"""Experiment configs (one ml_collections file per experiment), command-line overrides and validation.

`load_config("lm_char_cpu", ["--config.model.num_layers=2"])` -> a locked, validated ConfigDict.
A config is named by module (`jaxlab/configs/NAME.py`) or given as a path to a .py file that defines
`get_config()`. Every mistake raises `ConfigError` with one line that names the key.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib

import ml_collections

DEFAULT_CONFIG = "lm_char"
_HERE = pathlib.Path(__file__).parent


class ConfigError(ValueError):
  """A config that cannot be run; the message names the offending key."""


def available_configs() -> list[str]:
  return sorted(p.stem for p in _HERE.glob("*.py") if not p.stem.startswith("_")
                and p.stem not in ("validate",))


def get_config(name_or_path: str) -> ml_collections.ConfigDict:
  """The (unvalidated) config named `name_or_path`."""
  path = pathlib.Path(name_or_path)
  if name_or_path.endswith(".py") or path.is_file():
    if not path.is_file():
      raise ConfigError(f"config file not found: {name_or_path}")
    spec = importlib.util.spec_from_file_location(f"jaxlab_user_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    if name_or_path not in available_configs():
      raise ConfigError(f"unknown config {name_or_path!r}; available: "
                        f"{', '.join(available_configs())} (or a path to a .py file)")
    module = importlib.import_module(f"jaxlab.configs.{name_or_path}")
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config {name_or_path!r} defines no get_config()")
  return module.get_config()


def _parse_value(text: str, current):
  """Parses an override's text into the type of the value it replaces."""
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
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
    return type(current)(value)
  if current is not None and not isinstance(value, type(current)):
    raise ValueError(f"expected {type(current).__name__}, got {text!r}")
  return value


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


def load_config(name_or_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None, *,
                check_devices: bool = True):
  """Config by name/path, with overrides applied, validated and locked.

  check_devices=False skips the checks that need JAX's devices (the mesh), so that a caller can still
  choose the host device count before JAX starts (see jaxlab.train.host_devices).
  """
  from jaxlab.configs.validate import validate
  config = get_config(name_or_path)
  config.lock()
  apply_overrides(config, overrides or [])
  validate(config, check_devices=check_devices)
  return config
