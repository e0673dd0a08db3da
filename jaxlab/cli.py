"""`jaxlab train|eval|sample`: the command line.

    jaxlab train                                   # default config (lm_char) in a fresh runs/ dir
    jaxlab train lm_char_cpu --config.data.path=input.txt --config.model.num_layers=4 --workdir runs/x
    jaxlab eval runs/x
    jaxlab sample runs/x --prompt "ROMEO:" --num-tokens 200
    jaxlab train lm_char --workdir /shared/x --coordinator host0:1234 --num-processes 2 --process-id 0

Multi-process runs: jaxlab/train/distributed.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import sys

CONFIG_HELP = ("config name ({names}) or path to a .py file with get_config(); default: %(default)s. "
               "Override any key with --config.SECTION.KEY=VALUE.")


def _quiet_logs() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  logging.getLogger("absl").setLevel(logging.ERROR)


def _fresh_workdir(config_name: str) -> pathlib.Path:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  stem = pathlib.Path(config_name).stem
  base = pathlib.Path("runs") / f"{stem}-{stamp}"
  path, i = base, 1
  while path.exists():
    path, i = pathlib.Path(f"{base}-{i}"), i + 1
  return path


def _ready_for_devices(config, args=None):
  """Chooses the CPU host device count and joins the other processes of a multi-process run (both
  before JAX starts its backend), then runs the device-dependent checks."""
  from jaxlab.configs.validate import validate_mesh
  from jaxlab.train import distributed, host_devices
  host_devices.configure(config)
  if args is not None and _multi_process(args):
    distributed.initialize(coordinator=args.coordinator, num_processes=args.num_processes,
                           process_id=args.process_id)
  validate_mesh(config)
  return config


def _multi_process(args) -> bool:
  from jaxlab.train import distributed
  return distributed.wanted(coordinator=args.coordinator, num_processes=args.num_processes,
                            process_id=args.process_id, auto=args.distributed)


def load_run_config(name_or_path: str, overrides: list[str], args=None):
  """A config to run in this process: validated, with the host's CPU devices configured (and, when
  `args` asks for it, the multi-process run joined)."""
  from jaxlab.configs import load_config
  return _ready_for_devices(load_config(name_or_path, overrides, check_devices=False), args)


def _load_workdir_config(workdir: pathlib.Path, overrides: list[str], args=None):
  from jaxlab.configs import ConfigError, apply_overrides
  from jaxlab.configs.validate import validate
  import ml_collections
  path = workdir / "config.json"
  if not path.is_file():
    raise ConfigError(f"{workdir} is not a jaxlab workdir (no config.json); train into it first")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  config.lock()
  apply_overrides(config, overrides)
  validate(config, check_devices=False)
  return _ready_for_devices(config, args)


def _restore_params(config, workdir: pathlib.Path, *, best: bool = False):
  """(run, step, params) of the newest checkpoint, or with `best` of the lowest-validation-loss one
  that a `train.keep_best` run saved in WORKDIR/best."""
  from jaxlab.train import trainer
  run = trainer.setup(config, workdir)
  if best:
    run.checkpointer.close()
    return (run, *trainer.restore_best_params(run))
  restored = run.checkpointer.restore_latest(run.abstract_state)
  run.checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"no readable checkpoint in {workdir / 'checkpoints'}")
  step, state, _ = restored
  return run, step, state["params"]


def _say(*lines) -> None:
  """Prints (process 0 only in a multi-process run)."""
  from jaxlab.train import distributed
  if distributed.is_primary():
    print(*lines, sep="\n", flush=True)


def cmd_train(args, overrides) -> int:
  if _multi_process(args) and not args.workdir:
    raise ValueError("a multi-process run needs --workdir (one directory that every process "
                     "shares), not a fresh one per process")
  config = load_run_config(args.config, overrides, args)
  from jaxlab.train import distributed, trainer
  workdir = pathlib.Path(args.workdir) if args.workdir else _fresh_workdir(args.config)
  _say(f"jaxlab: training {args.config} in {workdir}")
  result = trainer.train(config, workdir, progress=not args.no_progress)
  run = result["run"]
  _say(f"jaxlab: step {result['step']}: val_loss {result.get('val_loss', float('nan')):.4f}"
       + (f", {result['step_time_ms']:.1f} ms/step" if "step_time_ms" in result else ""))
  finish = getattr(run.task, "finish", None)
  params = result["state"]["params"]
  if finish and "best_step" in result:  # train.keep_best: report on the model selected on validation
    try:
      _, params = trainer.restore_best_params(run)
      _say(f"jaxlab: best validation loss {result['best_val_loss']:.4f} at step "
           f"{result['best_step']}; reporting those parameters")
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
  config = _load_workdir_config(workdir, overrides, args)
  run, step, params = _restore_params(config, workdir, best=args.best)
  val_loss = trainer.evaluate(run, params)
  _say(json.dumps({"step": step, "val_loss": val_loss}))
  return 0


def cmd_sample(args, overrides) -> int:
  workdir = pathlib.Path(args.workdir)
  config = _load_workdir_config(workdir, overrides, args)
  run, _, params = _restore_params(config, workdir, best=args.best)
  sample_command = getattr(run.task, "sample_command", None)
  if sample_command is None:
    raise ValueError(f"task {config.task!r} has no sampler")
  from jaxlab.train import distributed
  params = distributed.host_copy(params)  # every process; then one host samples
  if distributed.is_primary():
    print(sample_command(params, args), flush=True)
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
  sub = parser.add_subparsers(dest="command", metavar="{train,eval,sample}")
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
                      "validation loss as JSON.")
  ev.add_argument("workdir")
  ev.add_argument("--best", action="store_true", help="the lowest-validation-loss parameters "
                  "(WORKDIR/best, saved when train.keep_best) instead of the newest checkpoint")
  _add_process_options(ev)
  ev.set_defaults(func=cmd_eval)

  sa = sub.add_parser("sample", help="sample text from a trained workdir",
                      description="Restore the newest checkpoint of WORKDIR and sample text "
                      "with a KV cache (temperature, top-k, top-p).")
  sa.add_argument("workdir")
  sa.add_argument("--prompt")
  sa.add_argument("--num-tokens", type=int)
  sa.add_argument("--temperature", type=float)
  sa.add_argument("--top-k", type=int)
  sa.add_argument("--top-p", type=float)
  sa.add_argument("--seed", type=int)
  sa.add_argument("--best", action="store_true", help="sample from WORKDIR/best (train.keep_best)")
  _add_process_options(sa)
  sa.set_defaults(func=cmd_sample)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  parser = build_parser()
  args = parser.parse_args(rest)
  _quiet_logs()
  from jaxlab.configs import ConfigError
  try:
    return args.func(args, overrides)
  except ConfigError as e:
    print(f"jaxlab: config error: {e}", file=sys.stderr)
    return 2
  except (FileNotFoundError, ValueError, RuntimeError, FloatingPointError) as e:
    print(f"jaxlab: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
