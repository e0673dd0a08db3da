"""Block ranges of the Mosaic GPU kernels: which K/V steps (forward, dQ) or query tiles (dK/dV) a CTA
and each of its 64-row warpgroups visit, and which of them need no mask.

Scalar int32 arithmetic that lowers both for the GPU and in interpret mode. The CTA ranges equal the
portable kernels' (`portable.kv_block_range`, `portable.q_block_range`); tests/attention/
test_flash_mosaic_gpu.py checks that, and that the warpgroup ranges cover every visible pair.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxlab.attention.flash.mosaic_gpu.common import WG_ROWS
from jaxlab.attention.flash.portable import KernelConfig, _band


def _fdiv(x, d: int, bias: int):
  """floor(x / d) for int32 x >= -bias * d, with a non-negative truncating division only."""
  return lax.div(x + bias * d, jnp.int32(d)) - bias


def _bias(cfg: KernelConfig, tqp: int, tkp: int) -> int:
  left, r = _band(cfg)
  return (tqp + tkp + abs(left or 0) + abs(r or 0)) // min(cfg.block_k, WG_ROWS) + 4


def cta_kv_range(cfg: KernelConfig, i, nk: int, tqp: int, tkp: int):
  """[lo, hi) of K/V blocks that query block i (block_q rows) can see; equals `portable.kv_block_range`."""
  left, r = _band(cfg)
  bq, bk, off = cfg.block_q, cfg.block_k, cfg.offset
  bias = _bias(cfg, tqp, tkp)
  i = jnp.asarray(i, jnp.int32)
  lo, hi = jnp.int32(0), jnp.int32(nk)
  if left is not None:
    lo = jnp.clip(_fdiv(i * bq + (off - left), bk, bias), 0, nk)
  if r is not None:
    last_q = jnp.minimum(i * bq + (bq - 1), cfg.q_len - 1)
    hi = jnp.clip(_fdiv(last_q + (off + r + bk), bk, bias), 0, nk)
    hi = jnp.maximum(hi, lo)
  return lo, hi


def wg_kv_ranges(cfg: KernelConfig, row0, lo_c, hi_c, tqp: int, tkp: int):
  """K/V step ranges of the warpgroup owning query rows [row0, row0 + 64), inside the CTA's [lo_c, hi_c).

  Returns (lo, flo, fhi, hi): steps [lo, hi) hold a visible pair for some of these rows (others are
  bookkeeping only); steps [flo, fhi) (lo <= flo <= fhi <= hi) are fully visible to all 64 rows, padded
  rows included, so they need no mask: inside the band, before the ragged key tail, no segment ids.
  """
  left, r = _band(cfg)
  bk, off = cfg.block_k, cfg.offset
  bias = _bias(cfg, tqp, tkp)
  row0 = jnp.asarray(row0, jnp.int32)
  lo, hi = lo_c, hi_c
  if left is not None:
    lo = jnp.clip(_fdiv(row0 + (off - left), bk, bias), lo_c, hi_c)
  if r is not None:
    last_q = jnp.minimum(row0 + (WG_ROWS - 1), cfg.q_len - 1)
    hi = jnp.clip(_fdiv(last_q + (off + r + bk), bk, bias), lo, hi_c)
  if cfg.has_segments:
    return lo, hi, hi, hi
  # Interior: every key of the tile below kv_len, <= the first row's position + r, >= the last row's
  # position - left.
  fhi = jnp.minimum(hi, cfg.kv_len // bk)
  if r is not None:
    fhi = jnp.minimum(fhi, _fdiv(row0 + (off + r + 1), bk, bias))
  flo = lo
  if left is not None:
    flo = jnp.maximum(lo, -_fdiv(-(row0 + (WG_ROWS - 1 + off - left)), bk, bias))
  flo = jnp.minimum(flo, hi)
  fhi = jnp.clip(fhi, flo, hi)
  return lo, flo, fhi, hi



def cta_q_range(cfg: KernelConfig, j, nq: int, tqp: int, tkp: int):
  """[lo, hi) of query blocks that can see key block j; equals `portable.q_block_range`."""
  left, r = _band(cfg)
  bq, bk, off = cfg.block_q, cfg.block_k, cfg.offset
  bias = _bias(cfg, tqp, tkp)
  j = jnp.asarray(j, jnp.int32)
  lo, hi = jnp.int32(0), jnp.int32(nq)
  if r is not None:
    lo = jnp.clip(_fdiv(j * bk - (off + r), bq, bias), 0, nq)
  if left is not None:
    last_k = jnp.minimum(j * bk + (bk - 1), cfg.kv_len - 1)
    hi = jnp.clip(_fdiv(last_k + (left + bq - off), bq, bias), 0, nq)
    hi = jnp.maximum(hi, lo)
  return lo, hi


def wg_q_ranges(cfg: KernelConfig, col0, lo_c, hi_c, tqp: int, tkp: int):
  """Query-tile ranges of the dK/dV warpgroup owning keys [col0, col0 + 64), inside [lo_c, hi_c).

  (lo, flo, fhi, hi) as `wg_kv_ranges`, transposed: tiles [lo, hi) hold a visible pair for some of
  these keys; tiles [flo, fhi) are fully visible (every query row of the tile, padded ones included, sees
  all 64 keys, which lie below kv_len; no segment ids), so they need no mask.
  """
  left, r = _band(cfg)
  bq, off = cfg.block_q, cfg.offset
  bias = _bias(cfg, tqp, tkp)
  col0 = jnp.asarray(col0, jnp.int32)
  lo, hi = lo_c, hi_c
  if r is not None:
    lo = jnp.clip(_fdiv(col0 - (off + r), bq, bias), lo_c, hi_c)
  if left is not None:
    last_k = jnp.minimum(col0 + (WG_ROWS - 1), cfg.kv_len - 1)
    hi = jnp.clip(_fdiv(last_k + (left + bq - off), bq, bias), lo, hi_c)
  if cfg.has_segments:
    return lo, hi, hi, hi
  flo, fhi = lo, hi
  if r is not None:  # the tile's first row sees the last key: i * bq + off + r >= col0 + 63
    flo = jnp.maximum(lo, -_fdiv(-(col0 + (WG_ROWS - 1) - off - r), bq, bias))
  if left is not None:  # the tile's last row sees the first key: i * bq + bq - 1 + off - left <= col0
    fhi = jnp.minimum(hi, _fdiv(col0 + (left - off - bq + 1), bq, bias) + 1)
  fhi = jnp.where(col0 + WG_ROWS <= cfg.kv_len, fhi, flo)  # the ragged key tail needs the mask
  flo = jnp.minimum(flo, hi)
  fhi = jnp.clip(fhi, flo, hi)
  return lo, flo, fhi, hi

