"""Portable Pallas FlashAttention-2 kernels: forward, dQ and dK/dV.

Written against the backend-neutral Pallas API (`pl.pallas_call`, BlockSpecs, refs, `lax.fori_loop`), so
the same kernels lower through Triton on any CUDA GPU (the "portable" GPU path) and run exactly on CPU in
Pallas interpret mode, which is how the tests check them against `implementation="xla"`.

Algorithm: Dao 2023, "FlashAttention-2" (arXiv:2307.08691), Algorithms 1 and 2.

Layout inside this module is [B, N, T, H] (heads before length, one (batch, head) slab per program);
the public wrapper in `jaxlab.attention.flash` transposes from the contract's [B, T, N, H].

* forward, grid (B, N, Tq/bq): one query block per program, a loop over the key/value blocks it can see,
  online softmax with float32 running max m, running sum l and accumulator acc [bq, H]; writes
  O = acc / l and the row logsumexp lse = m + log l (float32) for the backward.
* dQ, grid (B, N, Tq/bq): recomputes P = exp(S - lse) tile by tile; dS = P * (dP - D) with
  D = rowsum(dO * O); dQ = scale * dS K.
* Logit soft cap (Gemma 2; `KernelConfig.soft_cap` = c): S = c * tanh(scale * Q K^T / c) in every
  pass, and the backward multiplies dS by the cap's derivative 1 - (S / c)^2 (`scores`, `uncap`).
* dK/dV, grid (B, K, Tk/bk): one key/value block per program, a loop over the query heads of its group
  (GQA) and over the query blocks that can see it; dV = P^T dO, dK = scale * dS^T Q.

dQ has its own pass instead of atomic adds into a shared dQ from the dK/dV pass: it costs one more
recomputation of S and P (about 20% more backward FLOPs) but is deterministic, needs no float atomics
(which TPU and interpret mode do not have), and keeps each program's writes disjoint.

Masks: causal and sliding-window bounds shrink the key/value loop (forward, dQ) and the query loop
(dK/dV) to the blocks inside the band, so fully hidden tiles are never computed. Segment ids (into which
the wrapper folds valid lengths and padding) and the ragged tail are evaluated per tile. GQA/MQA: the K/V
BlockSpec maps query head n to key/value head n // G; K/V are never repeated in memory.
No array larger than one [bq, bk] tile is ever formed (besides O(T * H) inputs and outputs).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxlab.attention import masks as masks_lib

# Finite stand-in for -inf, as in blockwise.py: exp(_NEG - m) underflows to 0 and _NEG - _NEG is 0, not NaN.
_NEG = masks_lib.MASKED_LOGIT


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static (hashable) description of one kernel launch."""
  q_len: int          # true lengths (before padding to the blocks)
  kv_len: int
  causal: bool
  window: masks_lib.Window
  has_segments: bool
  scale: float
  block_q: int
  block_k: int
  interpret: bool
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None
  soft_cap: Optional[float] = None  # logits c * tanh(s / c) (Gemma 2), or None

  @property
  def offset(self) -> int:
    return self.kv_len - self.q_len

  def compiler_params(self):
    if self.interpret or self.num_warps is None:
      return None
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _band(cfg: KernelConfig):
  """(left, r): query i (key coordinate i' = i + Tk - Tq) sees keys i' - left <= j <= i' + r; None = open."""
  left, right = cfg.window if cfg.window is not None else (None, None)
  return left, (0 if cfg.causal else right)


