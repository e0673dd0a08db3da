"""Mosaic TPU FlashAttention-2 kernels: forward, dQ and dK/dV, pipelined over key/value (or query) blocks.

Same algorithm and masks as `portable.py` (Dao 2023, arXiv:2307.08691), shaped for Mosaic TPU: the
reduction over key/value blocks (forward, dQ) or query blocks (dK/dV) is a trailing "arbitrary" grid
dimension, so Pallas' TPU pipeline double-buffers the HBM->VMEM copies of the next tile while the MXU
works on this one; running max/sum and accumulators live in VMEM scratch across those grid steps.

Skipping: for causal/window masks a grid step outside the visible band does no compute (`pl.when`), and
its K/V (or Q/dO) index_map is clamped into the band, so the pipeline sees an unchanged block index and
issues no copy either. Segment ids are laid out [B, Tq, 1] and [B, 1, Tk] so that a tile compares a
[bq, 1] column with a [1, bk] row (TPU vregs are (8, 128) tiles; no in-kernel transposes).

On CPU these kernels run in TPU interpret mode (`pltpu.InterpretParams()`), which is how the tests check
them against XLA; they also lower for TPU on a CPU machine. They have NOT been run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxlab.attention.flash.portable import (_NEG, KernelConfig, _dot, _dot_nt, _dot_tn,
                                              _tile_valid, kv_block_range, q_block_range, scores,
                                              uncap)


def _interpret(cfg: KernelConfig):
  return pltpu.InterpretParams() if cfg.interpret else False


def _params(n_parallel: int, n_arbitrary: int):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def _clamp(j, lo, hi):
  """j clamped into [lo, hi - 1] (to lo when the range is empty): the block the pipeline keeps."""
  return jnp.maximum(jnp.minimum(j, hi - 1), lo)


def _seg_specs(cfg, q_map, k_map, bq_or_t, bk_or_t):
  return [pl.BlockSpec((None, bq_or_t, 1), q_map), pl.BlockSpec((None, 1, bk_or_t), k_map)]


def _tpu_segments(q_seg, kv_seg):
  return q_seg[:, :, None], kv_seg[:, None, :]


# ----------------------------------------------------------------------------------------------------
# Forward: grid (B, N, nq, nk), nk the reduction.

def _fwd_kernel(*refs, cfg: KernelConfig, nk: int):
  if cfg.has_segments:
    q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
  i, j = pl.program_id(2), pl.program_id(3)
  lo, hi = kv_block_range(cfg, i, nk)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, _NEG, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when((j >= lo) & (j < hi))
  def _tile():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    segs = (qseg_ref[...], kseg_ref[...]) if cfg.has_segments else (None, None)
    valid = _tile_valid(cfg, i * cfg.block_q, j * cfg.block_k, *segs)
    s = jnp.where(valid, scores(cfg, q, k), _NEG)
    m = m_scr[...]
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
    l_scr[...] = alpha * l_scr[...] + p.sum(axis=1, keepdims=True)
    acc_scr[...] = alpha * acc_scr[...] + _dot(p.astype(v.dtype), v)
    m_scr[...] = m_new

  @pl.when(j == nk - 1)
  def _finish():
    l = l_scr[...]
    l_safe = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (acc_scr[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = m_scr[...] + jnp.log(l_safe)


def forward(cfg: KernelConfig, q, k, v, q_seg, kv_seg):
  """q [B, N, Tqp, H], k/v [B, K, Tkp, H], segs [B, Tqp] / [B, Tkp] or None -> (o, lse [B, N, Tqp])."""
  b, n, tqp, h = q.shape
  kh, tkp = k.shape[1], k.shape[2]
  g = n // kh
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = tqp // bq, tkp // bk

  def kv_map(bi, ni, i, j):
    return (bi, ni // g, _clamp(j, *kv_block_range(cfg, i, nk)), 0)

  row = pl.BlockSpec((None, None, bq, h), lambda bi, ni, i, j: (bi, ni, i, 0))
  in_specs = [row, pl.BlockSpec((None, None, bk, h), kv_map), pl.BlockSpec((None, None, bk, h), kv_map)]
  args = [q, k, v]
  if cfg.has_segments:
    in_specs += _seg_specs(cfg, lambda bi, ni, i, j: (bi, i, 0),
                           lambda bi, ni, i, j: (bi, 0, kv_map(bi, ni, i, j)[2]), bq, bk)
    args += list(_tpu_segments(q_seg, kv_seg))
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, nk=nk),
      grid=(b, n, nq, nk),
      in_specs=in_specs,
      out_specs=[row, pl.BlockSpec((None, None, bq, 1), lambda bi, ni, i, j: (bi, ni, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, tqp, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, h), jnp.float32)],
      compiler_params=_params(3, 1),
      interpret=_interpret(cfg),
      name="jaxlab_flash_fwd_tpu",
  )(*args)
  return o, lse[..., 0]


# ----------------------------------------------------------------------------------------------------
# dQ: grid (B, N, nq, nk), nk the reduction.

def _dq_kernel(*refs, cfg: KernelConfig, nk: int):
  if cfg.has_segments:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref, dq_scr = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr = refs
  i, j = pl.program_id(2), pl.program_id(3)
  lo, hi = kv_block_range(cfg, i, nk)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when((j >= lo) & (j < hi))
  def _tile():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    segs = (qseg_ref[...], kseg_ref[...]) if cfg.has_segments else (None, None)
    valid = _tile_valid(cfg, i * cfg.block_q, j * cfg.block_k, *segs)
    s = scores(cfg, q, k)
    p = jnp.where(valid, jnp.exp(s - lse_ref[...]), 0.0)
    ds = uncap(cfg, s, p * (_dot_nt(do, v) - delta_ref[...]))
    dq_scr[...] += _dot(ds.astype(k.dtype), k)

  @pl.when(j == nk - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def backward_dq(cfg: KernelConfig, q, k, v, do, lse, delta, q_seg, kv_seg):
  b, n, tqp, h = q.shape
  kh, tkp = k.shape[1], k.shape[2]
  g = n // kh
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = tqp // bq, tkp // bk

  def kv_map(bi, ni, i, j):
    return (bi, ni // g, _clamp(j, *kv_block_range(cfg, i, nk)), 0)

  row = pl.BlockSpec((None, None, bq, h), lambda bi, ni, i, j: (bi, ni, i, 0))
  kv = pl.BlockSpec((None, None, bk, h), kv_map)
  stat = pl.BlockSpec((None, None, bq, 1), lambda bi, ni, i, j: (bi, ni, i, 0))
  in_specs = [row, kv, kv, row, stat, stat]
  args = [q, k, v, do, lse[..., None], delta[..., None]]
  if cfg.has_segments:
    in_specs += _seg_specs(cfg, lambda bi, ni, i, j: (bi, i, 0),
                           lambda bi, ni, i, j: (bi, 0, kv_map(bi, ni, i, j)[2]), bq, bk)
    args += list(_tpu_segments(q_seg, kv_seg))
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, nk=nk),
      grid=(b, n, nq, nk),
      in_specs=in_specs,
      out_specs=row,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
      compiler_params=_params(3, 1),
      interpret=_interpret(cfg),
      name="jaxlab_flash_bwd_dq_tpu",
  )(*args)


# ----------------------------------------------------------------------------------------------------
# dK, dV: grid (B, K, nk, G, nq); the G query heads of the group and the query blocks are the reduction.

def _dkdv_kernel(*refs, cfg: KernelConfig, nq: int, groups: int):
  if cfg.has_segments:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref,
     dk_scr, dv_scr) = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
  j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  lo, hi = q_block_range(cfg, j, nq)

  @pl.when((gi == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when((i >= lo) & (i < hi))
  def _tile():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    segs = (qseg_ref[...], kseg_ref[...]) if cfg.has_segments else (None, None)
    valid = _tile_valid(cfg, i * cfg.block_q, j * cfg.block_k, *segs)
    s = scores(cfg, q, k)
    p = jnp.where(valid, jnp.exp(s - lse_ref[...]), 0.0)
    dv_scr[...] += _dot_tn(p.astype(do.dtype), do)
    ds = uncap(cfg, s, p * (_dot_nt(do, v) - delta_ref[...]))
    dk_scr[...] += _dot_tn(ds.astype(q.dtype), q)

  @pl.when((gi == groups - 1) & (i == nq - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward_dkdv(cfg: KernelConfig, q, k, v, do, lse, delta, q_seg, kv_seg):
  b, n, tqp, h = q.shape
  kh, tkp = k.shape[1], k.shape[2]
  g = n // kh
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = tqp // bq, tkp // bk

  def q_block(j, i):
    return _clamp(i, *q_block_range(cfg, j, nq))

  row = pl.BlockSpec((None, None, bq, h), lambda bi, ki, j, gi, i: (bi, ki * g + gi, q_block(j, i), 0))
  stat = pl.BlockSpec((None, None, bq, 1),
                      lambda bi, ki, j, gi, i: (bi, ki * g + gi, q_block(j, i), 0))
  kv = pl.BlockSpec((None, None, bk, h), lambda bi, ki, j, gi, i: (bi, ki, j, 0))
  in_specs = [row, kv, kv, row, stat, stat]
  args = [q, k, v, do, lse[..., None], delta[..., None]]
  if cfg.has_segments:
    in_specs += _seg_specs(cfg, lambda bi, ki, j, gi, i: (bi, q_block(j, i), 0),
                           lambda bi, ki, j, gi, i: (bi, 0, j), bq, bk)
    args += list(_tpu_segments(q_seg, kv_seg))
  return pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg, nq=nq, groups=g),
      grid=(b, kh, nk, g, nq),
      in_specs=in_specs,
      out_specs=[kv, kv],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)],
      compiler_params=_params(3, 2),
      interpret=_interpret(cfg),
      name="jaxlab_flash_bwd_dkdv_tpu",
  )(*args)
