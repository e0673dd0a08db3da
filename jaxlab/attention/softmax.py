"""Softmax dot-product attention: the public entry point and the XLA reference implementation.

Layout [batch, length, heads, head_dim] as in `jax.nn.dot_product_attention`. Grouped-query attention
(GQA, Ainslie et al. 2023; MQA, Shazeer 2019) is computed by grouping query heads over each key/value head,
never by repeating K/V in memory.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from jaxlab.attention import masks as masks_lib

IMPLEMENTATIONS = (None, "xla", "blockwise", "pallas", "cudnn")


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, int, int, int, int, int]:
  """Checks the attention contract's shapes; returns (B, Tq, Tk, N, K, H)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, length, heads, head_dim], got shape {x.shape}")
  b, tq, n, h = q.shape
  bk, tk, kh, hk = k.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
  if bk != b:
    raise ValueError(f"k batch {bk} does not match q batch {b}")
  if hk != h:
    raise ValueError(f"k head_dim {hk} does not match q head_dim {h}")
  if n % kh:
    raise ValueError(f"q heads ({n}) must be a multiple of k/v heads ({kh}) for GQA/MQA")
  for name, x in (("k", k), ("v", v)):
    if x.dtype != q.dtype:
      raise ValueError(f"{name} dtype {x.dtype} does not match q dtype {q.dtype}; q, k and v must "
                       "share one dtype")
  if not jnp.issubdtype(q.dtype, jnp.floating):  # outputs have q's dtype: ints would be truncated
    raise ValueError(f"q, k and v must have a floating dtype, got {q.dtype}")
  return b, tq, tk, n, kh, h


_NEG = masks_lib.MASKED_LOGIT


def check_soft_cap(soft_cap, name: str = "soft_cap") -> None:
  """A logit soft cap is None or a finite number > 0 (0 gives uniform weights, < 0 flips the
  logits, inf NaN); ValueError naming the argument otherwise. It may be traced (then unchecked)."""
  if soft_cap is None or isinstance(soft_cap, jax.core.Tracer):
    return
  if isinstance(soft_cap, bool) or not (soft_cap > 0 and math.isfinite(soft_cap)):
    raise ValueError(f"{name} must be a finite number > 0, or None; got {soft_cap!r}")


def float32_bias(bias: jax.Array) -> jax.Array:
  """bias in float32 for the logits. A float16 bias at or below float16's finfo.min (-65504, how an
  additive mask is written in float16, which cannot hold the masked value) becomes -inf: masked."""
  if bias.dtype == jnp.float16:
    return jnp.where(bias <= jnp.finfo(jnp.float16).min, -jnp.inf, bias.astype(jnp.float32))
  return bias.astype(jnp.float32)


def check_bias(bias: jax.Array, b: int, n: int, tq: int, tk: int) -> jax.Array:
  """bias (at most 4-D; each right-aligned dimension 1 or [B, N, Tq, Tk]'s) -> 4-D bias."""
  bias = jnp.asarray(bias)
  target = (b, n, tq, tk)
  if bias.ndim > 4 or any(have not in (1, want)
                          for have, want in zip(bias.shape[::-1], target[::-1])):
    raise ValueError(f"bias of shape {bias.shape} does not broadcast to [B, N, Tq, Tk] = {target}")
  return bias.reshape((1,) * (4 - bias.ndim) + bias.shape)


