"""Memory-efficient blockwise softmax attention with a recomputing backward pass.

Computes exactly what `jaxlab.attention.softmax.xla_attention` computes, without ever materialising the
[B, N, Tq, Tk] logits:

* Rabe & Staats 2021, "Self-attention does not need O(n^2) memory" (arXiv:2112.05682): split queries and
  keys/values into blocks and combine the per-block softmax statistics.
* Dao et al. 2022, "FlashAttention: fast and memory-efficient exact attention with IO-awareness"
  (arXiv:2205.14135): online softmax with a running max and running sum per query row; the forward saves
  only the output and the per-row logsumexp, and the backward recomputes the probabilities tile by tile.
* Dao 2023, "FlashAttention-2" (arXiv:2307.08691): backward loop order (outer over key/value blocks,
  inner over query blocks) with D = rowsum(dO * O) and dS = P * (dP - D).

Shapes (the jaxlab attention contract, layout of `jax.nn.dot_product_attention`):
  q: [B, Tq, N, H]; k, v: [B, Tk, K, H] with N % K == 0 (GQA/MQA: query heads are grouped as
  [B, T, K, G, H] with G = N // K, K/V are never repeated); bias: broadcastable to [B, N, Tq, Tk] or
  None; output: [B, Tq, N, H] in q's dtype. Softmax statistics and accumulators are float32.

Memory: besides the inputs, outputs and their gradients, the working set is O(B * N * block_q * block_k)
for one tile plus O(B * N * Tq) float32 row statistics. The bias gradient (when a bias is given) is
accumulated at the bias's own shape, which the caller has already materialised.

Tiles that the causal/window structure of the mask provably hides are skipped (the loop bounds over
blocks depend on the block index); masks that depend on data (segment ids, lengths) are evaluated per tile
with `AttentionMask.block`, which also masks the padding added to reach a multiple of the block size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlab.attention import masks as masks_lib

# Finite stand-in for -inf (as in the reference): the running max starts here and masked logits are set
# here, so differences of two such values are 0 rather than NaN (-inf - -inf).
_NEG = masks_lib.MASKED_LOGIT
# Block sizes are clipped to the lengths rounded up to this multiple, so tiny inputs stay tiny.
_ROUND = 8


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _check_block(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


class _Static(NamedTuple):
  """Hashable, non-differentiable configuration (custom_vjp nondiff_argnums)."""
  mask: masks_lib.AttentionMask  # with every array-valued field replaced by None
  scale: float
  block_q: int
  block_k: int
  soft_cap: Optional[float] = None


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: masks_lib.AttentionMask, *,
                        bias: Optional[jax.Array] = None, scale: float, block_q: int = 128,
                        block_k: int = 128, soft_cap: Optional[float] = None) -> jax.Array:
  """Softmax attention in blocks; same arguments and result as `xla_attention`.

  Args:
    q: [B, Tq, N, H] queries. k, v: [B, Tk, K, H] keys/values, N % K == 0.
    mask: `AttentionMask` for (Tq, Tk), e.g. from `masks.make_mask`.
    bias: broadcastable to [B, N, Tq, Tk], added to the scaled logits; or None.
    scale: logit scale (static Python float).
    soft_cap: if given, logits (after scale and bias) become soft_cap * tanh(logits / soft_cap).
    block_q, block_k: tile sizes along Tq and Tk (static positive ints); clipped to the lengths rounded
      up to a multiple of 8. Lengths need not be multiples of the block sizes.

  Returns:
    [B, Tq, N, H] in q's dtype; rows that see no key are exactly zero (and get zero gradients).
  """
  # Imported here, not at module level, so that softmax.py may import this module at its top.
  from jaxlab.attention.softmax import check_bias, check_qkv, check_soft_cap

  b, tq, tk, n, kh, h = check_qkv(q, k, v)
  check_soft_cap(soft_cap)
  block_q = _check_block("block_q", block_q)
  block_k = _check_block("block_k", block_k)
  masks_lib.check_mask_fits(mask, b, tq, tk)
  try:
    scale = float(scale)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(f"scale must be a static Python float, got {scale!r}") from None
  bq = min(block_q, _round_up(tq, _ROUND))
  bk = min(block_k, _round_up(tk, _ROUND))
  tqp, tkp = _round_up(tq, bq), _round_up(tk, bk)
  g = n // kh

  # Padding and the GQA reshape live outside the custom_vjp, so JAX differentiates them itself (the
  # transpose of a pad is a slice). Padded rows/columns are masked by `mask.block`, which evaluates the
  # mask on indices past the true lengths as "may not attend".
  pad_t = lambda x, t, tp: x if t == tp else jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
  q5 = pad_t(q, tq, tqp).reshape(b, tqp, kh, g, h)
  kp, vp = pad_t(k, tk, tkp), pad_t(v, tk, tkp)

  bias4 = None
  if bias is not None:
    bias4 = check_bias(bias, b, n, tq, tk)
    pads = [(0, 0), (0, 0), (0, tqp - tq if bias4.shape[2] > 1 else 0),
            (0, tkp - tk if bias4.shape[3] > 1 else 0)]
    if any(p[1] for p in pads):
      bias4 = jnp.pad(bias4, pads)

  # The mask holds integer arrays (segment ids, lengths) that are not differentiable and may be traced,
  # so they cannot go into nondiff_argnums (which must be hashable and static). We split the mask: the
  # static description (lengths, causal, window) goes into the hashable `_Static` nondiff argument, and
  # the arrays travel as an ordinary primal pytree argument whose cotangents the backward returns as
  # None (custom_vjp accepts None for "zero cotangent", which for integer inputs means float0 zeros).
  arrays = {f.name: jnp.asarray(getattr(mask, f.name)) for f in dataclasses.fields(mask)
            if getattr(mask, f.name) is not None and hasattr(getattr(mask, f.name), "shape")}
  static_mask = dataclasses.replace(mask, **{name: None for name in arrays})
  static = _Static(static_mask, scale, bq, bk, None if soft_cap is None else float(soft_cap))

  out = _attention(static, q5, kp, vp, bias4, arrays)
  return out.reshape(b, tqp, n, h)[:, :tq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static: _Static, q, k, v, bias, arrays):
  """On padded inputs: q [B, Tqp, K, G, H], k/v [B, Tkp, K, H], bias [Bb, Nb, Tqb, Tkb] or None."""
  return _forward(static, q, k, v, bias, arrays)[0].astype(q.dtype)


def _attention_fwd(static, q, k, v, bias, arrays):
  out, lse = _forward(static, q, k, v, bias, arrays)
  # Residuals: the inputs, the float32 output and row logsumexp [B, K, G, Tqp] (= [B, N, Tqp]). The
  # output is kept in float32 for D = rowsum(dO * O) in the backward pass: from a 16-bit O, its
  # rounding shows in dS = P (dP - D) where attention is peaked (dP_ij ~ D_i), up to ~12x xla's dQ/dK
  # error there (the Pallas kernels do take D from the 16-bit O, as FlashAttention-2 does).
  return out.astype(q.dtype), (q, k, v, bias, arrays, out, lse)


def _block_ranges(static: _Static, nq: int, nk: int):
  """Functions giving [lo, hi) block ranges that can hold visible tiles, from causal/window alone.

  Query i sees key j only if i' - left <= j <= i' + r, i' = i + (Tk - Tq), r = 0 if causal else right.
  Bounds that the mask does not constrain are the full range as Python ints (a plain scan).
  """
  mask = static.mask
  off = mask.offset
  left, right = mask.window if mask.window is not None else (None, None)
  r = 0 if mask.causal else right
  bq, bk = static.block_q, static.block_k

  def kv_range(i):
    lo, hi = 0, nk
    if left is not None:
      lo = jnp.clip((i * bq + off - left) // bk, 0, nk)
    if r is not None:
      last_q = jnp.minimum(i * bq + bq - 1, mask.q_len - 1)
      hi = jnp.clip(-(-(last_q + off + r + 1) // bk), 0, nk)
    if left is not None or r is not None:
      hi = jnp.maximum(hi, lo)
    return lo, hi

  def q_range(j):
    lo, hi = 0, nq
    if r is not None:
      lo = jnp.clip((j * bk - off - r) // bq, 0, nq)
    if left is not None:
      last_k = jnp.minimum(j * bk + bk - 1, mask.kv_len - 1)
      hi = jnp.clip(-(-(last_k - off + left + 1) // bq), 0, nq)
    if left is not None or r is not None:
      hi = jnp.maximum(hi, lo)
    return lo, hi

  return kv_range, q_range


def _bias_tile(bias, qs, ks, bq, bk, kh):
  """The bias for one tile, shaped to broadcast against logits [B, K, G, bq, bk]."""
  from jaxlab.attention.softmax import float32_bias
  bb, nb, tqb, tkb = bias.shape
  tile = lax.dynamic_slice(bias, (0, 0, qs if tqb > 1 else 0, ks if tkb > 1 else 0),
                           (bb, nb, bq if tqb > 1 else 1, bk if tkb > 1 else 1))
  tile = float32_bias(tile)
  if nb == 1:
    return tile[:, :, None]  # [Bb, 1, 1, tq', tk']
  return tile.reshape(bb, kh, nb // kh, tile.shape[2], tile.shape[3])


def _add_bias_grad(dbias, ds, qs, ks):
  """Reduces the logits gradient ds [B, K, G, bq, bk] over bias's broadcast dims and adds it in place."""
  bb, nb, tqb, tkb = dbias.shape
  b, kh, g = ds.shape[:3]
  ds = ds.reshape(b, kh * g, ds.shape[3], ds.shape[4])
  axes = tuple(ax for ax, size in enumerate((bb, nb, tqb, tkb)) if size == 1 and ds.shape[ax] != 1)
  if axes:
    ds = ds.sum(axis=axes, keepdims=True)
  start = (0, 0, qs if tqb > 1 else 0, ks if tkb > 1 else 0)
  return lax.dynamic_update_slice(dbias, lax.dynamic_slice(dbias, start, ds.shape) + ds, start)


