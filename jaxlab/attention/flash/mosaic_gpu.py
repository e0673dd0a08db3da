"""Mosaic GPU (Hopper) FlashAttention forward and backward: wgmma, TMA pipelines, warp specialisation.

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

Interpret mode (`cfg.interpret`, on CPU): the same kernel, barriers, TMA copies and warpgroups run in
Mosaic GPU interpret mode (`InterpretGPUParams`). That mode (jax 0.10) cannot run `layout_cast`,
`plgpu.load`, a transposed wgmma operand or a wgmma with its left operand in registers, so exactly
those four constructs are swapped for their plain-JAX equivalents (identity, `ref[...]`,
`lax.dot_general`); everything else is the compiled code path.

Backward (FlashAttention-2 Algorithm 2 as two deterministic passes, like `portable.py`; the same
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
Interpret mode swaps the same four constructs as in the forward. The backward kernels were lowered for
CUDA and checked in interpret mode only; register allocation (spills) and speed are unchecked on GPU.

Block sizes: `blocks.TABLE["mosaic_gpu"]` (block_q in {64, 128}, block_k a multiple of 64) for the
forward; the backward reuses block_q for dQ and derives the rest (`BWD_TILE`, `dkdv_block_k`) so that
they divide the same padded lengths. Inputs must be bfloat16 or float16 (wgmma takes 16-bit operands).
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
from jaxlab.attention.flash.portable import _NEG, KernelConfig, _band

DTYPES = (jnp.bfloat16, jnp.float16)
HEAD_DIMS = (64, 128, 256)
WG_ROWS = 64  # query rows per compute warpgroup (the wgmma M tile)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------
# Static checks.

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
  if cfg.block_q not in (WG_ROWS, 2 * WG_ROWS):
    raise ValueError(f"block_q must be 64 or 128 for the Mosaic GPU kernel (64 rows per compute "
                     f"warpgroup), got {cfg.block_q}")
  if cfg.block_k % 64 or not 64 <= cfg.block_k <= 256:
    raise ValueError(f"block_k must be 64, 128, 192 or 256 for the Mosaic GPU kernel, got "
                     f"{cfg.block_k}")
  if q.shape[2] % cfg.block_q or k.shape[2] % cfg.block_k:
    raise ValueError(f"padded lengths {q.shape[2]}, {k.shape[2]} must be multiples of block_q "
                     f"{cfg.block_q} and block_k {cfg.block_k}")


# ----------------------------------------------------------------------------------------------------
# Block ranges (scalar integer arithmetic that lowers on both the GPU and in interpret mode).

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


# ----------------------------------------------------------------------------------------------------
# Forward kernel.

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


def _valid(cfg: KernelConfig, row0, k_start, q_seg, k_seg, interpret: bool):
  """Boolean [64, bk] in WGMMA layout: which (query, key) pairs may attend (as `portable._tile_valid`)."""
  shape = (WG_ROWS, cfg.block_k)
  valid = portable.band_valid(cfg, row0 + _iota(shape, 0, interpret),
                              k_start + _iota(shape, 1, interpret))
  if q_seg is not None:
    valid = valid & (lax.broadcast_in_dim(q_seg, shape, [0]) == lax.broadcast_in_dim(k_seg, shape, [1]))
  return valid


def forward(cfg: KernelConfig, q, k, v, q_seg, kv_seg):
  """q [B, N, Tqp, H], k/v [B, K, Tkp, H] (bf16/fp16), segs [B, Tqp] / [B, Tkp] int32 or None.

  Returns (o [B, N, Tqp, H] in q's dtype, lse [B, N, Tqp] float32), as `portable.forward`.
  `cfg.num_stages` is the depth of the K/V ring (>= 1); `cfg.interpret` runs Mosaic GPU interpret mode.
  """
  check_inputs(cfg, q, k, v)
  b, n, tqp, h = q.shape
  kh, tkp = k.shape[1], k.shape[2]
  if n % kh:
    raise ValueError(f"query heads {n} must be a multiple of key/value heads {kh}")
  stages = cfg.num_stages or 2
  if stages < 1:
    raise ValueError(f"num_stages must be >= 1, got {stages}")
  cfg = dataclasses.replace(cfg, num_stages=stages)
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = tqp // bq, tkp // bk
  cw = bq // WG_ROWS
  dtype = q.dtype
  if not cfg.has_segments:  # unused operands; tiny, so the kernel signature stays fixed
    q_seg = jnp.zeros((b, tqp), jnp.int32)
    kv_seg = jnp.zeros((b, tkp), jnp.int32)

  def entry(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref):
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    smem = (
        plgpu.SMEM((cw, WG_ROWS, h), dtype, transforms=swizzled),  # Q, then O
        plgpu.SMEM((stages, bk, h), dtype, transforms=swizzled),
        plgpu.SMEM((stages, bk, h), dtype, transforms=swizzled),
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

  kwargs = {}
  if cfg.interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    kwargs["interpret"] = InterpretGPUParams()
  return plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, n, tqp), jnp.float32)),
      grid=(nq, n, b),
      grid_names=("q", "heads", "batch"),
      num_threads=cw + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **kwargs,
  )(q, k, v, q_seg, kv_seg)


# ----------------------------------------------------------------------------------------------------
# Backward kernels (dQ and dK/dV), same masks and contracts as `portable.backward_dq` / `backward_dkdv`.

BWD_HEAD_DIMS = (64, 128)  # head_dim 256: fp32 dK + dV accumulators would not fit the registers
BWD_TILE = 64  # the streamed tile of the backward loops: K/V rows (dQ kernel), query rows (dK/dV kernel)
_LSE2_EMPTY = 1e30  # base-2 lse of a row that contributes nothing: exp2(s - _LSE2_EMPTY) == 0


def serves_backward(cfg: KernelConfig, q) -> bool:
  """Whether `backward_dq` / `backward_dkdv` run the Mosaic GPU kernels (else the portable ones)."""
  return q.shape[-1] in BWD_HEAD_DIMS and q.dtype in DTYPES


def dkdv_block_k(tkp: int) -> int:
  """Key rows per dK/dV CTA: 128 (two compute warpgroups) where the padded length allows, else 64."""
  return 2 * WG_ROWS if tkp % (2 * WG_ROWS) == 0 else WG_ROWS


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


def _interpret_kwargs(cfg: KernelConfig):
  if not cfg.interpret:
    return {}
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return {"interpret": InterpretGPUParams()}


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


def _bwd_setup(cfg: KernelConfig, q, k, q_seg, kv_seg):
  b, n, tqp, h = q.shape
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


_SWIZZLED = lambda: (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def backward_dq(cfg: KernelConfig, q, k, v, do, lse, delta, q_seg, kv_seg):
  """dQ [B, N, Tqp, H] (q's dtype), as `portable.backward_dq`; lse / delta float32 [B, N, Tqp].

  head_dim 64/128: the Mosaic GPU kernel (grid (Tqp/block_q, N, B), block_q // 64 compute warpgroups
  + a producer streaming 64-row K/V tiles). Other head dims: the portable kernel.
  """
  check_inputs(cfg, q, k, v)
  if not serves_backward(cfg, q):
    return portable.backward_dq(_portable_cfg(cfg, q.shape[-1]), q, k, v, do, lse, delta, q_seg,
                                kv_seg)
  cfg, q_seg, kv_seg = _bwd_setup(cfg, q, k, q_seg, kv_seg)
  cfg = dataclasses.replace(cfg, block_k=BWD_TILE)
  b, n, tqp, h = q.shape
  kh, tkp = k.shape[1], k.shape[2]
  cw, stages, dtype = cfg.block_q // WG_ROWS, cfg.num_stages, q.dtype
  nq, nk = tqp // cfg.block_q, tkp // BWD_TILE
  st = _bwd_stats(cfg, lse, delta)

  def entry(q_ref, k_ref, v_ref, do_ref, st_ref, qseg_ref, kseg_ref, dq_ref):
    smem = (
        plgpu.SMEM((cw, WG_ROWS, h), dtype, transforms=_SWIZZLED()),  # Q, then dQ
        plgpu.SMEM((cw, WG_ROWS, h), dtype, transforms=_SWIZZLED()),  # dO
        plgpu.SMEM((cw, 2, WG_ROWS), jnp.float32),  # lse * log2 e, delta
        plgpu.SMEM((cw, WG_ROWS), jnp.int32),
        plgpu.SMEM((stages, BWD_TILE, h), dtype, transforms=_SWIZZLED()),  # K ring
        plgpu.SMEM((stages, BWD_TILE, h), dtype, transforms=_SWIZZLED()),  # V ring
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
      compiler_params=plgpu.CompilerParams(approx_math=True), **_interpret_kwargs(cfg),
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
  cfg, q_seg, kv_seg = _bwd_setup(cfg, q, k, q_seg, kv_seg)
  b, n, tqp, h = q.shape
  kh, tkp = k.shape[1], k.shape[2]
  cfg = dataclasses.replace(cfg, block_q=BWD_TILE, block_k=dkdv_block_k(tkp))
  cw, stages, dtype = cfg.block_k // WG_ROWS, cfg.num_stages, k.dtype
  nq, nk = tqp // BWD_TILE, tkp // cfg.block_k
  st = _bwd_stats(cfg, lse, delta)

  def entry(q_ref, k_ref, v_ref, do_ref, st_ref, qseg_ref, kseg_ref, dk_ref, dv_ref):
    smem = (
        plgpu.SMEM((cw, WG_ROWS, h), dtype, transforms=_SWIZZLED()),  # K, then dK
        plgpu.SMEM((cw, WG_ROWS, h), dtype, transforms=_SWIZZLED()),  # V, then dV
        plgpu.SMEM((cw, WG_ROWS), jnp.int32),
        plgpu.SMEM((stages, BWD_TILE, h), dtype, transforms=_SWIZZLED()),  # Q ring
        plgpu.SMEM((stages, BWD_TILE, h), dtype, transforms=_SWIZZLED()),  # dO ring
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
      compiler_params=plgpu.CompilerParams(approx_math=True), **_interpret_kwargs(cfg),
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
