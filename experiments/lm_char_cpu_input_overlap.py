"""Where `lm_char_cpu`'s input pipeline sits in the step time: three train-loop orders, timed in one
process in alternating blocks, so that a noisy VM slows all three alike.

    python experiments/lm_char_cpu_input_overlap.py --data ../shared/data/tinyshakespeare/input.txt \
        [--rounds 18] [--block 40] [--override=--config.mesh.cpu_devices=1 ...]

- `fetch, step; grain threads`: read a batch, run the step, wait; grain's default reading (16 threads
  keeping 500 batches ready), as the train loop did before 2026-12-03.
- `fetch, step; in thread`: the same order; each batch read in the calling thread when asked for.
- `step, fetch next; in thread`: what `jaxlab.train.trainer.train` does now: dispatch the step, read
  and place the next batch while it computes, then wait for the loss.

Each round runs one block of `--block` steps per variant (the order rotates), the train state carried
on; a block's figure is its median step time. Writes experiments/results/lm_char_cpu_input_overlap.md
(and .json): the median over rounds and the median per-round difference from the old loop.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"


def timed_blocks(rounds: int, block: int, data: str,
                 overrides: list[str] = ()) -> tuple[dict[str, list[float]], int]:
  """({variant: [median ms/step of its block in each round]}, devices in the mesh)."""
  from jaxlab.cli import load_run_config  # as `jaxlab train` does: one CPU device per core
  config = load_run_config("lm_char_cpu", [f"--config.data.path={data}",
                                           "--config.train.tensorboard=False", *overrides])
  import grain
  import jax
  from jaxlab.data import pipeline
  from jaxlab.train import trainer

  with tempfile.TemporaryDirectory() as workdir:  # setup wants one; nothing is saved
    run = trainer.setup(config, workdir)
    run.checkpointer.close()
  task = run.task

  in_thread = task.train_iterator()  # as the trainer reads
  threaded = pipeline.train_batches(task.corpus.train, seq_len=task.seq_len,
                                    batch_size=task.batch_size, seed=config.seed,
                                    read_options=grain.ReadOptions())  # grain's default
  train_step = trainer.make_train_step(run)

  def fetch_then_step(data_iter):
    def loop(state, n):
      times = []
      for _ in range(n):
        t0 = time.perf_counter()
        state, metrics = train_step(state, run.place_batch(next(data_iter)))
        float(metrics["loss"])
        times.append(time.perf_counter() - t0)
      return state, times
    return loop

  def step_then_fetch(state, n):
    times = []
    batch = run.place_batch(next(in_thread))
    for _ in range(n):
      t0 = time.perf_counter()
      state, metrics = train_step(state, batch)
      batch = run.place_batch(next(in_thread))
      float(metrics["loss"])
      times.append(time.perf_counter() - t0)
    return state, times

  variants = [("fetch, step; grain threads", fetch_then_step(threaded)),
              ("fetch, step; in thread", fetch_then_step(in_thread)),
              ("step, fetch next; in thread", step_then_fetch)]
  results = {name: [] for name, _ in variants}
  with run.mesh, run.rules():
    state = trainer.init_state(run)
    for _, loop in variants:  # compile, and let grain's threads fill their buffer
      state, _ = loop(state, 5)
    for r in range(rounds):
      for name, loop in variants[r % 3:] + variants[:r % 3]:
        state, times = loop(state, block)
        results[name].append(1000 * statistics.median(times))
  jax.block_until_ready(state)
  return results, run.mesh.size


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, help="tiny shakespeare input.txt")
  parser.add_argument("--rounds", type=int, default=18)
  parser.add_argument("--block", type=int, default=40, help="steps per variant per round")
  parser.add_argument("--override", action="append", default=[],
                      help="a jaxlab config override (repeatable), e.g. "
                           "--override=--config.mesh.cpu_devices=1")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  command = shlex.join(["python", "experiments/lm_char_cpu_input_overlap.py", *argv])
  from jaxlab.train.host_devices import cpu_model
  results, devices = timed_blocks(args.rounds, args.block, args.data, args.override)
  baseline = results["fetch, step; grain threads"]
  lines = [f"# lm_char_cpu: input pipeline and the step time ({cpu_model()}, {devices} XLA CPU devices)", "",
           f"`{command}`: {args.rounds} rounds of one {args.block}-step block per "
           "variant, in rotating order, in one process.", "",
           "| loop | median ms/step (median over rounds) | faster than the old loop, ms/step "
           "(median per-round difference) | rounds faster |", "| --- | --- | --- | --- |"]
  for name, values in results.items():
    diffs = [b - v for b, v in zip(baseline, values)]
    lines.append(f"| {name} | {statistics.median(values):.1f} | "
                 f"{statistics.median(diffs):+.2f} | {sum(d > 0 for d in diffs)}/{len(diffs)} |")
  lines += ["", "Per-round block medians (ms/step):", ""]
  lines += [f"- {name}: " + ", ".join(f"{v:.1f}" for v in values) for name, values in results.items()]
  text = "\n".join(lines) + "\n"
  print(text)
  args.out.mkdir(parents=True, exist_ok=True)
  from jaxlab import experiment_results
  experiment_results.write(args.out, "lm_char_cpu_input_overlap", text, {
      "device": cpu_model(), "command": command, "xla_devices": devices, "rounds": args.rounds,
      "block": args.block, "overrides": args.override, "ms_per_step": results})


if __name__ == "__main__":
  main()