def _tile_logits(static, mask, qb, kb, bias, qs, ks):
  """Scaled logits [B, K, G, bq, bk] (float32) with the mask applied, and the validity mask."""
  bq, bk = static.block_q, static.block_k
  s = jnp.einsum("bqkgh,bskh->bkgqs", qb, kb, preferred_element_type=jnp.float32) * static.scale
  if bias is not None:
    s = s + _bias_tile(bias, qs, ks, bq, bk, kb.shape[2])
  valid = mask.block(qs + jnp.arange(bq), ks + jnp.arange(bk))[:, :, None]  # [B|1, 1, 1, bq, bk]
  if static.soft_cap is not None:
    valid = valid & (s > _NEG)  # a -inf / finfo.min bias masks; the cap would make it -c
    s = static.soft_cap * jnp.tanh(s / static.soft_cap)
  return jnp.where(valid, s, _NEG), valid


def _forward(static: _Static, q, k, v, bias, arrays):
  mask = dataclasses.replace(static.mask, **arrays)
  b, tqp, kh, g, h = q.shape
  tkp = k.shape[1]
  bq, bk = static.block_q, static.block_k
  nq, nk = tqp // bq, tkp // bk
  kv_range, _ = _block_ranges(static, nq, nk)

  def q_block(i):
    qs = i * bq
    qb = lax.dynamic_slice_in_dim(q, qs, bq, axis=1)

    def kv_step(j, carry):
      m, l, acc = carry
      ks = j * bk
      kb = lax.dynamic_slice_in_dim(k, ks, bk, axis=1)
      vb = lax.dynamic_slice_in_dim(v, ks, bk, axis=1)
      s, valid = _tile_logits(static, mask, qb, kb, bias, qs, ks)
      # m stays finite (>= _NEG), so the rescaling factor exp(m - m_new) is never NaN; a row whose keys
      # are all masked so far keeps m = _NEG, l = 0, acc = 0.
      m_new = jnp.maximum(m, s.max(axis=-1))
      alpha = jnp.exp(m - m_new)
      p = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)
      l = alpha * l + p.sum(axis=-1)
      acc = alpha[..., None] * acc + jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), vb,
                                                preferred_element_type=jnp.float32)
      return m_new, l, acc

    init = (jnp.full((b, kh, g, bq), _NEG, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, h), jnp.float32))
    lo, hi = kv_range(i)
    m, l, acc = lax.fori_loop(lo, hi, kv_step, init)
    # A row that sees no key has l == 0 and acc == 0: its output is exactly 0 and its lse is _NEG.
    l_safe = jnp.where(l > 0, l, 1.0)
    out = acc / l_safe[..., None]  # float32 (callers cast it to q's dtype)
    lse = m + jnp.log(l_safe)
    return jnp.moveaxis(out, 3, 1), lse  # [B, bq, K, G, H], [B, K, G, bq]

  outs, lses = lax.map(q_block, jnp.arange(nq))
  out = jnp.moveaxis(outs, 0, 1).reshape(b, tqp, kh, g, h)
  lse = jnp.moveaxis(lses, 0, 3).reshape(b, kh, g, tqp)
  return out, lse


