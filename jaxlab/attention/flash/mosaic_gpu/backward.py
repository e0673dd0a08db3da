
"""Mosaic GPU (Hopper) FlashAttention backward (FlashAttention-2 Algorithm 2 as two deterministic passes, like `portable.py`; the same
contracts as `portable.backward_dq` / `backward_dkdv`: padded [B, N, T, H] inputs, lse and
delta = rowsum(dO * O) float32 [B, N, Tqp]). Both kernels keep the forward's organisation: one producer
warpgroup streams tiles by TMA through a `num_stages`-slot ring (a "full" barrier per copy and slot, one
"consumed" barrier per slot on which every compute warpgroup arrives), compute warpgroups of 64 rows
each hold their float32 accumulators in registers, and P = exp2(S log2 e * scale - lse log2 e) is
recomputed per tile. lse and delta travel together as one [2, 64] float32 tile per 64 query rows; rows
that contribute nothing (padding, rows that saw no key) get a huge lse so their P is exactly 0.
* dQ: one CTA per (query block of block_q rows, head, batch), block_q // 64 compute warpgroups; each
  TMA-loads its Q, dO, lse/delta tile once, the producer streams 64-row K/V tiles (kv head n // G) over
  the CTA's band (`cta_kv_range`). Per tile: S = Q K^T, dP = dO V^T (wgmma, K/V transposed by a ref
  transform), dS = P * (dP - delta), dQ += dS K (wgmma, dS in registers); dQ * scale at the end.
* dK/dV: one CTA per (key block of 128 keys, or 64 when the padded length is not a multiple of 128, kv
  head, batch), one compute warpgroup per 64 keys holding its K, V tile; the producer streams 64-row
  Q / dO / lse+delta (/ query segment id) tiles of every query head of the GQA group over the query
  tiles that can see the key block (`cta_q_range` = `portable.q_block_range`). Everything is computed
  transposed, so no register transpose is needed: S^T = K Q^T, P^T, dP^T = V dO^T, dV += P^T dO,
  dS^T = P^T * (dP^T - delta), dK += dS^T Q; dK * scale at the end.
* Masks as in the forward: tiles outside a warpgroup's band only keep the barrier protocol, edge tiles
  (band, ragged key tail, segment ids) use iota masks, interior tiles none (`wg_kv_ranges`,
  `wg_q_ranges`). No pingpong scheduling in the backward.
* head_dim 64 and 128 (`BWD_HEAD_DIMS`). head_dim 256 falls back to the portable (Triton) kernels,
  decided statically: the dK and dV float32 accumulators of a 64-key warpgroup alone would take 256 of
  the 232 registers per thread.
Interpret mode swaps the same four constructs as the forward (`common.py`). The backward kernels were
lowered for CUDA and checked in interpret mode only; register allocation (spills) and speed are
unchecked on GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxlab.attention.flash import blocks as blocks_lib
from jaxlab.attention.flash import portable
from jaxlab.attention.flash.mosaic_gpu.common import (
    _LOG2E, DTYPES, WG_ROWS, _cast, _iota, _load_vec, _pv, _qk, _valid, check_inputs, interpret_kwargs,
    setup, swizzled)
from jaxlab.attention.flash.mosaic_gpu.ranges import (cta_kv_range, cta_q_range, wg_kv_ranges,
                                                      wg_q_ranges)
from jaxlab.attention.flash.portable import _NEG, KernelConfig, _band


BWD_HEAD_DIMS = (64, 128)  # head_dim 256: fp32 dK + dV accumulators would not fit the registers
BWD_TILE = 64  # the streamed tile of the backward loops: K/V rows (dQ kernel), query rows (dK/dV kernel)
_LSE2_EMPTY = 1e30  # base-2 lse of a row that contributes nothing: exp2(s - _LSE2_EMPTY) == 0


def serves_backward(cfg: KernelConfig, q) -> bool:
  """Whether `backward_dq` / `backward_dkdv` run the Mosaic GPU kernels (else the portable ones)."""
  return q.shape[-1] in BWD_HEAD_DIMS and q.dtype in DTYPES


def dkdv_block_k(tkp: int) -> int:
  """Key rows per dK/dV CTA: 128 (two compute warpgroups) where the padded length allows, else 64."""
  return 2 * WG_ROWS if tkp % (2 * WG_ROWS) == 0 else WG_ROWS



def _valid_t(cfg: KernelConfig, k0, q0, k_seg, q_seg, interpret: bool):
  """Boolean [64 keys, 64 queries] in WGMMA layout: the transpose of `_valid` for the dK/dV tiles."""
  shape = (WG_ROWS, BWD_TILE)
  valid = portable.band_valid(cfg, q0 + _iota(shape, 1, interpret), k0 + _iota(shape, 0, interpret))
  if q_seg is not None:
    valid = valid & (lax.broadcast_in_dim(k_seg, shape, [0]) == lax.broadcast_in_dim(q_seg, shape, [1]))
  return valid


def _bwd_stats(cfg: KernelConfig, lse, delta):
  """[B, N, Tqp/64, 2, 64] float32: per 64-row tile, (lse * log2 e, delta), one TMA copy per tile.

  Rows that contribute nothing (padding past q_len, rows that saw no key) get lse _LSE2_EMPTY, so their
  P is exactly 0 even in unmasked tiles (the forward's padded rows used other block bounds)."""
  b, n, tqp = lse.shape
  rows = jnp.arange(tqp)[None, None, :]
  keep = (rows < cfg.q_len) & (lse > 0.5 * _NEG)
  lse2 = jnp.where(keep, lse.astype(jnp.float32) * _LOG2E, _LSE2_EMPTY)
  st = jnp.stack([lse2, delta.astype(jnp.float32)], axis=2)  # [B, N, 2, Tqp]
  return st.reshape(b, n, 2, tqp // BWD_TILE, BWD_TILE).transpose(0, 1, 3, 2, 4)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, st_ref, qseg_ref, kseg_ref, dq_ref, scratch, *,
               cfg: KernelConfig, groups: int, shapes):
  (q_smem, do_smem, st_smem, qseg_smem, k_smem, v_smem, kseg_smem), barriers = scratch
  q_full, do_full, st_full, qseg_full, k_full, v_full, kseg_full, consumed = barriers
  tqp, tkp, h, nq, nk = shapes
  interp = cfg.interpret
  cw = cfg.block_q // WG_ROWS
  bk, stages, dtype = cfg.block_k, cfg.num_stages, q_smem.dtype
  segs = cfg.has_segments
  wg = lax.axis_index("wg")
  b, n = lax.axis_index("batch"), lax.axis_index("heads")
  i = lax.axis_index("q")
  if _band(cfg)[1] is not None:  # banded: the longest query blocks first
    i = (nq - 1) - i
  lo_c, hi_c = cta_kv_range(cfg, i, nk, tqp, tkp)
  rows_layout = plgpu.Layout.WGMMA.reduce(1)

  def slot_of(j):
    return lax.rem(j - lo_c, jnp.int32(stages))

  @pl.when(wg < cw)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    w = jnp.minimum(wg, cw - 1)
    row0 = i * cfg.block_q + w * WG_ROWS
    rows = pl.ds(row0, WG_ROWS)
    plgpu.copy_gmem_to_smem(q_ref.at[b, n, rows], q_smem.at[w], q_full.at[w])
    plgpu.copy_gmem_to_smem(do_ref.at[b, n, rows], do_smem.at[w], do_full.at[w])
    plgpu.copy_gmem_to_smem(st_ref.at[b, n, i * cw + w], st_smem.at[w], st_full.at[w])
    if segs:
      plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], qseg_smem.at[w], qseg_full.at[w])
      plgpu.barrier_wait(qseg_full.at[w])
    q_seg = _load_vec(qseg_smem.at[w], rows_layout, interp) if segs else None
    plgpu.barrier_wait(st_full.at[w])
    lse2 = _load_vec(st_smem.at[w, 0], rows_layout, interp)
    delta = _load_vec(st_smem.at[w, 1], rows_layout, interp)
    plgpu.barrier_wait(q_full.at[w])
    plgpu.barrier_wait(do_full.at[w])
    lo, flo, fhi, hi = wg_kv_ranges(cfg, row0, lo_c, hi_c, tqp, tkp)
    c = cfg.scale * _LOG2E
    shape = (WG_ROWS, bk)

    def step(j, dq, kind):
      slot = slot_of(j)
      plgpu.barrier_wait(k_full.at[slot])
      if segs:
        plgpu.barrier_wait(kseg_full.at[slot])
      if kind == "skip":  # outside this warpgroup's band: barrier protocol only
        plgpu.barrier_wait(v_full.at[slot])
        plgpu.barrier_arrive(consumed.at[slot])
        return dq
      s = _qk(q_smem.at[w], k_smem.at[slot], shape, interp, lambda: None)
      p = jnp.exp2(s * c - lax.broadcast_in_dim(lse2, shape, [0]))
      if kind == "masked":
        k_seg = _load_vec(kseg_smem.at[slot], plgpu.Layout.WGMMA.reduce(0), interp) if segs else None
        p = jnp.where(_valid(cfg, row0, j * bk, q_seg, k_seg, interp), p, 0.0)
      plgpu.barrier_wait(v_full.at[slot])
      dp = _qk(do_smem.at[w], v_smem.at[slot], shape, interp, lambda: None)  # dP = dO V^T
      ds = p * (dp - lax.broadcast_in_dim(delta, shape, [0]))
      dq = _pv(dq, ds.astype(dtype), k_smem.at[slot], interp)  # dQ += dS K
      plgpu.barrier_arrive(consumed.at[slot])
      return dq

    def run(start, stop, kind, dq):
      return lax.fori_loop(start, stop, functools.partial(step, kind=kind), dq)

    dq = _cast(jnp.zeros((WG_ROWS, h), jnp.float32), plgpu.Layout.WGMMA, interp)
    run(lo_c, lo, "skip", None)
    dq = run(lo, flo, "masked", dq)
    dq = run(flo, fhi, "full", dq)
    dq = run(fhi, hi, "masked", dq)
    run(hi, hi_c, "skip", None)
    q_smem.at[w][...] = (dq * cfg.scale).astype(dtype)  # Q is no longer read: its slot holds dQ
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem.at[w], dq_ref.at[b, n, rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == cw)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    kvh = lax.div(n, jnp.int32(groups))

    @pl.loop(lo_c, hi_c)
    def _load(j):
      slot = slot_of(j)
      cols = pl.ds(j * bk, bk)

      @pl.when(j >= lo_c + stages)
      def _wait():
        plgpu.barrier_wait(consumed.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[b, kvh, cols], k_smem.at[slot], k_full.at[slot])
      if segs:
        plgpu.copy_gmem_to_smem(kseg_ref.at[b, cols], kseg_smem.at[slot], kseg_full.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, kvh, cols], v_smem.at[slot], v_full.at[slot])

    for s in range(stages):  # observe the last release of every slot used
      pl.when(lo_c + s < hi_c)(lambda s=s: plgpu.barrier_wait(consumed.at[s]))


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, st_ref, qseg_ref, kseg_ref, dk_ref, dv_ref, scratch, *,
                 cfg: KernelConfig, groups: int, shapes):
  (k_smem, v_smem, kseg_smem, q_smem, do_smem, st_smem, qseg_smem), barriers = scratch
  k_full, v_full, kseg_full, q_full, do_full, st_full, qseg_full, consumed = barriers
  tqp, tkp, h, nq, nk = shapes
  interp = cfg.interpret
  cw = cfg.block_k // WG_ROWS
  bq, stages, dtype = cfg.block_q, cfg.num_stages, k_smem.dtype
  segs = cfg.has_segments
  wg = lax.axis_index("wg")
  b, kvh = lax.axis_index("batch"), lax.axis_index("heads")
  j = lax.axis_index("k")  # causal: small j sees the most query blocks, so they already start first
  lo_c, hi_c = cta_q_range(cfg, j, nq, tqp, tkp)
  nsteps = hi_c - lo_c
  cols_layout = plgpu.Layout.WGMMA.reduce(0)

  def slot_of(gi, i):
    return lax.rem(gi * nsteps + (i - lo_c), jnp.int32(stages))

  @pl.when(wg < cw)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    w = jnp.minimum(wg, cw - 1)
    col0 = j * cfg.block_k + w * WG_ROWS
    keys = pl.ds(col0, WG_ROWS)
    plgpu.copy_gmem_to_smem(k_ref.at[b, kvh, keys], k_smem.at[w], k_full.at[w])
    plgpu.copy_gmem_to_smem(v_ref.at[b, kvh, keys], v_smem.at[w], v_full.at[w])
    if segs:
      plgpu.copy_gmem_to_smem(kseg_ref.at[b, keys], kseg_smem.at[w], kseg_full.at[w])
      plgpu.barrier_wait(kseg_full.at[w])
    k_seg = _load_vec(kseg_smem.at[w], plgpu.Layout.WGMMA.reduce(1), interp) if segs else None
    plgpu.barrier_wait(k_full.at[w])
    plgpu.barrier_wait(v_full.at[w])
    lo, flo, fhi, hi = wg_q_ranges(cfg, col0, lo_c, hi_c, tqp, tkp)
    c = cfg.scale * _LOG2E
    shape = (WG_ROWS, bq)

    def step(i, carry, gi, kind):
      slot = slot_of(gi, i)
      plgpu.barrier_wait(q_full.at[slot])
      plgpu.barrier_wait(st_full.at[slot])
      if segs:
        plgpu.barrier_wait(qseg_full.at[slot])
      if kind == "skip":
        plgpu.barrier_wait(do_full.at[slot])
        plgpu.barrier_arrive(consumed.at[slot])
        return carry
      dk, dv = carry
      st = _qk(k_smem.at[w], q_smem.at[slot], shape, interp, lambda: None)  # S^T = K Q^T
      lse2 = _load_vec(st_smem.at[slot, 0], cols_layout, interp)
      pt = jnp.exp2(st * c - lax.broadcast_in_dim(lse2, shape, [1]))
      if kind == "masked":
        q_seg = _load_vec(qseg_smem.at[slot], cols_layout, interp) if segs else None
        pt = jnp.where(_valid_t(cfg, col0, i * bq, k_seg, q_seg, interp), pt, 0.0)
      plgpu.barrier_wait(do_full.at[slot])
      dpt = _qk(v_smem.at[w], do_smem.at[slot], shape, interp, lambda: None)  # dP^T = V dO^T
      delta = _load_vec(st_smem.at[slot, 1], cols_layout, interp)
      dst = pt * (dpt - lax.broadcast_in_dim(delta, shape, [1]))
      dv = _pv(dv, pt.astype(dtype), do_smem.at[slot], interp)  # dV += P^T dO
      dk = _pv(dk, dst.astype(dtype), q_smem.at[slot], interp)  # dK += dS^T Q (scale at the end)
      plgpu.barrier_arrive(consumed.at[slot])
      return dk, dv

    def head(gi, carry):
      run = lambda start, stop, kind, carry: lax.fori_loop(
          start, stop, functools.partial(step, gi=gi, kind=kind), carry)
      run(lo_c, lo, "skip", None)
      carry = run(lo, flo, "masked", carry)
      carry = run(flo, fhi, "full", carry)
      carry = run(fhi, hi, "masked", carry)
      run(hi, hi_c, "skip", None)
      return carry

    zeros = _cast(jnp.zeros((WG_ROWS, h), jnp.float32), plgpu.Layout.WGMMA, interp)
    # The query heads of this key/value head's GQA group accumulate into the same dK, dV.
    dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    k_smem.at[w][...] = (dk * cfg.scale).astype(dtype)  # K, V are no longer read: they hold dK, dV
    v_smem.at[w][...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem.at[w], dk_ref.at[b, kvh, keys])
    plgpu.copy_smem_to_gmem(v_smem.at[w], dv_ref.at[b, kvh, keys])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == cw)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, groups)
    def _head(gi):
      n = kvh * groups + gi

      @pl.loop(lo_c, hi_c)
      def _load(i):
        slot = slot_of(gi, i)
        rows = pl.ds(i * bq, bq)

        @pl.when(gi * nsteps + (i - lo_c) >= stages)
        def _wait():
          plgpu.barrier_wait(consumed.at[slot])
        plgpu.copy_gmem_to_smem(q_ref.at[b, n, rows], q_smem.at[slot], q_full.at[slot])
        plgpu.copy_gmem_to_smem(st_ref.at[b, n, i], st_smem.at[slot], st_full.at[slot])
        if segs:
          plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], qseg_smem.at[slot], qseg_full.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[b, n, rows], do_smem.at[slot], do_full.at[slot])

    for s in range(stages):  # observe the last release of every slot used
      pl.when(s < groups * nsteps)(lambda s=s: plgpu.barrier_wait(consumed.at[s]))