def masked_softmax(logits: jax.Array, valid: Optional[jax.Array]) -> jax.Array:
  """Softmax over the last axis of float32 logits, 0 where `valid` (broadcastable bool) is False.
  A logit at or below the masked value (-0.7 * float32 max; a bias of -inf or finfo.min, i.e. an
  additive mask, float16's too, see `float32_bias`) counts as masked: a row with no visible key, or
  with only such logits, gives zeros and zero gradients, as blockwise and the kernels do (a plain
  softmax would put the row's weight on the masked keys, or give NaN)."""
  if valid is not None:
    logits = jnp.where(valid, logits, _NEG)
  row_max = jnp.maximum(jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)), _NEG)
  p = jnp.exp(logits - row_max)
  if valid is not None:
    p = jnp.where(valid, p, 0.0)
  total = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(total > 0, total, 1.0)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: masks_lib.AttentionMask, *,
                  bias: Optional[jax.Array] = None, scale: float,
                  soft_cap: Optional[float] = None) -> jax.Array:
  """Reference attention: materialises the [B, N, Tq, Tk] logits. Rows with no visible key (or whose
  visible keys all have a -inf bias) give zeros."""
  b, tq, tk, n, kh, h = check_qkv(q, k, v)
  check_soft_cap(soft_cap)
  masks_lib.check_mask_fits(mask, b, tq, tk)
  g = n // kh
  q_grouped = q.reshape(b, tq, kh, g, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q_grouped, k,
                      preferred_element_type=jnp.float32) * scale
  logits = logits.reshape(b, n, tq, tk)
  if bias is not None:
    logits = logits + float32_bias(bias)
  valid = mask.full()
  if soft_cap is not None:
    hidden = logits <= _NEG  # a -inf / finfo.min bias masks; the cap would turn it into -c
    valid = ~hidden if valid is None else valid & ~hidden
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  probs = masked_softmax(logits, valid)
  probs = probs.reshape(b, kh, g, tq, tk).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, tq, n, h).astype(q.dtype)


# Per (batch, head), a [Tq, Tk] float32 logits matrix of this many elements (16 MiB) or more makes the
# automatic choice blockwise: below it the reference's single fused matmul is faster, above it the
# quadratic memory dominates.
BLOCKWISE_MIN_LOGITS = 2048 * 2048


