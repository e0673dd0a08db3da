"""What the Mosaic GPU kernels share: dtype/shape checks, the set-up of padded operands, and the
constructs that differ between the compiled kernels and Mosaic GPU interpret mode.

Interpret mode (`cfg.interpret`, on CPU): the same kernels, barriers, TMA copies and warpgroups run in
Mosaic GPU interpret mode (`InterpretGPUParams`). That mode (jax 0.10) cannot run `layout_cast`,
`plgpu.load`, a transposed wgmma operand or a wgmma with its left operand in registers, so exactly
those four constructs are swapped for their plain-JAX equivalents (identity, `ref[...]`,
`lax.dot_general`) here; everything else is the compiled code path.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxlab.attention.flash import portable
from jaxlab.attention.flash.portable import KernelConfig

DTYPES = (jnp.bfloat16, jnp.float16)
HEAD_DIMS = (64, 128, 256)
WG_ROWS = 64  # query rows per compute warpgroup (the wgmma M tile)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------
# Static checks.

def tile_problem(block_q: int, block_k: int):
  """Why the Mosaic GPU kernel cannot take these tiles (a message), or None if it can."""
  if block_q not in (WG_ROWS, 2 * WG_ROWS):
    return (f"block_q must be 64 or 128 for the Mosaic GPU kernel (64 rows per compute "
            f"warpgroup), got {block_q}")
  if block_k % 64 or not 64 <= block_k <= 256:
    return f"block_k must be 64, 128, 192 or 256 for the Mosaic GPU kernel, got {block_k}"
  return None


def check_inputs(cfg: KernelConfig, q, k, v):
  """Raise ValueError naming the argument if the Mosaic GPU kernel cannot serve these inputs."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in DTYPES:
      raise ValueError(f"{name} must be bfloat16 or float16 for the Mosaic GPU kernel (wgmma takes "
                       f"16-bit operands), got {x.dtype}; float32 uses the portable kernel")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  h = q.shape[-1]
  if h not in HEAD_DIMS:
    raise ValueError(f"head_dim must be one of {HEAD_DIMS} for the Mosaic GPU kernel, got {h}")
  problem = tile_problem(cfg.block_q, cfg.block_k)
  if problem:
    raise ValueError(problem)
  if q.shape[2] % cfg.block_q or k.shape[2] % cfg.block_k:
    raise ValueError(f"padded lengths {q.shape[2]}, {k.shape[2]} must be multiples of block_q "
                     f"{cfg.block_q} and block_k {cfg.block_k}")



def setup(cfg: KernelConfig, q, k, q_seg, kv_seg):
  """Check the GQA grouping and ring depth; returns (cfg with num_stages set, q_seg, kv_seg).

  Without segment ids the kernels still take two tiny all-zero segment operands, so their signature
  stays fixed."""
  b, n, tqp, _ = q.shape
  kh, tkp = k.shape[1], k.shape[2]
  if n % kh:
    raise ValueError(f"query heads {n} must be a multiple of key/value heads {kh}")
  stages = cfg.num_stages or 2
  if stages < 1:
    raise ValueError(f"num_stages must be >= 1, got {stages}")
  if not cfg.has_segments:
    q_seg = jnp.zeros((b, tqp), jnp.int32)
    kv_seg = jnp.zeros((b, tkp), jnp.int32)
  return dataclasses.replace(cfg, num_stages=stages), q_seg, kv_seg


def swizzled():
  """The SMEM transforms of every wgmma operand tile: (8, 64) tiling, 128-byte swizzle."""
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


# ----------------------------------------------------------------------------------------------------
# The constructs that differ between the compiled kernel and Mosaic GPU interpret mode.

def _cast(x, layout, interpret: bool):
  return x if interpret else plgpu.layout_cast(x, layout)


def _iota(shape, dim: int, interpret: bool):
  if interpret:
    return lax.broadcasted_iota(jnp.int32, shape, dim)
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _load_vec(ref, layout, interpret: bool):
  return ref[...] if interpret else plgpu.load(ref, (), layout=layout)


def _qk(q_smem, k_smem, shape, interpret: bool, after_issue):
  """S = Q K^T [64, bk] float32 from SMEM tiles Q [64, H], K [bk, H]; `after_issue()` runs while the
  asynchronous wgmma is in flight."""
  if interpret:
    s = lax.dot_general(q_smem[...], k_smem[...], (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
    after_issue()
    return s

  def body(acc_ref):
    plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
    after_issue()
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _pv(acc, p, v_smem, interpret: bool):
  """acc + P V: acc [64, H] float32, P [64, bk] 16-bit in registers, V [bk, H] in SMEM."""
  if interpret:
    return acc + lax.dot_general(p, v_smem[...], (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)

  def body(acc_ref):
    plgpu.wgmma(acc_ref, p, v_smem)
  return pl.run_state(body)(plgpu.ACC.init(acc))



def _valid(cfg: KernelConfig, row0, k_start, q_seg, k_seg, interpret: bool):
  """Boolean [64, bk] in WGMMA layout: which (query, key) pairs may attend (as `portable._tile_valid`)."""
  shape = (WG_ROWS, cfg.block_k)
  valid = portable.band_valid(cfg, row0 + _iota(shape, 0, interpret),
                              k_start + _iota(shape, 1, interpret))
  if q_seg is not None:
    valid = valid & (lax.broadcast_in_dim(q_seg, shape, [0]) == lax.broadcast_in_dim(k_seg, shape, [1]))
  return valid



def interpret_kwargs(cfg: KernelConfig):
  if not cfg.interpret:
    return {}
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return {"interpret": InterpretGPUParams()}