def backward_dq(cfg: KernelConfig, q, k, v, do, lse, delta, q_seg, kv_seg):
  """dQ [B, N, Tqp, H] (q's dtype), as `portable.backward_dq`; lse / delta float32 [B, N, Tqp].

  head_dim 64/128: the Mosaic GPU kernel (grid (Tqp/block_q, N, B), block_q // 64 compute warpgroups
  + a producer streaming 64-row K/V tiles). Other head dims: the portable kernel.
  """
  check_inputs(cfg, q, k, v)
  if not serves_backward(cfg, q):
    return portable.backward_dq(_portable_cfg(cfg, q.shape[-1]), q, k, v, do, lse, delta, q_seg,
                                kv_seg)
  cfg, q_seg, kv_seg = setup(cfg, q, k, q_seg, kv_seg)
  cfg = dataclasses.replace(cfg, block_k=BWD_TILE)
  b, n, tqp, h = q.shape
  kh, tkp = k.shape[1], k.shape[2]
  cw, stages, dtype = cfg.block_q // WG_ROWS, cfg.num_stages, q.dtype
  nq, nk = tqp // cfg.block_q, tkp // BWD_TILE
  st = _bwd_stats(cfg, lse, delta)

  def entry(q_ref, k_ref, v_ref, do_ref, st_ref, qseg_ref, kseg_ref, dq_ref):
    smem = (
        plgpu.SMEM((cw, WG_ROWS, h), dtype, transforms=swizzled()),  # Q, then dQ
        plgpu.SMEM((cw, WG_ROWS, h), dtype, transforms=swizzled()),  # dO
        plgpu.SMEM((cw, 2, WG_ROWS), jnp.float32),  # lse * log2 e, delta
        plgpu.SMEM((cw, WG_ROWS), jnp.int32),
        plgpu.SMEM((stages, BWD_TILE, h), dtype, transforms=swizzled()),  # K ring
        plgpu.SMEM((stages, BWD_TILE, h), dtype, transforms=swizzled()),  # V ring
        plgpu.SMEM((stages, BWD_TILE), jnp.int32),
    )
    barriers = (
        plgpu.Barrier(num_barriers=cw), plgpu.Barrier(num_barriers=cw),  # Q, dO landed
        plgpu.Barrier(num_barriers=cw), plgpu.Barrier(num_barriers=cw),  # stats, q segment ids
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),  # K, V slot full
        plgpu.Barrier(num_barriers=stages),  # key segment ids full
        plgpu.Barrier(num_arrivals=cw, num_barriers=stages),  # slot consumed by every warpgroup
    )
    pl.run_scoped(
        lambda *scratch: _dq_kernel(q_ref, k_ref, v_ref, do_ref, st_ref, qseg_ref, kseg_ref, dq_ref,
                                    (scratch[:7], scratch[7:]), cfg=cfg, groups=n // kh,
                                    shapes=(tqp, tkp, h, nq, nk)),
        *smem, *barriers, collective_axes="wg")

  return plgpu.kernel(
      entry, out_type=jax.ShapeDtypeStruct(q.shape, dtype), grid=(nq, n, b),
      grid_names=("q", "heads", "batch"), num_threads=cw + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True), **interpret_kwargs(cfg),
  )(q, k, v, do.astype(dtype), st, q_seg, kv_seg)


