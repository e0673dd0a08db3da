"""`jaxlab train|eval|sample|bench`: the command line.

    jaxlab train                                   # default config (lm_char) in a fresh runs/ dir
    jaxlab train lm_char_cpu --config.data.path=input.txt --config.model.num_layers=4 --workdir runs/x
    jaxlab eval runs/x
    jaxlab sample runs/x --prompt "ROMEO:" --num-tokens 200
    jaxlab bench lm_char_cpu --steps 50           # train-step time and memory, nothing trained
    jaxlab train lm_char --workdir /shared/x --coordinator host0:1234 --num-processes 2 --process-id 0

Multi-process runs: jaxlab/train/distributed.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import pathlib
import sys

CONFIG_HELP = ("config name ({names}) or path to a .py file with get_config(); default: %(default)s. "
               "Override any key with --config.SECTION.KEY=VALUE.")
OVERRIDES_EPILOG = ("Keys of the run's saved config (WORKDIR/config.json) can be overridden with "
                    "--config.SECTION.KEY=VALUE, e.g. --config.train.eval_batches=4, except those "
                    "of the sections the checkpoints depend on (task, seed, model, data, optim), "
                    "which must keep their saved values (data.batch_size may change).")


class UsageError(ValueError):
  """A bad command-line flag: one line naming it (exit status 2, like argparse's errors)."""


def _quiet_logs() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  logging.getLogger("absl").setLevel(logging.ERROR)
  # A checkpoint that fails to read leaves orbax's async readers behind; their "coroutine was never
  # awaited" / "event loop is closed" reports say nothing to a user (the one-line error does).
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  # A background save that fails (a full disk) is logged by each of orbax's threads with its
  # traceback, hundreds of lines; the checkpointer raises it as one line (CheckpointSaveError).
  logging.getLogger("absl").addFilter(_not_a_background_save_failure)


_BACKGROUND_SAVE_FAILURES = ("_SignalingThread.run() raised an exception",
                             "in background save thread", "Save Finalize thread")


def _not_a_background_save_failure(record: logging.LogRecord) -> bool:
  """A logging filter: False for orbax's reports of a failed background save."""
  message = str(record.msg)
  return not ("orbax" in record.pathname and any(m in message for m in _BACKGROUND_SAVE_FAILURES))


def _drop_async_leftovers() -> None:
  """The `jaxlab` command's process only (they may also surface at exit): drops the unraisable-
  exception reports of orbax readers left behind by an unreadable checkpoint."""
  report = sys.unraisablehook

  def hook(unraisable) -> None:
    import asyncio
    if asyncio.iscoroutine(unraisable.object) or "Event loop is closed" in str(unraisable.exc_value):
      return
    report(unraisable)

  sys.unraisablehook = hook


def console_main() -> int:
  """The `jaxlab` console script."""
  _drop_async_leftovers()
  return main()


def _fresh_workdir(config_name: str) -> pathlib.Path:
  """A new runs/NAME-STAMP[-i], created here (atomically: two runs started in the same second get
  two directories); `cmd_train` removes it again if training fails before writing anything."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  stem = pathlib.Path(config_name).stem
  base = pathlib.Path("runs") / f"{stem}-{stamp}"
  path, i = base, 1
  base.parent.mkdir(parents=True, exist_ok=True)
  while True:
    try:
      path.mkdir()
      return path
    except FileExistsError:
      path, i = pathlib.Path(f"{base}-{i}"), i + 1


def _check_train_workdir(workdir: pathlib.Path) -> None:
  """Refuses to train into a directory that holds files but is no jaxlab workdir (its config.json,
  metrics.jsonl would be overwritten)."""
  if not workdir.is_dir() or not any(workdir.iterdir()):
    return
  try:
    saved = json.loads((workdir / "config.json").read_text())
    ours = isinstance(saved, dict) and "task" in saved
  except (OSError, ValueError):
    ours = False
  if not ours and not (workdir / "checkpoints").is_dir():
    raise UsageError(f"--workdir {workdir} holds files but is not a jaxlab workdir (no config.json "
                     "of a run, no checkpoints/); train into a new or empty directory")


def _ready_for_devices(config, args=None):
  """Chooses the CPU host device count and joins the other processes of a multi-process run (both
  before JAX starts its backend), then runs the device-dependent checks."""
  from jaxlab.configs.validate import validate_mesh
  from jaxlab.train import distributed, host_devices
  multi = args is not None and _multi_process(args)
  host_devices.configure(config, processes=(args.num_processes if multi else 1))
  if multi:
    distributed.initialize(coordinator=args.coordinator, num_processes=args.num_processes,
                           process_id=args.process_id)
  validate_mesh(config)
  return config


def _multi_process(args) -> bool:
  from jaxlab.train import distributed
  return distributed.wanted(coordinator=args.coordinator, num_processes=args.num_processes,
                            process_id=args.process_id, auto=args.distributed)


def load_run_config(name_or_path: str, overrides: list[str], args=None, *, resuming: bool = False):
  """A config to run in this process: validated (as a new run's unless `resuming` a run with
  checkpoints), with the host's CPU devices configured (and, when `args` asks for it, the
  multi-process run joined)."""
  from jaxlab.configs import load_config
  return _ready_for_devices(load_config(name_or_path, overrides, check_devices=False,
                                        new_run=not resuming), args)


def _has_checkpoints(workdir: pathlib.Path) -> bool:
  """Whether `jaxlab train` into `workdir` resumes: it holds a checkpoint (the resume then requires
  the saved model section, so a setting an older jaxlab allowed there is the run's own)."""
  checkpoints = workdir / "checkpoints"
  return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


def _check_workdir(workdir: pathlib.Path, flag: str) -> None:
  """A run directory: refuses a path that is (or lies under) an existing non-directory."""
  for path in (workdir, *workdir.parents):
    if path.exists() or path.is_symlink():
      if not path.is_dir():
        where = "is" if path == workdir else f"lies under {path}, which is"
        raise UsageError(f"{flag} {workdir} {where} a file, not a directory")
      return


def _saved_config_dict(workdir: pathlib.Path) -> tuple[dict, str | None]:
  """(WORKDIR/config.json as a dict, a note or None): keys that a workdir written by an older jaxlab
  lacks are filled from today's defaults for its task, and the note says which (and which keys it
  holds that nothing reads); a section that is not an object is a ConfigError naming it."""
  from jaxlab.configs import ConfigError, read_config_json, read_saved_config
  path = workdir / "config.json"
  if not path.is_file():
    raise ConfigError(f"{workdir} is not a jaxlab workdir (no config.json); train into it first")
  # No task, or an unknown one: validate() names it. A wrong type ("2.0" for a float) failed later
  # as "'>' not supported ...", naming no key; read_saved_config names it.
  merged, filled, unknown = read_saved_config(read_config_json(path), str(path))
  notes = []
  if unknown:
    notes.append(f"jaxlab: {path} has keys this jaxlab does not read (a typo or an edit?), "
                 f"ignored: {', '.join(unknown)}")
  if filled:
    if len(filled) == 1:
      defaults = f"the default {next(iter(filled.values()))!r}"
    else:
      defaults = "the defaults " + ", ".join(f"{k}={v!r}" for k, v in filled.items())
    notes.append(f"jaxlab: {path} has no {', '.join(filled)} (an older jaxlab); using {defaults}")
  return merged, "\n".join(notes) or None


def _load_workdir_config(workdir: pathlib.Path, overrides: list[str], args=None, *,
                         speculative: str | None = None):
  """WORKDIR/config.json with `overrides` (and speculative decoding, asked for by the flag named
  `speculative`: `jaxlab sample --speculative` or `--draft-tree`), validated. Process 0
  says on stderr which keys an older jaxlab's config lacked (after joining a multi-process run: with
  --distributed, a process learns its id only then)."""
  from jaxlab.configs import apply_overrides
  from jaxlab.configs.validate import validate
  from jaxlab.train import distributed
  import ml_collections
  saved, note = _saved_config_dict(workdir)
  config = ml_collections.ConfigDict(saved)
  config.lock()
  if speculative:
    if "speculative" not in config.get("sample", {}):
      raise UsageError(f"{speculative}: the {config.get('task')!r} task's sampler has no "
                       "speculative decoding (language models with extra heads have)")
    overrides = [*overrides, "--config.sample.speculative=True"]
  apply_overrides(config, overrides)
  validate(config, check_devices=False)
  config = _ready_for_devices(config, args)
  if note and distributed.is_primary():
    print(note, file=sys.stderr, flush=True)
  return config


def _restore_params(run, *, best: bool = False):
  """trainer.BestRecord (step, params, covers_from) of the newest checkpoint of `run` (from
  trainer.setup; covers_from None), or with `best` the lowest-validation-loss parameters that a
  `train.keep_best` run saved in WORKDIR/best. Closes the run's checkpointer."""
  from jaxlab.train import trainer
  try:
    restored = None if best else run.checkpointer.restore_latest(run.abstract_state,
                                                                 move_aside=False)
  finally:
    run.checkpointer.close()
  if best:
    return trainer.restore_best_params(run)
  if restored is None:
    raise FileNotFoundError(f"no readable checkpoint in {run.workdir / 'checkpoints'}")
  step, state, _ = restored
  return trainer.BestRecord(step, state["params"], None)


def _say(*lines) -> None:
  """Prints (process 0 only in a multi-process run)."""
  from jaxlab.train import distributed
  if distributed.is_primary():
    print(*lines, sep="\n", flush=True)


def cmd_train(args, overrides) -> int:
  if _multi_process(args) and not args.workdir:
    raise ValueError("a multi-process run needs --workdir (one directory that every process "
                     "shares), not a fresh one per process")
  if args.workdir:
    _check_workdir(pathlib.Path(args.workdir), "--workdir")
    _check_train_workdir(pathlib.Path(args.workdir))
  config = load_run_config(args.config, overrides, args,
                           resuming=bool(args.workdir) and _has_checkpoints(pathlib.Path(args.workdir)))
  from jaxlab.train import distributed, trainer
  workdir = pathlib.Path(args.workdir) if args.workdir else _fresh_workdir(args.config)
  _say(f"jaxlab: training {args.config} in {workdir}")
  try:
    result = trainer.train(config, workdir, progress=not args.no_progress)
  except BaseException:
    if not args.workdir:
      try:
        workdir.rmdir()  # the fresh directory, if nothing was written into it
      except OSError:
        pass
    raise
  run = result["run"]
  _say(f"jaxlab: step {result['step']}: val_loss {result.get('val_loss', float('nan')):.4f}"
       + (f", {result['step_time_ms']:.1f} ms/step" if "step_time_ms" in result else ""))
  finish = getattr(run.task, "finish", None)
  params = result["state"]["params"]
  if finish and "best_step" in result:  # train.keep_best: report on the model selected on validation
    try:
      params = trainer.restore_best_params(run, training=True).params
      since = (f" (of the evaluations from step {result['best_since']} on)"
               if "best_since" in result else "")
      _say(f"jaxlab: best validation loss {result['best_val_loss']:.4f} at step "
           f"{result['best_step']}{since}; reporting those parameters")
    except FileNotFoundError as e:
      _say(f"jaxlab: {e}; reporting the final parameters")
  if finish:
    params = distributed.host_copy(params)  # every process; then the report runs on one host
    report = finish(params) if distributed.is_primary() else None
    if report:
      _say(report)
  return 0


def cmd_eval(args, overrides) -> int:
  from jaxlab.train import trainer
  workdir = pathlib.Path(args.workdir)
  _check_workdir(workdir, "WORKDIR")
  config = _load_workdir_config(workdir, overrides, args)
  _check_best_flag(args, config, workdir)
  run = trainer.setup(config, workdir, reading=True)
  step, params, covers_from = _restore_params(run, best=args.best)
  val_loss = trainer.evaluate(run, params)
  _refuse_unusable(step, val_loss, "evaluates to")
  # a best record started on a resume was chosen among the evaluations from that step on only
  _say(json.dumps({"step": step, "val_loss": val_loss,
                   **({} if covers_from is None else {"best_of_evaluations_from": covers_from})}))
  return 0


def _refuse_unusable(step: int, val_loss, what: str) -> None:
  """FloatingPointError (exit 1) when checkpoint `step`'s parameters give a non-finite validation
  loss: a run whose last update blew them up stops there and keeps that checkpoint (its steps are
  not lost), and `eval` printed NaN with exit 0 while `sample` printed samples of NaNs."""
  if val_loss is not None and not math.isfinite(val_loss):
    raise FloatingPointError(
        f"checkpoint {step} {what} a validation loss of {val_loss}: its parameters are unusable "
        "(train again into a new --workdir, e.g. with a lower config.optim.lr, or move this "
        "checkpoint aside to use an earlier one)")


def _check_best_flag(args, config, workdir: pathlib.Path) -> None:
  """--best on a run that kept no best parameters is a flag error (exit 2), before anything is built:
  the task refuses train.keep_best, or the run had it off and WORKDIR/best holds nothing (a run with
  it off moves an earlier record aside)."""
  if not getattr(args, "best", False) or config.train.keep_best:
    return
  _check_task_keeps_best(config)
  from jaxlab.train.checkpoint import best_entries
  if not best_entries(workdir):
    raise UsageError(f"--best: {workdir} kept no best parameters (it was trained with "
                     "config.train.keep_best=False); leave out --best for its newest checkpoint")


def _check_task_keeps_best(config) -> None:
  """--best on a task that refuses config.train.keep_best (the contrastive task: it has no validation
  split) is a flag error saying why, not advice to train with the setting it refuses."""
  from jaxlab.configs import ConfigError
  from jaxlab.configs.validate import validate
  keeping = config.copy_and_resolve_references()
  keeping.train.keep_best = True
  try:
    validate(keeping, check_devices=False)
  except ConfigError as e:
    if "keep_best" in str(e):
      raise UsageError(f"--best: the {config.task!r} task keeps no best parameters: {e}") from None


def _check_sample_flags(args) -> None:
  """The sampling flags, before anything is restored or compiled (None = the config's value)."""
  from jaxlab.configs import MAX_SAMPLE

  def bad(flag, value, rule):
    raise UsageError(f"{flag} {value} {rule}")
  if args.num_tokens is not None and not 0 <= args.num_tokens <= MAX_SAMPLE:
    bad("--num-tokens", args.num_tokens, f"must be in [0, {MAX_SAMPLE:,}] (one call; 2e8 aborted "
        "XLA allocating the KV cache)")
  if args.temperature is not None and not (math.isfinite(args.temperature)
                                           and args.temperature >= 0):
    bad("--temperature", args.temperature, "must be a finite number >= 0 (0 = greedy)")
  if args.top_k is not None and args.top_k < 0:
    bad("--top-k", args.top_k, "must be >= 0 (0 = off)")
  if args.top_p is not None and not 0 < args.top_p <= 1:
    bad("--top-p", args.top_p, "must be in (0, 1] (1 = off)")
  if args.seed is not None and not 0 <= args.seed < 2**32:
    bad("--seed", args.seed, "must be an int in [0, 2**32) (as config.sample.seed)")


def cmd_sample(args, overrides) -> int:
  _check_sample_flags(args)
  workdir = pathlib.Path(args.workdir)
  _check_workdir(workdir, "WORKDIR")
  if args.draft_tree is not None:
    overrides = [*overrides, f"--config.sample.draft_tree={args.draft_tree}"]
  config = _load_workdir_config(workdir, overrides, args,
                                speculative="--draft-tree" if args.draft_tree is not None
                                else "--speculative" if args.speculative else None)
  from jaxlab.train import tasks, trainer
  if "sample" not in config:  # a task without a sampler (contrastive) has no sample section
    raise UsageError(f"{workdir} is a {config.get('task')!r} run, which has nothing to sample "
                     "(language-model and density runs have); try `jaxlab eval`")
  if "prompt" not in config.get("sample", {}):  # not a language model: no text flags
    text_flags = [flag for flag, value in (("--prompt", args.prompt),
                                           ("--temperature", args.temperature),
                                           ("--top-k", args.top_k), ("--top-p", args.top_p),
                                           ("--stop", args.stop))
                  if value is not None]
    if text_flags:
      raise UsageError(f"{text_flags[0]} is for language-model runs; this run's task is "
                       f"{config.get('task')!r} (its sampler, if any, takes --num-tokens and --seed)")
  _check_best_flag(args, config, workdir)
  # A task that can sample from what the run saved (LM: vocab.json) needs no training data.
  build_for_sampling = getattr(tasks.task_module(config.task), "build_for_sampling", None)
  # Samples do not depend on the training data: a workdir whose data changed still samples.
  run = trainer.setup(config, workdir, check_data=False, reading=True,
                      task=build_for_sampling(config, workdir) if build_for_sampling else None)
  try:
    sample_command = getattr(run.task, "sample_command", None)
    if sample_command is None:
      raise ValueError(f"task {config.task!r} has no sampler")
    check_prompt = getattr(run.task, "check_prompt", None)
    if check_prompt is not None:  # the prompt that will be used
      try:
        if args.prompt is not None:
          check_prompt(args.prompt, "--prompt")
        else:
          check_prompt(config.sample.prompt, "config.sample.prompt (give --prompt)")
      except ValueError as e:  # a prompt the vocabulary cannot encode: a flag error (exit 2)
        raise UsageError(str(e)) from None
    check_length = getattr(run.task, "check_sample_length", None)
    if check_length is not None:  # before the parameters are read
      check_length(config.sample.prompt if args.prompt is None else args.prompt,
                   config.sample.num_tokens if args.num_tokens is None else args.num_tokens,
                   "config.sample.num_tokens" if args.num_tokens is None else "--num-tokens",
                   speculative=config.sample.speculative)
  except BaseException:
    run.checkpointer.close()
    raise
  step, params, _ = _restore_params(run, best=args.best)
  if not args.best:
    _refuse_unusable(step, trainer.logged_val_loss(workdir, step), "gave")
  from jaxlab.train import distributed
  params = distributed.host_copy(params)  # every process; then one host samples
  if distributed.is_primary():
    print(sample_command(params, args), flush=True)
  return 0


def cmd_bench(args, overrides) -> int:
  if args.steps < 1 or args.warmup < 0:
    raise UsageError(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")
  config = load_run_config(args.config, overrides)
  from jaxlab.train import bench
  result = bench.benchmark(config, steps=args.steps, warmup=args.warmup)
  print(json.dumps({"config": args.config, **result}) if args.json
        else bench.format_table(args.config, result), flush=True)
  return 0


def _add_process_options(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group(
      "multi-process runs", "Run the same command in every process (one per host, usually) with a "
      "shared --workdir; see jaxlab/train/distributed.py.")
  group.add_argument("--coordinator", metavar="HOST:PORT",
                     help="address of process 0's coordination service")
  group.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
  group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
  group.add_argument("--distributed", action="store_true",
                     help="join a multi-process run that JAX detects itself (Cloud TPU pod, SLURM, "
                     "Open MPI, Kubernetes)")


def build_parser() -> argparse.ArgumentParser:
  from jaxlab.configs import DEFAULT_CONFIG, available_configs
  parser = argparse.ArgumentParser(
      prog="jaxlab", description="Train, evaluate and sample jaxlab models.",
      epilog="Config keys are overridden with --config.SECTION.KEY=VALUE after the sub-command.")
  sub = parser.add_subparsers(dest="command", metavar="{train,eval,sample,bench}")
  sub.required = True

  train = sub.add_parser("train", help="train a config (resumes if WORKDIR has a checkpoint)",
                         description="Train a model from a config; resumes from the newest "
                         "checkpoint in --workdir. Prints progress, evaluates, saves checkpoints, "
                         "and ends by printing a sample.")
  train.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                     help=CONFIG_HELP.format(names=", ".join(available_configs())))
  train.add_argument("--workdir", help="run directory (default: a fresh one under runs/)")
  train.add_argument("--no-progress", action="store_true", help="no progress bar")
  _add_process_options(train)
  train.set_defaults(func=cmd_train)

  ev = sub.add_parser("eval", help="evaluate a trained workdir on its validation split",
                      description="Restore the newest checkpoint of WORKDIR and print its "
                      "validation loss as JSON.", epilog=OVERRIDES_EPILOG)
  ev.add_argument("workdir", metavar="WORKDIR", help="a directory that `jaxlab train` wrote")
  ev.add_argument("--best", action="store_true", help="the lowest-validation-loss parameters "
                  "(WORKDIR/best, saved when train.keep_best) instead of the newest checkpoint")
  _add_process_options(ev)
  ev.set_defaults(func=cmd_eval)

  sa = sub.add_parser("sample", help="sample text from a trained workdir",
                      description="Restore the newest checkpoint of WORKDIR and sample text "
                      "with a KV cache (temperature, top-k, top-p). Each option left out takes "
                      "the run's config.sample value (WORKDIR/config.json).",
                      epilog=OVERRIDES_EPILOG)
  sa.add_argument("workdir", metavar="WORKDIR", help="a directory that `jaxlab train` wrote")
  sa.add_argument("--prompt", help="text to continue (default: config.sample.prompt)")
  sa.add_argument("--num-tokens", type=int, metavar="N",
                  help="tokens to generate, >= 0 (default: config.sample.num_tokens; for a "
                  "density model, the number of samples, default config.sample.num)")
  sa.add_argument("--temperature", type=float, metavar="T",
                  help="softmax temperature, >= 0; 0 = greedy (default: config.sample.temperature)")
  sa.add_argument("--top-k", type=int, metavar="K",
                  help="sample among the K most likely tokens; 0 = off "
                  "(default: config.sample.top_k)")
  sa.add_argument("--top-p", type=float, metavar="P",
                  help="nucleus sampling: the smallest set of tokens with probability >= P, "
                  "0 < P <= 1; 1 = off (default: config.sample.top_p)")
  sa.add_argument("--stop", metavar="TEXT",
                  help="end the continuation just before its first TEXT (decoding stops there, "
                  "speculative decoding samples all tokens first; the text before it is the same "
                  "as without --stop; in bash, $'\\n\\n' is a blank line)")
  sa.add_argument("--seed", type=int, help="random seed (default: config.sample.seed)")
  sa.add_argument("--speculative", action="store_true",
                  help="draft with the model's extra heads (model.mtp_heads / medusa_heads) and "
                  "verify the drafts in one pass: greedy decoding's text at temperature 0 (up to "
                  "floating-point near-ties), the same distribution otherwise "
                  "(= --config.sample.speculative=True)")
  sa.add_argument("--draft-tree", metavar="W1,W2,..",
                  help="speculative decoding with a tree of drafts verified in one pass (tree "
                  "attention): W1 candidates of extra head 1, under each W2 of head 2, ... (at "
                  "temperature 0 the heads' top-ranked tokens, otherwise independent draws), or "
                  "'paths: 0 1 0,0 ..' (nodes as rank paths); implies --speculative "
                  "(= --config.sample.draft_tree=...)")
  sa.add_argument("--best", action="store_true", help="sample from WORKDIR/best (train.keep_best)")
  _add_process_options(sa)
  sa.set_defaults(func=cmd_sample)

  be = sub.add_parser("bench", help="time a config's train step on this machine (nothing is trained)",
                      description="Build a config's run as `jaxlab train` does (in a temporary "
                      "workdir, removed afterwards), compile its train step, and time STEPS steps "
                      "on batches read beforehand. Prints the compile time, the step time (median, "
                      "p10, p90; data loading timed apart), tokens/s and XLA's memory estimate.")
  be.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                  help=CONFIG_HELP.format(names=", ".join(available_configs())))
  be.add_argument("--steps", type=int, default=20, metavar="N", help="timed steps (default: 20)")
  be.add_argument("--warmup", type=int, default=2, metavar="W",
                  help="untimed steps after compilation (default: 2)")
  be.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  be.set_defaults(func=cmd_bench)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  for i, a in enumerate(argv):
    if a.startswith("--config.") and "=" not in a:  # `--config.model.width 64`
      value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "VALUE"
      print(f"jaxlab: config error: override {a} needs =VALUE ({a}={value})", file=sys.stderr)
      return 2
  parser = build_parser()
  args = parser.parse_args(rest)
  _quiet_logs()
  code = _run_command(args, overrides)
  if code:  # a process of a multi-process run leaves without JAX's shutdown (see exit_if_multi_process)
    from jaxlab.train import distributed
    distributed.exit_if_multi_process(code)
  return code


def _run_command(args, overrides) -> int:
  """The sub-command; an error is one line on stderr and a non-zero exit status."""
  from jaxlab.configs import ConfigError
  try:
    return args.func(args, overrides)
  except KeyboardInterrupt:
    print("jaxlab: interrupted; run the same command to resume from the newest checkpoint"
          if args.command == "train" else "jaxlab: interrupted", file=sys.stderr)
    return 130
  except ConfigError as e:
    print(f"jaxlab: config error: {e}", file=sys.stderr)
    return 2
  except UsageError as e:
    print(f"jaxlab: error: {e}", file=sys.stderr)
    return 2
  except (OSError, ValueError, RuntimeError, FloatingPointError) as e:
    print(f"jaxlab: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(console_main())
