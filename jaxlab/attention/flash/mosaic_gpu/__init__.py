"""Mosaic GPU (Hopper) FlashAttention kernels: forward and backward with wgmma, TMA pipelines and warp
specialisation (Shah et al. 2024, "FlashAttention-3", arXiv:2407.08608).

The kernels-module protocol of `jaxlab.attention.flash` (as `portable`): `forward`, `backward_dq`,
`backward_dkdv` over padded [B, N, T, H] bf16/fp16 arrays, plus `check_inputs`. The pieces:
  common.py    dtype/shape checks, operand set-up, the constructs swapped in interpret mode
  ranges.py    the K/V steps / query tiles each CTA and warpgroup visits, and which need no mask
  forward.py   the forward kernel (online softmax, pingpong warpgroups, K/V ring)
  backward.py  the dQ and dK/dV kernels (head_dim 256 falls back to the portable kernels)

Block sizes: `blocks.TABLE["mosaic_gpu"]` (block_q in {64, 128}, block_k a multiple of 64) for the
forward; the backward reuses block_q for dQ and derives the rest (`BWD_TILE`, `dkdv_block_k`) so that
they divide the same padded lengths.
"""

from jaxlab.attention.flash.mosaic_gpu.backward import (BWD_HEAD_DIMS, BWD_TILE, backward_dkdv,
                                                        backward_dq, dkdv_block_k, serves_backward)
from jaxlab.attention.flash.mosaic_gpu.common import (DTYPES, HEAD_DIMS, WG_ROWS, check_inputs,
                                                      tile_problem)
from jaxlab.attention.flash.mosaic_gpu.forward import forward
from jaxlab.attention.flash.mosaic_gpu.ranges import (cta_kv_range, cta_q_range, wg_kv_ranges,
                                                      wg_q_ranges)

__all__ = ["BWD_HEAD_DIMS", "BWD_TILE", "DTYPES", "HEAD_DIMS", "WG_ROWS", "backward_dkdv", "backward_dq",
           "check_inputs", "cta_kv_range", "cta_q_range", "dkdv_block_k", "forward", "serves_backward",
           "tile_problem", "wg_kv_ranges", "wg_q_ranges"]
