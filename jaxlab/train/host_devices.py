"""On a CPU host, run one XLA device per core and let the mesh's data axis use them.

One XLA CPU device spreads each small op over all cores, and for models of the size that trains on a
CPU the synchronisation costs more than it buys; one device per core with data parallelism over the
mesh was 1.3x faster for `lm_char_cpu` on 2 cores (experiments/results/lm_char_cpu.md). The device
count must be fixed before JAX starts its CPU backend, so the command line calls `configure` first.
It has no effect on GPU/TPU backends, and none if XLA_FLAGS already sets the count. In a run of P
processes (--num-processes) the mesh spans every process's devices, so the count per process is
chosen for a mesh of P times as many; with --distributed (P unknown until JAX has joined the cluster)
each process keeps one CPU device unless config.mesh.cpu_devices says otherwise.
"""

from __future__ import annotations

import os
import platform
from typing import Optional

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


def usable_device_count(config, available: int, processes: int = 1) -> int:
  """The largest n <= available for which the config's mesh and batch split over the n devices of
  each of `processes` processes (a tensor-parallel group stays inside one process)."""
  from jaxlab.train import tasks
  from jaxlab.configs.validate import train_microbatches
  from jaxlab.train.sharding import mesh_shape
  sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  micro = train_microbatches(config)
  units = tasks.task_module(config.task).tensor_units(config) or 1
  for n in range(available, 0, -1):
    total = n * processes
    try:
      data, fsdp, tensor = mesh_shape(sizes, total)
    except ValueError:
      continue
    if data * fsdp * tensor == total and config.data.batch_size % (data * fsdp * micro) == 0 \
        and units % tensor == 0 and n % tensor == 0:
      return n
  return 1


def configure(config, processes: Optional[int] = 1) -> int:
  """Sets XLA_FLAGS for `config.mesh.cpu_devices` host devices (0 = as many as usable in each of
  `processes` processes; None = a multi-process run of unknown size: 1); returns the count."""
  flags = os.environ.get("XLA_FLAGS", "")
  if FLAG in flags:  # XLA takes the last occurrence of a repeated flag
    return int(flags.split(FLAG + "=")[-1].split()[0])
  n = config.mesh.cpu_devices or (1 if processes is None else
                                  usable_device_count(config, cores(), processes))
  if n > 1:
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={n}".strip()
  return n