def _attention_bwd(static: _Static, res, d_out):
  q, k, v, bias, arrays, out, lse = res
  mask = dataclasses.replace(static.mask, **arrays)
  b, tqp, kh, g, h = q.shape
  tkp = k.shape[1]
  bq, bk = static.block_q, static.block_k
  nq, nk = tqp // bq, tkp // bk
  _, q_range = _block_ranges(static, nq, nk)
  scale = static.scale
  d_out = d_out.astype(q.dtype)
  # D_i = sum_h dO_ih O_ih = sum_j P_ij dP_ij  (FlashAttention-2, Algorithm 2), [B, K, G, Tqp].
  delta = jnp.einsum("bqkgh,bqkgh->bkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def kv_block(carry, j):
    ks = j * bk
    kb = lax.dynamic_slice_in_dim(k, ks, bk, axis=1)
    vb = lax.dynamic_slice_in_dim(v, ks, bk, axis=1)

    def q_step(i, c):
      dk, dv, dq, dbias = c
      qs = i * bq
      qb = lax.dynamic_slice_in_dim(q, qs, bq, axis=1)
      dob = lax.dynamic_slice_in_dim(d_out, qs, bq, axis=1)
      lse_b = lax.dynamic_slice_in_dim(lse, qs, bq, axis=3)
      delta_b = lax.dynamic_slice_in_dim(delta, qs, bq, axis=3)
      s, valid = _tile_logits(static, mask, qb, kb, bias, qs, ks)
      p = jnp.where(valid, jnp.exp(s - lse_b[..., None]), 0.0)  # [B, K, G, bq, bk]
      dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(d_out.dtype), dob,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqkgh,bskh->bkgqs", dob, vb, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_b[..., None])  # gradient of the (scaled + biased [+ capped]) logits
      if static.soft_cap is not None:  # through c * tanh(x / c): times 1 - tanh^2 = 1 - (s / c)^2
        ds = jnp.where(valid, ds * (1.0 - jnp.square(s / static.soft_cap)), 0.0)
      if dbias is not None:
        dbias = _add_bias_grad(dbias, ds, qs, ks)
      dsc = ds.astype(q.dtype)
      dq_tile = jnp.einsum("bkgqs,bskh->bqkgh", dsc, kb, preferred_element_type=jnp.float32)
      dq = lax.dynamic_update_slice_in_dim(
          dq, lax.dynamic_slice_in_dim(dq, qs, bq, axis=1) + scale * dq_tile, qs, axis=1)
      dk = dk + scale * jnp.einsum("bkgqs,bqkgh->bskh", dsc, qb, preferred_element_type=jnp.float32)
      return dk, dv, dq, dbias

    dq, dbias = carry
    zeros_kv = jnp.zeros((b, bk, kh, h), jnp.float32)
    lo, hi = q_range(j)
    dk, dv, dq, dbias = lax.fori_loop(lo, hi, q_step, (zeros_kv, zeros_kv, dq, dbias))
    return (dq, dbias), (dk.astype(k.dtype), dv.astype(v.dtype))

  dq0 = jnp.zeros(q.shape, jnp.float32)
  dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
  (dq, dbias), (dks, dvs) = lax.scan(kv_block, (dq0, dbias0), jnp.arange(nk))
  dk = jnp.moveaxis(dks, 0, 1).reshape(k.shape)
  dv = jnp.moveaxis(dvs, 0, 1).reshape(v.shape)
  if dbias is not None:
    dbias = dbias.astype(bias.dtype)
  no_grad = {name: None for name in arrays}  # integer mask arrays: zero (float0) cotangents
  return dq.astype(q.dtype), dk, dv, dbias, no_grad


_attention.defvjp(_attention_fwd, _attention_bwd)