def kv_block_range(cfg: KernelConfig, i, nk: int):
  """[lo, hi) of key/value blocks that query block i can see (from causal/window alone)."""
  left, r = _band(cfg)
  bq, bk, off = cfg.block_q, cfg.block_k, cfg.offset
  lo, hi = 0, nk
  if left is not None:
    lo = jnp.clip((i * bq + off - left) // bk, 0, nk)
  if r is not None:
    last_q = jnp.minimum(i * bq + bq - 1, cfg.q_len - 1)
    hi = jnp.clip((last_q + off + r + bk) // bk, 0, nk)
  if left is not None or r is not None:
    hi = jnp.maximum(hi, lo)
  return lo, hi


def q_block_range(cfg: KernelConfig, j, nq: int):
  """[lo, hi) of query blocks that can see key/value block j (from causal/window alone)."""
  left, r = _band(cfg)
  bq, bk, off = cfg.block_q, cfg.block_k, cfg.offset
  lo, hi = 0, nq
  if r is not None:
    lo = jnp.clip((j * bk - off - r) // bq, 0, nq)
  if left is not None:
    last_k = jnp.minimum(j * bk + bk - 1, cfg.kv_len - 1)
    hi = jnp.clip((last_k - off + left + bq) // bq, 0, nq)
  if left is not None or r is not None:
    hi = jnp.maximum(hi, lo)
  return lo, hi


def band_valid(cfg: KernelConfig, q_idx, k_idx):
  """Boolean, shape of q_idx/k_idx (query and key indices): inside the key tail and the causal/window
  band. Padded query rows are not masked here; the wrapper slices them off."""
  valid = k_idx < cfg.kv_len
  q_pos = q_idx + cfg.offset
  left, r = _band(cfg)
  if r is not None:
    valid = valid & (k_idx <= q_pos + r)
  if left is not None:
    valid = valid & (k_idx >= q_pos - left)
  return valid


def _tile_valid(cfg: KernelConfig, q_start, k_start, q_seg, k_seg):
  """Boolean [bq, bk]: which (query, key) pairs of the tile at (q_start, k_start) may attend."""
  shape = (cfg.block_q, cfg.block_k)
  valid = band_valid(cfg, q_start + lax.broadcasted_iota(jnp.int32, shape, 0),
                     k_start + lax.broadcasted_iota(jnp.int32, shape, 1))
  if q_seg is not None:  # [bq] and [bk], or already [bq, 1] and [1, bk] (the TPU kernels' layout)
    if q_seg.ndim == 1:
      q_seg, k_seg = q_seg[:, None], k_seg[None, :]
    valid = valid & (q_seg == k_seg)
  return valid


def scores(cfg: KernelConfig, q, k):
  """The tile's logits [bq, bk] float32: scale * q k^T, soft-capped to c * tanh(. / c) if cfg.soft_cap."""
  s = _dot_nt(q, k) * cfg.scale
  return s if cfg.soft_cap is None else cfg.soft_cap * jnp.tanh(s / cfg.soft_cap)


def uncap(cfg: KernelConfig, s, ds):
  """dL/d(scale * q k^T) from dL/ds for logits s of `scores`: the soft cap's derivative 1 - tanh^2,
  with tanh = s / c (the identity without a cap)."""
  return ds if cfg.soft_cap is None else ds * (1.0 - jnp.square(s / cfg.soft_cap))


def _dot_nt(a, b):
  """a [m, h] @ b[n, h]^T -> [m, n] float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a [m, n]^T @ b [m, h] -> [n, h] float32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------------
# Forward.

def _fwd_kernel(*refs, cfg: KernelConfig, nk: int):
  if cfg.has_segments:
    q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  bq, bk = cfg.block_q, cfg.block_k
  i = pl.program_id(2)
  q = q_ref[...]
  q_seg = qseg_ref[...] if cfg.has_segments else None

  def body(j, carry):
    m, l, acc = carry
    ks = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(ks, bk), :]
    v = v_ref[pl.ds(ks, bk), :]
    k_seg = kseg_ref[pl.ds(ks, bk)] if cfg.has_segments else None
    valid = _tile_valid(cfg, i * bq, ks, q_seg, k_seg)
    s = jnp.where(valid, scores(cfg, q, k), _NEG)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
    l = alpha * l + p.sum(axis=1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return m_new, l, acc

  h = q.shape[-1]
  init = (jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, h), jnp.float32))
  lo, hi = kv_block_range(cfg, i, nk)
  m, l, acc = lax.fori_loop(lo, hi, body, init)
  # A row that sees no key keeps l == 0 and acc == 0: output exactly 0, lse = _NEG (so P = 0 backward).
  l_safe = jnp.where(l > 0, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l_safe)


def forward(cfg: KernelConfig, q, k, v, q_seg, kv_seg):
  """q [B, N, Tqp, H], k/v [B, K, Tkp, H], segs [B, Tqp] / [B, Tkp] int32 or None.

  Returns (o [B, N, Tqp, H] in q's dtype, lse [B, N, Tqp] float32).
  """
  b, n, tqp, h = q.shape
  kh, tkp = k.shape[1], k.shape[2]
  g = n // kh
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = tqp // bq, tkp // bk
  in_specs = [
      pl.BlockSpec((None, None, bq, h), lambda bi, ni, i: (bi, ni, i, 0)),
      pl.BlockSpec((None, None, tkp, h), lambda bi, ni, i: (bi, ni // g, 0, 0)),
      pl.BlockSpec((None, None, tkp, h), lambda bi, ni, i: (bi, ni // g, 0, 0)),
  ]
  args = [q, k, v]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda bi, ni, i: (bi, i)),
                 pl.BlockSpec((None, tkp), lambda bi, ni, i: (bi, 0))]
    args += [q_seg, kv_seg]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, nk=nk),
      grid=(b, n, nq),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bq, h), lambda bi, ni, i: (bi, ni, i, 0)),
                 pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, tqp), jnp.float32)],
      interpret=cfg.interpret,
      compiler_params=cfg.compiler_params(),
      name="jaxlab_flash_fwd",
  )(*args)


# ----------------------------------------------------------------------------------------------------
# Backward: dQ.

def _dq_kernel(*refs, cfg: KernelConfig, nk: int):
  if cfg.has_segments:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
  bq, bk = cfg.block_q, cfg.block_k
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_seg = qseg_ref[...] if cfg.has_segments else None

  def body(j, dq):
    ks = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(ks, bk), :]
    v = v_ref[pl.ds(ks, bk), :]
    k_seg = kseg_ref[pl.ds(ks, bk)] if cfg.has_segments else None
    valid = _tile_valid(cfg, i * bq, ks, q_seg, k_seg)
    s = scores(cfg, q, k)
    p = jnp.where(valid, jnp.exp(s - lse[:, None]), 0.0)
    ds = uncap(cfg, s, p * (_dot_nt(do, v) - delta[:, None]))
    return dq + _dot(ds.astype(k.dtype), k)

  lo, hi = kv_block_range(cfg, i, nk)
  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def backward_dq(cfg: KernelConfig, q, k, v, do, lse, delta, q_seg, kv_seg):
  b, n, tqp, h = q.shape
  kh, tkp = k.shape[1], k.shape[2]
  g = n // kh
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = tqp // bq, tkp // bk
  row = pl.BlockSpec((None, None, bq, h), lambda bi, ni, i: (bi, ni, i, 0))
  kv = pl.BlockSpec((None, None, tkp, h), lambda bi, ni, i: (bi, ni // g, 0, 0))
  stat = pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i))
  in_specs = [row, kv, kv, row, stat, stat]
  args = [q, k, v, do, lse, delta]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda bi, ni, i: (bi, i)),
                 pl.BlockSpec((None, tkp), lambda bi, ni, i: (bi, 0))]
    args += [q_seg, kv_seg]
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, nk=nk),
      grid=(b, n, nq),
      in_specs=in_specs,
      out_specs=row,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=cfg.interpret,
      compiler_params=cfg.compiler_params(),
      name="jaxlab_flash_bwd_dq",
  )(*args)


# ----------------------------------------------------------------------------------------------------
# Backward: dK, dV.

def _dkdv_kernel(*refs, cfg: KernelConfig, nq: int, groups: int):
  if cfg.has_segments:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
     dk_ref, dv_ref) = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
  bq, bk = cfg.block_q, cfg.block_k
  j = pl.program_id(2)
  ks = j * bk
  k, v = k_ref[...], v_ref[...]
  k_seg = kseg_ref[...] if cfg.has_segments else None
  lo, hi = q_block_range(cfg, j, nq)

  def head(gi, carry):
    def body(i, carry):
      dk, dv = carry
      qs = pl.multiple_of(i * bq, bq)
      q = q_ref[gi, pl.ds(qs, bq), :]
      do = do_ref[gi, pl.ds(qs, bq), :]
      lse = lse_ref[gi, pl.ds(qs, bq)]
      delta = delta_ref[gi, pl.ds(qs, bq)]
      q_seg = qseg_ref[pl.ds(qs, bq)] if cfg.has_segments else None
      valid = _tile_valid(cfg, qs, ks, q_seg, k_seg)
      s = scores(cfg, q, k)
      p = jnp.where(valid, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bk]
      dv = dv + _dot_tn(p.astype(do.dtype), do)
      ds = uncap(cfg, s, p * (_dot_nt(do, v) - delta[:, None]))
      dk = dk + _dot_tn(ds.astype(q.dtype), q)
      return dk, dv
    return lax.fori_loop(lo, hi, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  # The G query heads that share this key/value head (GQA) accumulate into the same dK/dV block.
  dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkdv(cfg: KernelConfig, q, k, v, do, lse, delta, q_seg, kv_seg):
  b, n, tqp, h = q.shape
  kh, tkp = k.shape[1], k.shape[2]
  g = n // kh
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = tqp // bq, tkp // bk
  # Query-side inputs: the G heads of key/value head `ki` are heads ki*G .. ki*G + G - 1 (block ki of
  # size G along N), whole length.
  q_side = pl.BlockSpec((None, g, tqp, h), lambda bi, ki, j: (bi, ki, 0, 0))
  stat = pl.BlockSpec((None, g, tqp), lambda bi, ki, j: (bi, ki, 0))
  kv = pl.BlockSpec((None, None, bk, h), lambda bi, ki, j: (bi, ki, j, 0))
  in_specs = [q_side, kv, kv, q_side, stat, stat]
  args = [q, k, v, do, lse, delta]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, tqp), lambda bi, ki, j: (bi, 0)),
                 pl.BlockSpec((None, bk), lambda bi, ki, j: (bi, j))]
    args += [q_seg, kv_seg]
  return pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg, nq=nq, groups=g),
      grid=(b, kh, nk),
      in_specs=in_specs,
      out_specs=[kv, kv],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=cfg.interpret,
      compiler_params=cfg.compiler_params(),
      name="jaxlab_flash_bwd_dkdv",
  )(*args)
