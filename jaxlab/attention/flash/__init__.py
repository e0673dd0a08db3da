"""Pallas flash attention: `implementation="pallas"` of `jaxlab.attention.dot_product_attention`.

`flash_attention` takes the attention contract's arrays ([B, T, N, H], an `AttentionMask`) and runs
the FlashAttention-2 kernels of `portable.py`, `mosaic_gpu/` or `tpu.py` (Dao 2023, arXiv:2307.08691)
under one `jax.custom_vjp`: forward saves O and the float32 row logsumexp; backward runs a dQ kernel and
a dK/dV kernel.

Where the kernels run:
  * Hopper GPU (compute capability 9.x), bfloat16/float16, head_dim 64/128/256, `kernel="mosaic_gpu"`:
    the forward is the Mosaic GPU kernel of `mosaic_gpu/forward.py` (wgmma, TMA K/V ring, producer + compute
    warpgroups; FlashAttention-3, Shah et al. 2024), and so are its dQ and dK/dV backward kernels for
    head_dim 64/128 (head_dim 256 uses the portable (Triton) backward kernels). Checked by lowering for
    CUDA and in Mosaic GPU interpret mode on CPU, and on an H200 (experiments/results/gpu_check_H200.md:
    every GPU test passed, bf16 and fp16 values and gradients against "xla" under every mask; 1.1-2.5x
    the portable kernel's speed), so it is the default there (`MOSAIC_GPU_BY_DEFAULT`).
  * Other CUDA GPUs, and float32 (or other head dims) on Hopper: compiled through Pallas' Triton
    lowering (the portable path).
  * CPU (and any backend with `interpret=True`): Pallas interpret mode, exact but slow; used by the tests
    (`kernel="mosaic_gpu"` uses Mosaic GPU interpret mode).
  * TPU: the Mosaic TPU kernels of `tpu.py` (grid-pipelined, VMEM scratch accumulators); on CPU they run
    in TPU interpret mode. Checked in interpret mode and by lowering; never run on a real TPU here.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxlab.attention import masks as masks_lib
from jaxlab.attention.flash import mosaic_gpu, portable, tpu
from jaxlab.attention.flash.blocks import (GPU_HEAD_DIMS, MOSAIC_GPU_HEAD_DIMS, TABLE, TPU_HEAD_DIMS,
                                           Blocks, choose_blocks)

KERNELS = ("portable", "tpu", "mosaic_gpu")

# Whether kernel=None picks the Mosaic GPU kernel on a Hopper GPU (for the inputs it serves). True since
# all of its GPU tests (tests/attention/test_flash_gpu.py, test_flash_mosaic_gpu.py::
# test_on_hopper_matches_xla) passed on an H200 (2026-12-04, experiments/results/gpu_check_H200.md).
MOSAIC_GPU_BY_DEFAULT = True

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

__all__ = ["flash_attention", "supports", "supports_mosaic_gpu", "is_hopper", "choose_blocks", "Blocks",
           "TABLE", "GPU_HEAD_DIMS", "TPU_HEAD_DIMS", "MOSAIC_GPU_HEAD_DIMS", "KERNELS"]


def supports(q: jax.Array, k: jax.Array, v: jax.Array, *, bias=None, soft_cap=None,
             backend: Optional[str] = None) -> tuple[bool, str]:
  """Whether the compiled Pallas kernel serves these inputs on `backend` (default: the default backend).

  Returns (ok, reason); reason says what is missing when ok is False.
  """
  backend = backend or jax.default_backend()
  if backend not in ("gpu", "tpu"):
    return False, f"no compiled Pallas flash kernel for backend {backend!r} (interpret mode only)"
  if bias is not None:
    return False, "bias is not supported by the Pallas kernel"
  if soft_cap is not None and isinstance(soft_cap, jax.core.Tracer):
    return False, "a traced logit_soft_cap is not supported by the Pallas kernel (it is static)"
  if q.dtype not in _DTYPES:
    return False, f"dtype {q.dtype} is not one of float32, bfloat16, float16"
  head_dims = GPU_HEAD_DIMS if backend == "gpu" else TPU_HEAD_DIMS
  if q.shape[-1] not in head_dims:
    return False, f"head_dim {q.shape[-1]} is not one of {head_dims}"
  return True, ""


def is_hopper(device=None) -> bool:
  """Whether `device` (default: the first default device) is a CUDA GPU of compute capability 9.x."""
  device = device or jax.devices()[0]
  if getattr(device, "platform", None) != "gpu":
    return False
  cc = getattr(device, "compute_capability", None)  # e.g. "9.0" on H100/H200; absent on ROCm/CPU
  try:
    return cc is not None and int(str(cc).split(".")[0]) == 9
  except ValueError:
    return False


def supports_mosaic_gpu(q: jax.Array, k: jax.Array, v: jax.Array, *, bias=None, soft_cap=None,
                        check_device: bool = True) -> tuple[bool, str]:
  """Whether the Mosaic GPU (Hopper) kernel serves these inputs; (ok, reason) as `supports`.

  It needs bfloat16 or float16 q/k/v (wgmma takes 16-bit operands; float32 goes to the portable kernel),
  head_dim in MOSAIC_GPU_HEAD_DIMS and, with check_device, a compute capability 9.x default device.
  """
  if check_device and not is_hopper():
    return False, "the default device is not a Hopper (compute capability 9.x) GPU"
  ok, reason = supports(q, k, v, bias=bias, soft_cap=soft_cap, backend="gpu")
  if not ok:
    return ok, reason
  if any(x.dtype not in mosaic_gpu.DTYPES for x in (q, k, v)) or not q.dtype == k.dtype == v.dtype:
    return False, f"dtypes {q.dtype}, {k.dtype}, {v.dtype} are not all bfloat16 or all float16"
  if q.shape[-1] not in MOSAIC_GPU_HEAD_DIMS:
    return False, f"head_dim {q.shape[-1]} is not one of {MOSAIC_GPU_HEAD_DIMS}"
  if soft_cap is not None:
    return False, "logit_soft_cap is not supported by the Mosaic GPU kernel (the portable one has it)"
  return True, ""


def _static_float(value, name: str) -> float:
  """`value` as a Python float (it is compiled into the kernels); ValueError naming it if traced."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(f"{name} must be a static Python float for the Pallas kernel, got "
                     f"{value!r}") from None


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _segment_ids(mask: masks_lib.AttentionMask, b: int, tqp: int, tkp: int):
  """Segment ids [B, Tqp], [B, Tkp] int32 that encode segments, valid lengths and padding, or None.

  A query at or past q_length (or in the padding) gets id -1, a key at or past kv_length gets -2, so
  they never match; elsewhere the user's segment ids (or 0), renumbered per batch row by their rank
  among the row's q and kv ids (`_dense_ranks`: equal ids stay equal, distinct ones distinct, all in
  [0, Tq + Tk)), so ids of any integer dtype and size fit the kernels' int32 without wrapping.
  """
  if (mask.q_segment_ids is None and mask.q_lengths is None and mask.kv_lengths is None):
    return None, None
  q_ids, kv_ids = mask.q_segment_ids, mask.kv_segment_ids
  if q_ids is not None:
    q_ids, kv_ids = _dense_ranks(q_ids, kv_ids)

  def ids(seg, lengths, t, tp, fill):
    pos = jnp.arange(tp)[None, :]
    out = jnp.zeros((b, tp), jnp.int32) if seg is None else jnp.pad(
        seg, ((0, 0), (0, tp - t)), constant_values=fill)
    limit = t if lengths is None else jnp.minimum(lengths.astype(jnp.int32), t)[:, None]
    return jnp.where(pos < limit, out, fill)

  return (ids(q_ids, mask.q_lengths, mask.q_len, tqp, -1),
          ids(kv_ids, mask.kv_lengths, mask.kv_len, tkp, -2))


