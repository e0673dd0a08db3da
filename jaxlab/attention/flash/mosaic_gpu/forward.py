"""Mosaic GPU (Hopper) FlashAttention forward: wgmma, TMA pipelines, warp specialisation.

Same contract and masks as `portable.forward` (layout [B, N, T, H], already padded to the blocks; the
online softmax of Dao 2023, "FlashAttention-2", arXiv:2307.08691, Algorithm 1), organised the way
Shah et al. 2024, "FlashAttention-3" (arXiv:2407.08608) organise it for Hopper:

* One CTA per (query block of `block_q` = 64 * W rows, head, batch); grid (Tq/block_q, N, B), query
  blocks in reverse for causal/banded masks so the longest CTAs start first.
* W = block_q // 64 compute warpgroups (1 or 2), each owning 64 query rows, plus one producer
  (memory) warpgroup: warp specialisation (FA3 sec. 3.1). The producer lowers its register budget
  (`set_max_registers(40)`), the compute warpgroups raise theirs (232).
* The producer streams K and V tiles [block_k, H] (and key segment ids) with TMA
  (`copy_gmem_to_smem`) into a ring of `num_stages` shared-memory slots. Each slot has a "full" barrier
  (the TMA transaction) and a "consumed" barrier on which every compute warpgroup arrives once it has
  read the slot; the producer waits on it before refilling the slot.
* Each compute warpgroup TMA-loads its Q tile once, then per K/V step: S = Q K^T by `plgpu.wgmma`
  (both operands in 128-byte-swizzled SMEM, K transposed by a ref transform), online softmax in
  registers (WGMMA layout, exp2 with the scale folded into log2 e), O += P V by `wgmma` with P in
  registers. With two compute warpgroups a rendezvous barrier staggers them (FA3's "pingpong"
  scheduling, sec. 3.1): one warpgroup's softmax overlaps the other's matmuls.
* GQA/MQA: the producer of head n reads K/V head n // (N // K); K/V are never repeated.
* Masks: causal / sliding window bound the K/V steps per CTA (the CTA's band, as
  `portable.kv_block_range`), so fully hidden tiles are never loaded or computed. Inside it, each
  warpgroup splits its own steps into: steps outside its 64-row band (barrier bookkeeping only, no
  matmul), edge tiles (iota masks of the band, the ragged key tail and segment ids) and interior tiles
  that need no mask at all. With segment ids every computed tile is masked.
* Epilogue: O = acc / l (0 for a row that saw no key) and lse = m ln 2 + log l (float32 natural log of
  the scaled logits; `portable._NEG` for an empty row), through SMEM and a TMA store.
Interpret mode: see `common.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxlab.attention.flash.mosaic_gpu.common import (
    _LN2, _LOG2E, WG_ROWS, _cast, _load_vec, _pv, _qk, _valid, check_inputs, interpret_kwargs, setup,
    swizzled)
from jaxlab.attention.flash.mosaic_gpu.ranges import cta_kv_range, wg_kv_ranges
from jaxlab.attention.flash.portable import _NEG, KernelConfig, _band


def _kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, scratch, *, cfg: KernelConfig,
            groups: int, shapes):
  (qo_smem, k_smem, v_smem, lse_smem, qseg_smem, kseg_smem), barriers = scratch
  q_full, qseg_full, k_full, v_full, kseg_full, k_consumed, v_consumed, sched = barriers
  tqp, tkp, h, nq, nk = shapes
  interp = cfg.interpret
  cw = cfg.block_q // WG_ROWS
  bk, stages, dtype = cfg.block_k, cfg.num_stages, qo_smem.dtype
  segs = cfg.has_segments
  wg = lax.axis_index("wg")
  b, n = lax.axis_index("batch"), lax.axis_index("heads")
  i = lax.axis_index("q")
  if _band(cfg)[1] is not None:  # banded: the longest query blocks (largest i) first
    i = (nq - 1) - i
  lo_c, hi_c = cta_kv_range(cfg, i, nk, tqp, tkp)
  reduce_rows = plgpu.Layout.WGMMA.reduce(1)

  def slot_of(j):
    return lax.rem(j - lo_c, jnp.int32(stages))

  def rendezvous():
    if cw > 1:
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

  @pl.when(wg < cw)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    w = jnp.minimum(wg, cw - 1)
    row0 = i * cfg.block_q + w * WG_ROWS
    rows = pl.ds(row0, WG_ROWS)
    q_smem = qo_smem.at[w]
    plgpu.copy_gmem_to_smem(q_ref.at[b, n, rows], q_smem, q_full.at[w])
    if segs:
      plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], qseg_smem.at[w], qseg_full.at[w])
      plgpu.barrier_wait(qseg_full.at[w])
    q_seg = _load_vec(qseg_smem.at[w], reduce_rows, interp) if segs else None
    plgpu.barrier_wait(q_full.at[w])
    lo, flo, fhi, hi = wg_kv_ranges(cfg, row0, lo_c, hi_c, tqp, tkp)
    c = cfg.scale * _LOG2E

    def step(j, carry, kind):
      slot = slot_of(j)
      plgpu.barrier_wait(k_full.at[slot])
      if segs:
        plgpu.barrier_wait(kseg_full.at[slot])
      if kind == "skip":  # outside this warpgroup's band: keep the barrier protocol, no compute
        rendezvous()
        plgpu.barrier_arrive(k_consumed.at[slot])
        if cw > 1:
          plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(v_full.at[slot])
        if cw > 1:
          plgpu.barrier_wait(sched)
        plgpu.barrier_arrive(v_consumed.at[slot])
        return carry
      m, l, acc = carry
      s = _qk(q_smem, k_smem.at[slot], (WG_ROWS, bk), interp, rendezvous) * c
      if kind == "masked":
        k_seg = _load_vec(kseg_smem.at[slot], plgpu.Layout.WGMMA.reduce(0), interp) if segs else None
        plgpu.barrier_arrive(k_consumed.at[slot])
        valid = _valid(cfg, row0, j * bk, q_seg, k_seg, interp)
        s = jnp.where(valid, s, _NEG)
      else:
        plgpu.barrier_arrive(k_consumed.at[slot])
      m_new = jnp.maximum(m, s.max(axis=1))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
      if kind == "masked":  # a row with no visible key yet has m_new == _NEG: exp2(0) must not count
        p = jnp.where(valid, p, 0.0)
      l = l * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      p16 = p.astype(dtype)
      if cw > 1:
        plgpu.barrier_arrive(sched)  # softmax done: the other warpgroup may issue its matmuls
      plgpu.barrier_wait(v_full.at[slot])
      if cw > 1:
        plgpu.barrier_wait(sched)  # the tensor cores are ours again
      acc = _pv(acc, p16, v_smem.at[slot], interp)
      plgpu.barrier_arrive(v_consumed.at[slot])
      return m_new, l, acc

    def run(start, stop, kind, carry):
      return lax.fori_loop(start, stop, functools.partial(step, kind=kind), carry)

    carry = (_cast(jnp.full((WG_ROWS,), _NEG, jnp.float32), reduce_rows, interp),
             _cast(jnp.zeros((WG_ROWS,), jnp.float32), reduce_rows, interp),
             _cast(jnp.zeros((WG_ROWS, h), jnp.float32), plgpu.Layout.WGMMA, interp))
    if cw > 1:
      pl.when(w == 1)(rendezvous)  # offset the second warpgroup by one matmul phase (pingpong)
    run(lo_c, lo, "skip", None)
    carry = run(lo, flo, "masked", carry)
    carry = run(flo, fhi, "full", carry)
    m, l, acc = run(fhi, hi, "masked", carry)
    run(hi, hi_c, "skip", None)
    if cw > 1:
      pl.when(w == 0)(rendezvous)

    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    q_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
    lse_smem.at[w][...] = jnp.where(seen, m * _LN2 + jnp.log(l_safe), _NEG)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, n, rows])
    plgpu.copy_smem_to_gmem(lse_smem.at[w], lse_ref.at[b, n, rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == cw)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    kvh = lax.div(n, jnp.int32(groups))

    def load(j, slot, wait):
      cols = pl.ds(j * bk, bk)
      if wait:
        plgpu.barrier_wait(k_consumed.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[b, kvh, cols], k_smem.at[slot], k_full.at[slot])
      if segs:
        plgpu.copy_gmem_to_smem(kseg_ref.at[b, cols], kseg_smem.at[slot], kseg_full.at[slot])
      if wait:
        plgpu.barrier_wait(v_consumed.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, kvh, cols], v_smem.at[slot], v_full.at[slot])

    for s in range(stages):  # fill the ring
      pl.when(lo_c + s < hi_c)(functools.partial(load, lo_c + s, s, False))

    @pl.loop(lo_c + stages, jnp.maximum(hi_c, lo_c + stages))
    def _refill(j):
      load(j, slot_of(j), True)

    # Observe the last release of every slot used, so each barrier phase is awaited (interpret mode
    # checks this; on the GPU it only delays the producer's exit).
    for s in range(stages):
      @pl.when(lo_c + s < hi_c)
      def _drain():
        plgpu.barrier_wait(k_consumed.at[s])
        plgpu.barrier_wait(v_consumed.at[s])


def forward(cfg: KernelConfig, q, k, v, q_seg, kv_seg):
  """q [B, N, Tqp, H], k/v [B, K, Tkp, H] (bf16/fp16), segs [B, Tqp] / [B, Tkp] int32 or None.

  Returns (o [B, N, Tqp, H] in q's dtype, lse [B, N, Tqp] float32), as `portable.forward`.
  `cfg.num_stages` is the depth of the K/V ring (>= 1); `cfg.interpret` runs Mosaic GPU interpret mode.
  """
  check_inputs(cfg, q, k, v)
  cfg, q_seg, kv_seg = setup(cfg, q, k, q_seg, kv_seg)
  b, n, tqp, h = q.shape
  kh, tkp = k.shape[1], k.shape[2]
  stages, bq, bk = cfg.num_stages, cfg.block_q, cfg.block_k
  nq, nk = tqp // bq, tkp // bk
  cw = bq // WG_ROWS
  dtype = q.dtype

  def entry(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref):
    smem = (
        plgpu.SMEM((cw, WG_ROWS, h), dtype, transforms=swizzled()),  # Q, then O
        plgpu.SMEM((stages, bk, h), dtype, transforms=swizzled()),
        plgpu.SMEM((stages, bk, h), dtype, transforms=swizzled()),
        plgpu.SMEM((cw, WG_ROWS), jnp.float32),
        plgpu.SMEM((cw, WG_ROWS), jnp.int32),
        plgpu.SMEM((stages, bk), jnp.int32),
    )
    barriers = (
        plgpu.Barrier(num_barriers=cw),  # Q landed
        plgpu.Barrier(num_barriers=cw),  # query segment ids landed
        plgpu.Barrier(num_barriers=stages),  # K slot full
        plgpu.Barrier(num_barriers=stages),  # V slot full
        plgpu.Barrier(num_barriers=stages),  # key segment ids full
        plgpu.Barrier(num_arrivals=cw, num_barriers=stages),  # K slot consumed by every warpgroup
        plgpu.Barrier(num_arrivals=cw, num_barriers=stages),  # V slot consumed
        plgpu.Barrier(num_arrivals=cw),  # pingpong rendezvous of the compute warpgroups
    )
    pl.run_scoped(
        lambda *scratch: _kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref,
                                 (scratch[:6], scratch[6:]), cfg=cfg, groups=n // kh,
                                 shapes=(tqp, tkp, h, nq, nk)),
        *smem, *barriers, collective_axes="wg")

  return plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, n, tqp), jnp.float32)),
      grid=(nq, n, b),
      grid_names=("q", "heads", "batch"),
      num_threads=cw + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **interpret_kwargs(cfg),
  )(q, k, v, q_seg, kv_seg)
