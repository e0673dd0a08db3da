"""`jaxlab bench CONFIG`: how fast a config's train step runs on this machine, and how much memory it
needs, without training it.

The run is built exactly as `jaxlab train` builds it (mesh, sharded initialisation, the same jitted
step), in a temporary workdir that is removed afterwards. The step is compiled ahead of time (timed
apart), then run `steps` times, each batch read and placed on the devices before its step starts
(one batch at a time: `--steps` of any size holds one on the host), so the step time excludes data
loading (timed apart too: reading and placing one batch). Memory is XLA's compile-time estimate for the step
(the train state it holds, and its temporaries), and on GPU/TPU the device's peak in use as well.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import numpy as np

from jaxlab.train import trainer
from jaxlab.train.host_devices import cpu_model


def _percentile(values: list[float], q: float) -> float:
  return float(np.percentile(np.asarray(values), q))


def benchmark(config, *, steps: int = 20, warmup: int = 2) -> dict:
  """Times `steps` train steps of `config` (after `warmup` untimed ones) -> a dict of results.

  Keys: device, devices, mesh, parameters, compile_s, step_ms (median), step_ms_p10,
  step_ms_p90, batch_ms (median time to read and place one batch), tokens_per_sec (the task's
  tokens, or examples, per second at the median step), final_loss, arguments_mib (the train state and
  a batch) and temp_mib (XLA's estimate for the compiled step, per device), and peak_mib where the
  device reports it (GPU, TPU).
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"bench needs steps >= 1 and warmup >= 0 (got steps={steps}, warmup={warmup})")
  with tempfile.TemporaryDirectory(prefix="jaxlab-bench-") as workdir:
    run = trainer.setup(config, workdir)
    try:
      return _time_run(run, steps, warmup)
    finally:
      run.checkpointer.close()


def _time_run(run, steps: int, warmup: int) -> dict:
  data_iter = run.task.train_iterator()
  state = trainer.init_state(run)
  parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  train_step = trainer.make_train_step(run)
  with run.mesh, run.rules():
    t0 = time.perf_counter()
    batch = jax.block_until_ready(run.place_batch(next(data_iter)))
    first_batch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    batch_times, step_times = [first_batch_s], []
    for i in range(warmup + steps):
      if i:  # read + placed on the devices, before the step's clock starts
        t0 = time.perf_counter()
        batch = jax.block_until_ready(run.place_batch(next(data_iter)))
        batch_times.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics["loss"])
      if i >= warmup:
        step_times.append(time.perf_counter() - t0)
  median = statistics.median(step_times)
  device = jax.devices()[0]
  result = {
      "device": cpu_model() if device.platform == "cpu" else f"{device.platform}: {device.device_kind}",
      "devices": jax.device_count(),
      "mesh": dict(run.mesh.shape),
      "parameters": parameters,
      "compile_s": compile_s,
      "step_ms": 1000 * median,
      "step_ms_p10": 1000 * _percentile(step_times, 10),
      "step_ms_p90": 1000 * _percentile(step_times, 90),
      "batch_ms": 1000 * statistics.median(batch_times),
      "tokens_per_sec": run.task.tokens_per_batch / median,
      "final_loss": float(metrics["loss"]),
  }
  memory = compiled.memory_analysis()
  if memory is not None:
    result["arguments_mib"] = memory.argument_size_in_bytes / 2**20
    result["temp_mib"] = memory.temp_size_in_bytes / 2**20
  stats = getattr(device, "memory_stats", lambda: None)()
  if stats and "peak_bytes_in_use" in stats:
    result["peak_mib"] = stats["peak_bytes_in_use"] / 2**20
  return result


def format_table(name: str, result: dict) -> str:
  """The result of `benchmark` for config `name` as the lines `jaxlab bench` prints."""
  mesh = " ".join(f"{k}={v}" for k, v in result["mesh"].items())
  lines = [
      f"jaxlab bench: {name} on {result['devices']} devices, {result['device']} ({mesh})",
      f"  parameters      {result['parameters']:,}",
      f"  compile         {result['compile_s']:.2f} s",
      f"  step            {result['step_ms']:.2f} ms median (p10 {result['step_ms_p10']:.2f}, "
      f"p90 {result['step_ms_p90']:.2f}; data loading excluded)",
      f"  batch read      {result['batch_ms']:.2f} ms median",
      f"  throughput      {result['tokens_per_sec']:,.0f} tokens/s (examples/s for image tasks)",
  ]
  if "temp_mib" in result:
    lines.append(f"  memory          {result['arguments_mib']:.1f} MiB state and batch + "
                 f"{result['temp_mib']:.1f} MiB temporaries per device (XLA's estimate)")
  if "peak_mib" in result:
    lines.append(f"  device peak     {result['peak_mib']:.1f} MiB")
  return "\n".join(lines)