def choose_implementation(q_len: int, kv_len: int) -> str:
  """The XLA implementation that `implementation=None` uses for these lengths (when the Pallas kernel
  does not serve the inputs, see `dot_product_attention`)."""
  return "blockwise" if q_len * kv_len >= BLOCKWISE_MIN_LOGITS else "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                          q_segment_ids: Optional[jax.Array] = None,
                          kv_segment_ids: Optional[jax.Array] = None,
                          q_lengths: Optional[jax.Array] = None,
                          kv_lengths: Optional[jax.Array] = None,
                          window: masks_lib.Window = None,
                          bias: Optional[jax.Array] = None,
                          scale: Optional[float] = None,
                          logit_soft_cap: Optional[float] = None,
                          implementation: Optional[str] = None) -> jax.Array:
  """Scaled dot-product attention (Vaswani et al. 2017, eq. 1) with one mask vocabulary.

  Args:
    q: [B, Tq, N, H] queries. k, v: [B, Tk, K, H] keys/values, N % K == 0 (GQA/MQA).
    causal: query i sees keys j <= i + (Tk - Tq) (end-aligned, for decoding).
    q_segment_ids, kv_segment_ids: [B, Tq], [B, Tk] ints; attend only within a segment (packing).
    q_lengths, kv_lengths: [B] ints; tokens at or past the length are padding.
    window: (left, right) sliding window in key coordinates; None = unlimited.
    bias: broadcastable to [B, N, Tq, Tk] (at most 4-D), added to the logits (ALiBi, T5); -inf
      entries are allowed (an additive mask).
    scale: logit scale, default 1/sqrt(H). A traced scale (a learned temperature) is exact in "xla";
      the other implementations fold it into q first (q * scale in q's dtype).
    logit_soft_cap: if given (finite, > 0), logits (after scale and bias) become c * tanh(logits / c)
      (Gemma 2; Bello et al. 2017).
    implementation: None (best available) | "xla" | "blockwise" | "pallas" | "cudnn". None picks
      "pallas" on a GPU or TPU when `jaxlab.attention.flash.supports` the inputs (no bias, a static
      soft cap, the dtypes and head dims it lists), else `choose_implementation(Tq, Tk)`. "pallas" runs the
      Pallas kernels compiled on a GPU/TPU and in (slow, exact) interpret mode elsewhere.
      "pallas" and "blockwise" define their gradients as custom VJPs: reverse mode only (jax.grad,
      jax.vjp); forward mode (jax.jvp, jacfwd, hessian) needs "xla", which None picks only on a CPU
      and for short inputs.

  Returns:
    [B, Tq, N, H] in q's dtype. Rows that see no key (or whose visible keys all have a -inf bias) are
    zeros; so is the whole output when Tq or Tk is 0.
  """
  b, tq, tk, n, kh, h = check_qkv(q, k, v)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if bias is not None:
    bias = check_bias(bias, b, n, tq, tk)
  mask = masks_lib.make_mask(tq, tk, b, causal=causal, window=window, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids, q_lengths=q_lengths,
                             kv_lengths=kv_lengths)
  if scale is None:
    scale = h ** -0.5
  check_soft_cap(logit_soft_cap, "logit_soft_cap")
  if tq == 0 or tk == 0:  # nothing to attend (xla would agree; the tiled ones cannot tile it)
    return jnp.zeros((b, tq, n, h), q.dtype)
  traced_cap = isinstance(logit_soft_cap, jax.core.Tracer)
  if implementation is None:
    from jaxlab.attention import flash
    if flash.supports(q, k, v, bias=bias, soft_cap=logit_soft_cap)[0]:
      implementation = "pallas"
    elif traced_cap:  # the tiled implementations compile the cap in; xla takes it as an array
      implementation = "xla"
    else:
      implementation = choose_implementation(tq, tk)
  if traced_cap and implementation != "xla":
    raise ValueError(f"implementation={implementation!r} needs a static logit_soft_cap (a Python "
                     "float); a traced one works with 'xla' (or implementation=None)")
  if implementation == "xla":
    return xla_attention(q, k, v, mask, bias=bias, scale=scale, soft_cap=logit_soft_cap)
  try:
    scale = float(scale)
  except (TypeError, jax.errors.ConcretizationTypeError):  # traced: the tiled ones take a static scale
    q, scale = (q * scale).astype(q.dtype), 1.0
  if implementation == "blockwise":
    from jaxlab.attention.blockwise import blockwise_attention
    return blockwise_attention(q, k, v, mask, bias=bias, scale=scale, soft_cap=logit_soft_cap)
  if implementation == "cudnn":
    if logit_soft_cap is not None:
      raise ValueError("implementation='cudnn' does not take logit_soft_cap")
    return _cudnn_attention(q, k, v, mask, bias=bias, scale=scale)
  # implementation == "pallas"
  if bias is not None:
    raise ValueError("implementation='pallas' does not take bias; use 'xla' or 'blockwise'")
  from jaxlab.attention.flash import flash_attention
  return flash_attention(q, k, v, mask, scale=scale, soft_cap=logit_soft_cap)


def _cudnn_attention(q, k, v, mask: masks_lib.AttentionMask, *, bias, scale):
  """Passes through to `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only)."""
  if jax.default_backend() != "gpu":
    raise ValueError("implementation='cudnn' needs a GPU backend; got " + jax.default_backend())
  if mask.window is not None or mask.q_segment_ids is not None or mask.q_lengths is not None:
    raise ValueError("implementation='cudnn' supports causal, kv_lengths and bias masks only here")
  if mask.causal and mask.q_len != mask.kv_len:
    raise ValueError("implementation='cudnn' needs Tq == Tk for causal masks")
  if bias is not None:
    bias = bias.astype(q.dtype)  # cuDNN takes the bias in the inputs' dtype (it computes in it)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=mask.causal,
                                      key_value_seq_lengths=mask.kv_lengths,
                                      implementation="cudnn")
