"""On a CPU host, run one XLA device per core and let the mesh's data axis use them.

One XLA CPU device spreads each small op over all cores, and for models of the size that trains on a
CPU the synchronisation costs more than it buys; one device per core with data parallelism over the
mesh was 1.3x faster for `lm_char_cpu` on 2 cores (experiments/results/lm_char_cpu.md). The device
count must be fixed before JAX starts its CPU backend, so the command line calls `configure` first.
It has no effect on GPU/TPU backends, and none if XLA_FLAGS already sets the count.
"""

from __future__ import annotations

import os
import platform

FLAG = "--xla_force_host_platform_device_count"


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def cpu_model() -> str:
  """The CPU's model name and widest vector extension (Linux /proc/cpuinfo), else what `platform`
  knows: for result tables (VMs of one model name can differ in AVX2, which moves CPU timings)."""
  name, flags = None, set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and name is None:
          name = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
          flags = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  if name is None:
    return platform.processor() or platform.machine() or "unknown CPU"
  for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX, no AVX2")):
    if flag in flags:
      return f"{name} ({label})"
  return name


def usable_device_count(config, available: int) -> int:
  """The largest n <= available for which the config's mesh and batch split over n devices."""
  from jaxlab.train import tasks
  from jaxlab.configs.validate import train_microbatches
  from jaxlab.train.sharding import mesh_shape
  sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  micro = train_microbatches(config)
  units = tasks.task_module(config.task).tensor_units(config) or 1
  for n in range(available, 0, -1):
    try:
      data, fsdp, tensor = mesh_shape(sizes, n)
    except ValueError:
      continue
    if data * fsdp * tensor == n and config.data.batch_size % (data * fsdp * micro) == 0 \
        and units % tensor == 0:
      return n
  return 1


def configure(config) -> int:
  """Sets XLA_FLAGS for `config.mesh.cpu_devices` host devices (0 = as many as usable); returns it."""
  flags = os.environ.get("XLA_FLAGS", "")
  if FLAG in flags:
    return int(flags.split(FLAG + "=")[1].split()[0])
  n = config.mesh.cpu_devices or usable_device_count(config, cores())
  if n > 1:
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={n}".strip()
  return n