def _dense_ranks(q_ids, kv_ids):
  """Per batch row, each id of q_ids [B, Tq] and kv_ids [B, Tk] replaced by the number of distinct
  smaller ids in the row's q and kv ids together: int32 in [0, Tq + Tk), equal exactly where the
  ids were (compared in their own dtype)."""
  tq = q_ids.shape[1]
  common = jnp.promote_types(q_ids.dtype, kv_ids.dtype)
  both = jnp.concatenate([q_ids.astype(common), kv_ids.astype(common)], axis=1)  # [B, Tq + Tk]
  order = jnp.argsort(both, axis=1, stable=True)
  sorted_ids = jnp.take_along_axis(both, order, axis=1)
  new_group = jnp.concatenate([jnp.zeros_like(sorted_ids[:, :1], dtype=jnp.int32),
                               (sorted_ids[:, 1:] != sorted_ids[:, :-1]).astype(jnp.int32)], axis=1)
  rank_sorted = jnp.cumsum(new_group, axis=1, dtype=jnp.int32)
  rows = jnp.arange(both.shape[0])[:, None]
  ranks = jnp.zeros(both.shape, jnp.int32).at[rows, order].set(rank_sorted)
  return ranks[:, :tq], ranks[:, tq:]


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: masks_lib.AttentionMask, *,
                    scale: float, block_q: Optional[int] = None, block_k: Optional[int] = None,
                    interpret: Optional[bool] = None, kernel: Optional[str] = None,
                    soft_cap: Optional[float] = None) -> jax.Array:
  """Softmax attention with the Pallas FlashAttention-2 kernels; same result as `xla_attention`.

  Args:
    q: [B, Tq, N, H]; k, v: [B, Tk, K, H], N % K == 0 (GQA/MQA by index mapping). float32, bfloat16
      or float16; accumulation is float32 in every case.
    mask: `AttentionMask` for (Tq, Tk): causal, window, segment ids, lengths, any combination.
    scale: logit scale (static Python float).
    block_q, block_k: tile sizes (default: `blocks.TABLE` for the backend and head_dim). Lengths need
      not be multiples of them: inputs are padded and the tail is masked inside the kernel.
    interpret: run the kernels in interpret mode (default: True unless the backend is a GPU or TPU);
      False compiles them (Triton for the portable kernel, Mosaic for the TPU kernel).
    kernel: "portable" (Triton-lowered on GPU), "mosaic_gpu" (Hopper forward and backward) or
      "tpu" (Mosaic TPU); default "tpu" on a TPU backend, "mosaic_gpu" on a Hopper GPU when
      `supports_mosaic_gpu` the inputs (MOSAIC_GPU_BY_DEFAULT), else "portable".
    soft_cap: logit soft cap c (static Python float > 0) or None: logits (after scale) become
      c * tanh(logits / c), as in `xla_attention` (Gemma 2). The portable and TPU kernels only.

  Returns:
    [B, Tq, N, H] in q's dtype; rows that see no key are zeros (with zero gradients).
  """
  from jaxlab.attention.softmax import check_qkv, check_soft_cap

  b, tq, tk, n, kh, h = check_qkv(q, k, v)
  if q.dtype not in _DTYPES:
    raise ValueError(f"q must be float32, bfloat16 or float16 for the Pallas kernel, got {q.dtype}")
  masks_lib.check_mask_fits(mask, b, tq, tk)
  scale = _static_float(scale, "scale")
  check_soft_cap(soft_cap)
  if soft_cap is not None:
    soft_cap = _static_float(soft_cap, "soft_cap")
  if tq == 0 or tk == 0:  # no query, or no key to see: zeros (as dot_product_attention gives)
    return jnp.zeros((b, tq, n, v.shape[-1]), q.dtype)
  if kernel is None:
    if jax.default_backend() == "tpu":
      kernel = "tpu"
    elif (MOSAIC_GPU_BY_DEFAULT and jax.default_backend() == "gpu"
          and supports_mosaic_gpu(q, k, v, soft_cap=soft_cap)[0]
          # explicit tiles the Mosaic kernel does not take go to the portable kernel
          and mosaic_gpu.tile_problem(block_q or mosaic_gpu.WG_ROWS, block_k or 64) is None):
      kernel = "mosaic_gpu"
    else:
      kernel = "portable"
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
  target = "tpu" if kernel == "tpu" else "gpu"
  if interpret is None:
    interpret = jax.default_backend() not in ("gpu", "tpu")
  if kernel == "mosaic_gpu":  # 16-bit and its head dims even in interpret mode (same kernel code)
    ok, reason = supports_mosaic_gpu(q, k, v, soft_cap=soft_cap, check_device=False)
    if not ok:
      raise ValueError(f"kernel='mosaic_gpu' does not serve these inputs: {reason}")
  elif not interpret:
    ok, reason = supports(q, k, v, backend=target)
    if not ok:
      raise ValueError(f"the compiled Pallas kernel does not serve these inputs: {reason}")
  if kernel == "mosaic_gpu":
    blocks = choose_blocks("mosaic_gpu", h, tq, tk)
  else:
    blocks = choose_blocks("interpret" if interpret else target, h, tq, tk)
  for name, value in (("block_q", block_q), ("block_k", block_k)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
      raise ValueError(f"{name} must be a positive int or None, got {value!r}")
  bq = block_q or blocks.block_q
  bk = block_k or blocks.block_k
  if not interpret and kernel == "portable" and target == "gpu":
    for name, value in (("block_q", bq), ("block_k", bk)):
      if value < 16 or value & (value - 1):  # Triton's tl.dot: power-of-two tiles of at least 16
        raise ValueError(f"{name}={value}: the compiled GPU kernel needs a power of two >= 16")
  tqp, tkp = _round_up(tq, bq), _round_up(tk, bk)
  q_seg, kv_seg = _segment_ids(mask, b, tqp, tkp)
  cfg = portable.KernelConfig(
      q_len=tq, kv_len=tk, causal=mask.causal, window=mask.window, has_segments=q_seg is not None,
      scale=scale, soft_cap=soft_cap, block_q=bq, block_k=bk, interpret=bool(interpret),
      num_warps=None if interpret or kernel != "portable" else blocks.num_warps,
      num_stages=(blocks.num_stages if kernel == "mosaic_gpu"  # its K/V ring depth, also interpreted
                  else None if interpret else blocks.num_stages))

  # Layout change and padding outside the custom_vjp: JAX transposes them itself.
  def to_bnth(x, t, tp):
    x = jnp.swapaxes(x, 1, 2)
    return x if t == tp else jnp.pad(x, ((0, 0), (0, 0), (0, tp - t), (0, 0)))

  kernels = {"tpu": tpu, "mosaic_gpu": mosaic_gpu, "portable": portable}[kernel]
  out = _flash(cfg, kernels, to_bnth(q, tq, tqp), to_bnth(k, tk, tkp), to_bnth(v, tk, tkp), q_seg,
               kv_seg)
  return jnp.swapaxes(out[:, :, :tq], 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(cfg, kernels, q, k, v, q_seg, kv_seg):
  """`kernels` is the module (portable, mosaic_gpu or tpu) whose forward / backward_dq / backward_dkdv run."""
  return kernels.forward(cfg, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(cfg, kernels, q, k, v, q_seg, kv_seg):
  out, lse = kernels.forward(cfg, q, k, v, q_seg, kv_seg)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg, kernels, res, d_out):
  q, k, v, q_seg, kv_seg, out, lse = res
  d_out = d_out.astype(q.dtype)
  # D_i = rowsum(dO * O) (FlashAttention-2, Algorithm 2 line 4): O(T) per head, computed by XLA.
  # From O in q's dtype, as FlashAttention-2 does: with 16-bit inputs its rounding shows in
  # dS = P (dP - D) where attention is peaked (dP_ij ~ D_i), up to ~12x xla's dQ/dK error there
  # (tests/attention/test_flash.py::test_low_precision_inputs). A float32 O residual avoids it (as
  # `blockwise` keeps), at the cost of a float32 write of O in every training forward pass.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  dq = kernels.backward_dq(cfg, q, k, v, d_out, lse, delta, q_seg, kv_seg)
  dk, dv = kernels.backward_dkdv(cfg, q, k, v, d_out, lse, delta, q_seg, kv_seg)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
