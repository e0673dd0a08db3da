"""Device mesh and logical axis rules: models name their axes, this file maps names to mesh axes.

Mesh axes: "data" (pure data parallelism), "fsdp" (data parallelism with parameters and optimizer state
sharded, ZeRO-3 style), "tensor" (Megatron-style sharding of heads / MLP hidden / vocab).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
)


def mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves at most one -1 ("the rest") in `sizes` (data, fsdp, tensor) against the device count.

  Without a -1 the mesh may use fewer devices than there are (the first prod(sizes) of them).
  """
  sizes = [int(s) for s in sizes]
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"mesh needs {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"at most one mesh size may be -1, got {sizes}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive or -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh sizes {sizes} do not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) > num_devices:
    raise ValueError(f"mesh sizes {sizes} need {math.prod(sizes)} devices, but only {num_devices} "
                     "are available")
  return tuple(sizes)


def make_mesh(sizes: Sequence[int], devices=None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor) in Auto mode (sharding annotations + jit propagation)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices[:math.prod(shape)])


def config_mesh(mesh_config) -> Mesh:
  """The run's mesh from `config.mesh` (its data, fsdp and tensor sizes)."""
  return make_mesh((mesh_config.data, mesh_config.fsdp, mesh_config.tensor))


def logical_shardings(abstract_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a pytree whose leaves may be `nn.LogicallyPartitioned` boxes. Refuses
  (ValueError) a logical name the rules do not know and an array with two names on one mesh axis:
  flax leaves an unknown name's dimension unsharded, and of two names on one mesh axis it shards
  only the first, silently."""
  specs = nn.get_partition_spec(abstract_tree)
  check_logical_names(specs, rules)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_logical_names(specs, rules=LOGICAL_AXIS_RULES) -> None:
  """ValueError naming the array when its logical axis names (a pytree of PartitionSpecs of names)
  are not all rule names, or two of them map to one mesh axis."""
  known = dict(rules)
  for path, spec in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, P)):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    used = {}
    names = [n for part in spec for n in (part if isinstance(part, tuple) else (part,))]
    for logical in names:
      if logical is None:
        continue
      if logical not in known:
        raise ValueError(f"{name} names the logical axis {logical!r}, which no rule of "
                         f"jaxlab.train.sharding.LOGICAL_AXIS_RULES maps (known: "
                         f"{', '.join(sorted(known))}); it would be left unsharded")
      targets = known[logical]
      for mesh_axis in ((targets,) if isinstance(targets, str) else tuple(targets or ())):
        if mesh_axis in used:
          raise ValueError(f"{name} maps both of its logical axes {used[mesh_axis]!r} and "
                           f"{logical!r} to the mesh axis {mesh_axis!r}; the second would be "
                           "left unsharded")
        used[mesh_axis] = logical


def _sharded_leaves(abstract_tree, shardings):
  """(name "a/b", whether it is a parameter, leaf, its NamedSharding, the mesh axes that shard each
  dimension: a tuple per dimension) for each array of `abstract_tree`."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract_tree)
  for (path, leaf), named in zip(leaves, jax.tree_util.tree_leaves(shardings)):
    axes_per_dim = [(axes,) if isinstance(axes, str) else tuple(axes or ()) for axes in named.spec]
    yield (jax.tree_util.keystr(path, simple=True, separator="/"),
           getattr(path[0], "key", None) == "params", leaf, named, axes_per_dim)


def check_divisible(abstract_tree, shardings) -> None:
  """Raises ConfigError (one line; `jaxlab` exits 2, as for other config errors) when a mesh axis
  does not divide an array dimension it shards, naming the array (parameters before optimizer
  state), the dimension and the config key of the mesh axis; JAX would stop at initialisation with a
  message about tiling factors instead."""
  problems = []  # (not a parameter, message)
  for name, is_param, leaf, named, axes_per_dim in _sharded_leaves(abstract_tree, shardings):
    for dim, axes in enumerate(axes_per_dim):
      parts = math.prod(named.mesh.shape[a] for a in axes)
      if parts > 1 and leaf.shape[dim] % parts:
        keys = "*".join(f"config.mesh.{a}={named.mesh.shape[a]}" for a in axes)
        problems.append((not is_param,
                         f"{keys} does not divide dimension {dim} (size {leaf.shape[dim]}) of "
                         f"{name} {tuple(leaf.shape)}; choose mesh sizes that divide it (or "
                         "change the model's sizes)"))
  if problems:
    from jaxlab.configs import ConfigError
    raise ConfigError(min(problems, key=lambda problem: problem[0])[1])  # parameters first


def device_memory_bytes(device) -> int | None:
  """The memory one device may use: its allocator's limit on an accelerator; on CPU the host's RAM
  shared by the process's CPU devices (None where neither is known)."""
  if device.platform == "cpu":
    try:
      total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      return None
    return total // max(1, jax.local_device_count("cpu"))
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return (stats or {}).get("bytes_limit")


def check_fits(abstract_tree, shardings, what: str = "the training state") -> None:
  """Raises ConfigError (one line) when `abstract_tree` (ShapeDtypeStructs, e.g. parameters and
  optimizer state from eval_shape) needs more bytes on one device than that device has, naming the
  largest array: sizes of 10^8 otherwise hung in initialisation or died of an allocation error
  after the run had started. A lower bound (activations come on top), so never a false refusal."""
  per_device, largest = 0, (0, False, "", ())
  for name, is_param, leaf, named, axes_per_dim in _sharded_leaves(abstract_tree, shardings):
    parts = math.prod(named.mesh.shape[a] for axes in axes_per_dim for a in axes)
    size = leaf.size * np.dtype(leaf.dtype).itemsize // parts
    per_device += size
    if (size, is_param) > largest[:2]:  # a parameter is named before its optimizer moments
      largest = (size, is_param, name, tuple(leaf.shape))
  capacity = device_memory_bytes(jax.local_devices()[0])
  if capacity is None or per_device <= capacity:
    return
  from jaxlab.configs import ConfigError
  gib = lambda n: f"{n / 2**30:.1f} GiB"
  raise ConfigError(f"{what} needs {gib(per_device)} per device, more than the {gib(capacity)} a "
                    f"device has here; the largest array is {largest[2]} {largest[3]} "
                    f"({gib(largest[0])}): reduce the config's sizes (or shard over more devices "
                    "with config.mesh.fsdp / tensor)")


def gathered_over_fsdp(shardings):
  """The shardings that parameters are used in: their stored shardings without the fsdp axis
  (ZeRO-3 / FSDP: the weights are all-gathered over fsdp for the forward and backward, and their
  gradients reduced and sliced back to the shards: a reduce-scatter where the backend forms one, an
  all-reduce and a slice on CPU; tensor-parallel dimensions stay split). The trainer gathers every
  layer's weights at once (not layer by layer): the step holds one full copy of the parameters.
  Without this constraint XLA's propagation let the fsdp-split embed dimension of the weights (and
  layer norms) reach the activations, and it all-gathered whole-batch activations instead of
  weights."""
  def drop_fsdp(named: NamedSharding) -> NamedSharding:
    kept = []
    for axes in named.spec:
      axes = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))
                   if a != "fsdp")
      kept.append(axes[0] if len(axes) == 1 else (axes or None))
    return NamedSharding(named.mesh, P(*kept))
  return jax.tree.map(drop_fsdp, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _process_of(device) -> int:
  """The process that owns `device` (tests simulate other assignments by replacing this)."""
  return device.process_index


def process_batch_rows(mesh: Mesh, batch_size: int, process: int | None = None) -> np.ndarray | None:
  """The rows of a global batch of `batch_size` rows that `process` (default: this one) supplies to
  `place_batch`: those its devices hold under `batch_sharding(mesh)`, ascending (the order in which
  jax.make_array_from_process_local_data reads a process's rows). None in a 1-process run: all rows.

  A contiguous block per process where the mesh orders devices by process (jax.make_mesh on CPU and
  GPU); on a TPU pod jax.make_mesh orders them by the chips' topology, which may interleave the
  processes along the batch axes, and the rows follow it: the global batch is the 1-process one.
  """
  if jax.process_count() == 1:
    return None
  process = jax.process_index() if process is None else process
  held = batch_sharding(mesh).devices_indices_map((batch_size,))
  rows = {row for device, (index,) in held.items() if _process_of(device) == process
          for row in range(*index.indices(batch_size))}
  return np.array(sorted(rows), np.int64)


def config_process_rows(mesh_config, batch_size: int) -> np.ndarray | None:
  """`process_batch_rows` on the mesh that `config.mesh` builds (None in a 1-process run)."""
  if jax.process_count() == 1:
    return None
  return process_batch_rows(config_mesh(mesh_config), batch_size)


def place_batch(batch: dict, mesh: Mesh, batch_size: int) -> dict:
  """Each process's rows (`process_batch_rows`) of a global batch of `batch_size` rows -> global
  jax.Arrays sharded over the batch axes (a process that supplies other rows is refused by jax)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v),
                                                    (batch_size,) + np.shape(v)[1:])
          for k, v in batch.items()}
