"""Block sizes for the Pallas flash-attention kernels, one table per backend, chosen by shape.

A block size is the number of query rows (block_q) or key/value rows (block_k) one kernel program holds
in registers/shared memory at a time. The table below is the single place where they are set;
`choose_blocks` clips them to the (padded) sequence lengths so that tiny inputs stay tiny.

The GPU rows are the usual FlashAttention-2 choices for the Triton-lowered Pallas kernel on A100/H100
(Dao 2023, sec. 3.3; the JAX Pallas GPU reference kernel): larger head_dim leaves less shared memory for
the key/value tile. The "mosaic_gpu" rows are for the Hopper kernels of `mosaic_gpu/` (FlashAttention-3
shapes, Shah et al. 2024): block_q = 64 rows per compute warpgroup times two warpgroups, block_k a
multiple of 64, num_stages the depth of the TMA K/V ring; they fit the 227 KiB of shared memory per CTA
(checked when the kernel is lowered). The TPU rows follow the (8, 128) Mosaic tiling. All are starting
points, NOT tuned on hardware: the GPU rows ran once on an H200 (experiments/results/flash_H200.md,
Mosaic GPU 0.81-0.88x cuDNN's forward at 4k-8k, head_dim 128) with no time left to tune them, the TPU
rows never; tune them with `experiments/bench_flash.py` on the target device.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes and launch parameters for one (backend, head_dim)."""
  block_q: int
  block_k: int
  num_warps: int = 4   # GPU (Triton) only
  num_stages: int = 2  # GPU (Triton) only


# backend -> head_dim -> Blocks. "interpret" is the CPU interpret mode used by the tests: its speed does
# not depend on hardware tiles, so small blocks keep the compiled emulation small.
TABLE: dict[str, dict[int, Blocks]] = {
    "gpu": {
        64: Blocks(128, 64, num_warps=4, num_stages=3),
        128: Blocks(128, 64, num_warps=8, num_stages=2),
        256: Blocks(64, 32, num_warps=8, num_stages=2),
    },
    # Mosaic GPU (Hopper): num_warps is unused (the kernel runs 64-row compute warpgroups + 1 producer).
    # Shared memory: Q 2*64*H + num_stages * 2 * block_k * H elements of 2 bytes.
    "mosaic_gpu": {
        64: Blocks(128, 128, num_stages=3),   # 16 KiB Q + 96 KiB K/V
        128: Blocks(128, 128, num_stages=2),  # 32 KiB Q + 128 KiB K/V
        256: Blocks(128, 64, num_stages=2),   # 64 KiB Q + 128 KiB K/V
    },
    # Mosaic TPU: (8, 128) vreg tiles; 128 x 128 fits every head_dim in VMEM with double buffering.
    "tpu": {
        64: Blocks(128, 128),
        128: Blocks(128, 128),
        256: Blocks(128, 128),
    },
    "interpret": {},
}
_INTERPRET_DEFAULT = Blocks(32, 32)

# Head dims the compiled (non-interpret) kernels are built for.
GPU_HEAD_DIMS = tuple(sorted(TABLE["gpu"]))
TPU_HEAD_DIMS = tuple(sorted(TABLE["tpu"]))
MOSAIC_GPU_HEAD_DIMS = tuple(sorted(TABLE["mosaic_gpu"]))


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pow2_at_least(x: int) -> int:
  p = 1
  while p < x:
    p *= 2
  return p


def choose_blocks(backend: str, head_dim: int, q_len: int, kv_len: int) -> Blocks:
  """Blocks for `backend` ("gpu", "mosaic_gpu", "tpu" or "interpret") and these shapes.

  GPU blocks never exceed the sequence lengths rounded up to a power of two >= 16 (Triton's tl.dot needs
  power-of-two tiles of at least 16); TPU blocks never exceed the lengths rounded up to a multiple of 8
  (a block equal to the whole padded length is always a legal Mosaic block). So short sequences are not
  padded to a full table block. Mosaic GPU blocks stay multiples of 64 (the wgmma tile): block_q is 64
  (one compute warpgroup) when q_len <= 64, block_k at most the length rounded up to 64.
  """
  if backend == "mosaic_gpu":
    if head_dim not in TABLE["mosaic_gpu"]:
      raise ValueError(f"head_dim must be one of {MOSAIC_GPU_HEAD_DIMS} for the Mosaic GPU kernel, "
                       f"got {head_dim}")
    base = TABLE["mosaic_gpu"][head_dim]
    return dataclasses.replace(base, block_q=64 if q_len <= 64 else base.block_q,
                               block_k=min(base.block_k, _round_up(max(kv_len, 1), 64)))
  if backend == "tpu":
    if head_dim not in TABLE["tpu"]:
      raise ValueError(f"head_dim must be one of {TPU_HEAD_DIMS} for the TPU kernel, got {head_dim}")
    base = TABLE["tpu"][head_dim]
    return dataclasses.replace(base, block_q=min(base.block_q, _round_up(q_len, 8)),
                               block_k=min(base.block_k, _round_up(kv_len, 8)))
  if backend == "gpu":
    if head_dim not in TABLE["gpu"]:
      raise ValueError(f"head_dim must be one of {GPU_HEAD_DIMS} for the GPU kernel, got {head_dim}")
    base = TABLE["gpu"][head_dim]
  elif backend == "interpret":
    base = TABLE["interpret"].get(head_dim, _INTERPRET_DEFAULT)
  else:
    raise ValueError(f"backend must be 'gpu', 'mosaic_gpu', 'tpu' or 'interpret', got {backend!r}")
  bq = min(base.block_q, max(16, _pow2_at_least(q_len)))
  bk = min(base.block_k, max(16, _pow2_at_least(kv_len)))
  return dataclasses.replace(base, block_q=bq, block_k=bk)