def backward_dkdv(cfg: KernelConfig, q, k, v, do, lse, delta, q_seg, kv_seg):
  """(dK, dV) [B, K, Tkp, H] (k's dtype), as `portable.backward_dkdv`.

  head_dim 64/128: the Mosaic GPU kernel (grid (Tkp/block, K, B) with block = `dkdv_block_k`, one
  compute warpgroup per 64 keys + a producer streaming 64-row Q/dO/lse/delta tiles of every query head
  of the GQA group). Other head dims: the portable kernel.
  """
  check_inputs(cfg, q, k, v)
  if not serves_backward(cfg, q):
    return portable.backward_dkdv(_portable_cfg(cfg, q.shape[-1]), q, k, v, do, lse, delta, q_seg,
                                  kv_seg)
  cfg, q_seg, kv_seg = setup(cfg, q, k, q_seg, kv_seg)
  b, n, tqp, h = q.shape
  kh, tkp = k.shape[1], k.shape[2]
  cfg = dataclasses.replace(cfg, block_q=BWD_TILE, block_k=dkdv_block_k(tkp))
  cw, stages, dtype = cfg.block_k // WG_ROWS, cfg.num_stages, k.dtype
  nq, nk = tqp // BWD_TILE, tkp // cfg.block_k
  st = _bwd_stats(cfg, lse, delta)

  def entry(q_ref, k_ref, v_ref, do_ref, st_ref, qseg_ref, kseg_ref, dk_ref, dv_ref):
    smem = (
        plgpu.SMEM((cw, WG_ROWS, h), dtype, transforms=swizzled()),  # K, then dK
        plgpu.SMEM((cw, WG_ROWS, h), dtype, transforms=swizzled()),  # V, then dV
        plgpu.SMEM((cw, WG_ROWS), jnp.int32),
        plgpu.SMEM((stages, BWD_TILE, h), dtype, transforms=swizzled()),  # Q ring
        plgpu.SMEM((stages, BWD_TILE, h), dtype, transforms=swizzled()),  # dO ring
        plgpu.SMEM((stages, 2, BWD_TILE), jnp.float32),  # lse * log2 e, delta ring
        plgpu.SMEM((stages, BWD_TILE), jnp.int32),
    )
    barriers = (
        plgpu.Barrier(num_barriers=cw), plgpu.Barrier(num_barriers=cw),  # K, V landed
        plgpu.Barrier(num_barriers=cw),  # key segment ids landed
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),  # Q, dO slot full
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),  # stats, q seg ids
        plgpu.Barrier(num_arrivals=cw, num_barriers=stages),  # slot consumed by every warpgroup
    )
    pl.run_scoped(
        lambda *scratch: _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, st_ref, qseg_ref, kseg_ref, dk_ref,
                                      dv_ref, (scratch[:7], scratch[7:]), cfg=cfg, groups=n // kh,
                                      shapes=(tqp, tkp, h, nq, nk)),
        *smem, *barriers, collective_axes="wg")

  return plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
      grid=(nk, kh, b), grid_names=("k", "heads", "batch"), num_threads=cw + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True), **interpret_kwargs(cfg),
  )(q, k, v, do.astype(dtype), st, q_seg, kv_seg)


def _portable_cfg(cfg: KernelConfig, h: int) -> KernelConfig:
  """The portable kernels' config for the same padded arrays: the portable GPU blocks (powers of two
  that divide this kernel's block_q / block_k), Triton's warps and stages (None in interpret mode)."""
  base = blocks_lib.TABLE["gpu"].get(h, blocks_lib.Blocks(64, 32, num_warps=8, num_stages=2))
  bq = math.gcd(cfg.block_q, base.block_q)
  bk = math.gcd(cfg.block_k, base.block_k)
  if cfg.interpret:
    return dataclasses.replace(cfg, block_q=bq, block_k=bk, num_warps=None, num_stages=None)
  return dataclasses.replace(cfg, block_q=bq, block_k=bk, num_warps=base.num_warps,
                             num_stages=base.num_stages)
