"""The Mosaic GPU (Hopper) flash-attention kernels of `jaxlab.attention.flash.mosaic_gpu`.

Without a GPU:
  * lowering: forward + backward for CUDA over a grid of configs (head_dim 64/128/256, bf16/fp16,
    causal, window, segment ids, GQA, Tq != Tk, one or two compute warpgroups, ring depths 1-3), and
    the dQ / dK/dV kernels alone (head_dim 256: the portable Triton fallback). This runs the whole
    Pallas -> Mosaic GPU lowering, including wgmma shape/layout checks and the shared-memory budget;
    it does not run ptxas (that needs a GPU).
  * block ranges: the CTA's K/V steps (forward, dQ) and query tiles (dK/dV) equal the portable
    kernel's; each warpgroup's interior steps need no mask and its edge steps cover every visible pair.
  * values, in Mosaic GPU interpret mode (barriers, TMA copies, warpgroups and the K/V ring simulated
    on CPU; wgmma, layout casts and `plgpu.load` replaced by plain JAX, see mosaic_gpu/common.py), against
    `implementation="xla"`; gradients through the custom_vjp's forward/backward rules (Mosaic GPU
    forward lse -> Mosaic GPU dQ and dK/dV kernels). Interpret mode is slow (~10 s per kernel compile
    per warpgroup), so three cases run by default; JAXLAB_SLOW_TESTS=1 runs more.
On a Hopper GPU only: values and gradients at realistic sizes against "xla".

Tolerances (float32 reference on the same rounded inputs): bf16 3e-2, fp16 4e-3, as test_flash.py;
gradients bf16 5e-2, fp16 1e-2 (GRAD_TOL).
"""

import functools
import os

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from attention_test_utils import qkv_inputs

from jaxlab.attention import dot_product_attention, flash
from jaxlab.attention.flash import flash_attention, mosaic_gpu, portable
from jaxlab.attention.flash.portable import _NEG
from jaxlab.attention.masks import make_mask
from jaxlab.attention.softmax import xla_attention

SCALE = 0.37
DTYPE_TOL = {jnp.bfloat16: 3e-2, jnp.float16: 4e-3}
# Gradients also carry the 16-bit rounding of P and dS before their matmuls (the portable kernels give
# bit-identical dq/dk/dv on these cases, with the same excess over DTYPE_TOL on a few small elements).
GRAD_TOL = {jnp.bfloat16: 5e-2, jnp.float16: 1e-2}
SLOW = os.environ.get("JAXLAB_SLOW_TESTS") == "1"
slow = pytest.mark.skipif(not SLOW, reason="Mosaic GPU interpret mode is slow; set JAXLAB_SLOW_TESTS=1")


def _segments(b, t, cut):
  return jnp.asarray(np.broadcast_to((np.arange(t) >= cut).astype(np.int32), (b, t)))


# ----------------------------------------------------------------------------------------------------
# Lowering for CUDA (cheap).

# (id, head_dim, dtype, B, Tq, Tk, N, K, static mask, segments?)
LOWER_CASES = [
    ("h64_bf16_causal", 64, jnp.bfloat16, 1, 256, 256, 2, 2, dict(causal=True), False),
    ("h128_fp16_window_seg_gqa_ragged", 128, jnp.float16, 2, 300, 333, 4, 2,
     dict(window=(100, 20)), True),
    ("h256_bf16_causal_seg_mqa", 256, jnp.bfloat16, 1, 200, 300, 4, 1, dict(causal=True), True),
    ("h64_fp16_one_warpgroup_one_sided", 64, jnp.float16, 1, 50, 190, 2, 1, dict(window=(None, 3)),
     False),
    ("h128_bf16_dense_tq_gt_tk", 128, jnp.bfloat16, 1, 200, 70, 2, 2, {}, False),
]


@pytest.mark.parametrize("case", LOWER_CASES, ids=[c[0] for c in LOWER_CASES])
def test_lowers_for_cuda(case):
  """Forward and backward lower for CUDA on this CPU machine: all three kernels are Mosaic GPU for
  head_dim 64/128; head_dim 256 keeps the portable (Triton) dQ and dK/dV kernels."""
  _, h, dtype, b, tq, tk, n, kh, static_mask, segs = case
  qs = jax.ShapeDtypeStruct((b, tq, n, h), dtype)
  ks = jax.ShapeDtypeStruct((b, tk, kh, h), dtype)
  seg_q, seg_k = jax.ShapeDtypeStruct((b, tq), jnp.int32), jax.ShapeDtypeStruct((b, tk), jnp.int32)

  def f(q, k, v, sq, sk):
    arrays = dict(q_segment_ids=sq, kv_segment_ids=sk) if segs else {}
    mask = make_mask(tq, tk, b, **static_mask, **arrays)
    out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, mask, scale=h ** -0.5,
                                                       interpret=False, kernel="mosaic_gpu"), q, k, v)
    return out, vjp(out)

  text = jax.jit(f).trace(qs, ks, ks, seg_q, seg_k).lower(lowering_platforms=("cuda",)).as_text()
  mosaic_bwd = h in mosaic_gpu.BWD_HEAD_DIMS
  assert text.count("@mosaic_gpu_v2") == (3 if mosaic_bwd else 1)  # forward (+ dQ, dK/dV)
  assert text.count("__gpu$xla.gpu.triton") == (0 if mosaic_bwd else 2)


# (id, head_dim, dtype, B, Tq, Tk, N, K, causal, window, segments?, block_q, block_k, num_stages)
BWD_LOWER_CASES = [
    ("h64_bf16_causal_two_wg", 64, jnp.bfloat16, 1, 512, 512, 2, 2, True, None, False, 128, 128, 3),
    ("h128_fp16_window_seg_gqa_ragged", 128, jnp.float16, 2, 300, 333, 4, 2, False, (100, 20), True,
     128, 192, 2),
    ("h128_bf16_dense_tq_gt_tk_one_wg_one_stage", 128, jnp.bfloat16, 1, 200, 70, 2, 2, False, None,
     False, 64, 64, 1),
    ("h64_fp16_one_sided_mqa", 64, jnp.float16, 1, 50, 190, 4, 1, False, (None, 3), False, 64, 192, 2),
    ("h128_bf16_causal_seg_three_stages", 128, jnp.bfloat16, 1, 1000, 1000, 2, 1, True, (300, None),
     True, 128, 128, 3),
    ("h256_bf16_causal_portable", 256, jnp.bfloat16, 1, 200, 300, 4, 1, True, None, True, 128, 64, 2),
]


@pytest.mark.parametrize("case", BWD_LOWER_CASES, ids=[c[0] for c in BWD_LOWER_CASES])
def test_backward_lowers_for_cuda(case):
  """`mosaic_gpu.backward_dq` / `backward_dkdv` on padded arrays lower for CUDA (Mosaic GPU kernels,
  including the shared-memory budget); head_dim 256 falls back to the portable (Triton) kernels."""
  _, h, dtype, b, tq, tk, n, kh, causal, window, segs, bq, bk, stages = case
  tqp, tkp = -(-tq // bq) * bq, -(-tk // bk) * bk
  cfg = portable.KernelConfig(q_len=tq, kv_len=tk, causal=causal, window=window, has_segments=segs,
                              scale=h ** -0.5, block_q=bq, block_k=bk, interpret=False,
                              num_stages=stages)
  qs = jax.ShapeDtypeStruct((b, n, tqp, h), dtype)
  ks = jax.ShapeDtypeStruct((b, kh, tkp, h), dtype)
  st = jax.ShapeDtypeStruct((b, n, tqp), jnp.float32)
  sq = jax.ShapeDtypeStruct((b, tqp), jnp.int32) if segs else None
  sk = jax.ShapeDtypeStruct((b, tkp), jnp.int32) if segs else None
  mosaic = h in mosaic_gpu.BWD_HEAD_DIMS
  for fn in (mosaic_gpu.backward_dq, mosaic_gpu.backward_dkdv):
    f = functools.partial(fn, cfg)
    text = jax.jit(f).trace(qs, ks, ks, qs, st, st, sq, sk).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("@mosaic_gpu_v2") == (1 if mosaic else 0), fn.__name__
    assert text.count("__gpu$xla.gpu.triton") == (0 if mosaic else 1), fn.__name__


def test_block_table_fits_shared_memory():
  """The largest table blocks lower (Mosaic checks the 227 KiB SMEM budget at lowering); an oversized
  block is rejected there, so the check is real."""
  def lower(h, block_k):
    spec = jax.ShapeDtypeStruct((1, 512, 1, h), jnp.bfloat16)
    mask = make_mask(512, 512, 1)
    f = lambda q, k, v: flash_attention(q, k, v, mask, scale=1.0, interpret=False,
                                        kernel="mosaic_gpu", block_k=block_k)
    return jax.jit(f).trace(spec, spec, spec).lower(lowering_platforms=("cuda",)).as_text()

  for h in (64, 128, 256):
    assert "@mosaic_gpu_v2" in lower(h, None)
  with pytest.raises(Exception, match="shared memory"):
    lower(256, 256)


def test_backward_shared_memory_budget_is_checked():
  """An oversized backward ring (head_dim 128, 5 stages) is rejected at lowering, so the budget check
  of the lowering tests is real."""
  cfg = portable.KernelConfig(q_len=256, kv_len=256, causal=True, window=None, has_segments=False,
                              scale=1.0, block_q=128, block_k=128, interpret=False, num_stages=5)
  x = jax.ShapeDtypeStruct((1, 1, 256, 128), jnp.bfloat16)
  st = jax.ShapeDtypeStruct((1, 1, 256), jnp.float32)
  for fn in (mosaic_gpu.backward_dq, mosaic_gpu.backward_dkdv):
    with pytest.raises(Exception, match="shared memory"):
      jax.jit(functools.partial(fn, cfg)).trace(x, x, x, x, st, st, None, None).lower(
          lowering_platforms=("cuda",))


# ----------------------------------------------------------------------------------------------------
# Block ranges (pure integer logic, no kernel).

def _visible(cfg, tqp: int, tkp: int) -> np.ndarray:
  """NumPy [Tqp, Tkp] bool: the key tail and the causal/window band (no segments), from the formulas."""
  left, r = portable._band(cfg)
  rows, cols = np.arange(tqp)[:, None], np.arange(tkp)[None, :]
  pos = rows + cfg.kv_len - cfg.q_len
  visible = np.broadcast_to(cols < cfg.kv_len, (tqp, tkp)).copy()
  if r is not None:
    visible &= cols <= pos + r
  if left is not None:
    visible &= cols >= pos - left
  return visible


@pytest.mark.parametrize("tq,tk,causal,window,bq,bk", [
    (300, 300, True, None, 128, 128), (130, 200, True, None, 128, 64), (200, 70, True, None, 64, 64),
    (256, 256, False, (70, 20), 128, 64), (200, 333, True, (100, None), 128, 128),
    (150, 100, False, (None, 3), 64, 64), (256, 256, False, None, 128, 128),
])
@pytest.mark.parametrize("segments", [False, True])
def test_step_ranges(tq, tk, causal, window, bq, bk, segments):
  cfg = portable.KernelConfig(q_len=tq, kv_len=tk, causal=causal, window=window,
                              has_segments=segments, scale=1.0, block_q=bq, block_k=bk,
                              interpret=True)
  tqp, tkp = -(-tq // bq) * bq, -(-tk // bk) * bk
  nq, nk = tqp // bq, tkp // bk
  visible = _visible(cfg, tqp, tkp)
  for i in range(nq):
    lo_c, hi_c = mosaic_gpu.cta_kv_range(cfg, i, nk, tqp, tkp)
    assert (int(lo_c), int(hi_c)) == tuple(map(int, portable.kv_block_range(cfg, i, nk)))
    for w in range(bq // 64):
      row0 = i * bq + w * 64
      lo, flo, fhi, hi = map(int, mosaic_gpu.wg_kv_ranges(cfg, row0, lo_c, hi_c, tqp, tkp))
      assert int(lo_c) <= lo <= flo <= fhi <= hi <= int(hi_c)
      # Every visible pair of the warpgroup's real rows lies in its computed steps [lo, hi).
      real = visible[row0:min(row0 + 64, tq)]
      steps = np.nonzero(real.reshape(real.shape[0], nk, bk).any(axis=(0, 2)))[0]
      assert all(lo <= j < hi for j in steps), (i, w, steps, lo, hi)
      # Interior steps are fully visible to all 64 rows (padded ones too): no mask needed.
      tile = visible[row0:row0 + 64]
      for j in range(flo, fhi):
        assert tile[:, j * bk:(j + 1) * bk].all(), (i, w, j)
      if segments:
        assert flo == fhi


@pytest.mark.parametrize("tq,tk,causal,window,bk", [
    (300, 300, True, None, 128), (130, 200, True, None, 64), (200, 70, True, None, 64),
    (256, 256, False, (70, 20), 128), (200, 333, True, (100, None), 128), (150, 100, False, (None, 3), 64),
    (256, 256, False, None, 128), (100, 250, False, (10, 10), 128), (64, 64, False, (0, 0), 64),
])
@pytest.mark.parametrize("segments", [False, True])
def test_backward_step_ranges(tq, tk, causal, window, bk, segments):
  """dK/dV kernel: the CTA's query tiles equal `portable.q_block_range`; each warpgroup's (64 keys)
  tiles cover every visible pair and its interior tiles need no mask."""
  bq = mosaic_gpu.BWD_TILE
  cfg = portable.KernelConfig(q_len=tq, kv_len=tk, causal=causal, window=window,
                              has_segments=segments, scale=1.0, block_q=bq, block_k=bk,
                              interpret=True)
  tqp, tkp = -(-tq // bq) * bq, -(-tk // bk) * bk
  nq, nk = tqp // bq, tkp // bk
  visible = _visible(cfg, tqp, tkp)
  for j in range(nk):
    lo_c, hi_c = mosaic_gpu.cta_q_range(cfg, j, nq, tqp, tkp)
    assert (int(lo_c), int(hi_c)) == tuple(map(int, portable.q_block_range(cfg, j, nq)))
    for w in range(bk // 64):
      col0 = j * bk + w * 64
      lo, flo, fhi, hi = map(int, mosaic_gpu.wg_q_ranges(cfg, col0, lo_c, hi_c, tqp, tkp))
      assert int(lo_c) <= lo <= flo <= fhi <= hi <= int(hi_c)
      real = visible[:tq, col0:col0 + 64]
      tiles = np.nonzero(np.pad(real, ((0, tqp - tq), (0, 0))).reshape(nq, bq, 64).any(axis=(1, 2)))[0]
      assert all(lo <= i < hi for i in tiles), (j, w, tiles, lo, hi)
      for i in range(flo, fhi):  # every row of the tile, padded ones too, sees all 64 keys
        assert visible[i * bq:(i + 1) * bq, col0:col0 + 64].all(), (j, w, i)
      if segments:
        assert flo == fhi


# ----------------------------------------------------------------------------------------------------
# Values in Mosaic GPU interpret mode.

def _check(case, grads):
  """Forward in interpret mode against xla (and its lse against the portable kernel); with grads, the
  custom_vjp's rules (the Mosaic forward's residuals -> the Mosaic dQ and dK/dV kernels, or the
  portable ones at head_dim 256) against xla's gradients."""
  b, tq, tk, n, kh, h, dtype, static_mask, seg_cuts, block = case
  q, k, v, ct = qkv_inputs(tq + tk, b, tq, tk, n, kh, h, dtype)
  arrays = {}
  if seg_cuts:
    arrays = dict(q_segment_ids=_segments(b, tq, seg_cuts[0]),
                  kv_segment_ids=_segments(b, tk, seg_cuts[1]))
  mask = make_mask(tq, tk, b, **static_mask, **arrays)
  f32 = lambda x: np.asarray(x, np.float32)
  up = lambda x: x.astype(jnp.float32)
  ref, ref_vjp = jax.vjp(lambda q, k, v: xla_attention(q, k, v, mask, scale=SCALE), up(q), up(k), up(v))
  tol = DTYPE_TOL[dtype]
  if not grads:  # through the public wrapper (padding, segment ids, layout)
    out = jax.jit(lambda q, k, v: flash_attention(q, k, v, mask, scale=SCALE, interpret=True,
                                                  kernel="mosaic_gpu", block_q=block[0],
                                                  block_k=block[1]))(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    np.testing.assert_allclose(f32(out), f32(ref), atol=tol, rtol=tol)
    return {"out": float(np.abs(f32(out) - f32(ref)).max())}
  # The custom_vjp's forward and backward rules, each in its own jit (Mosaic GPU interpret mode
  # deadlocks when its kernel is traced under jax.vjp / linearize in jax 0.10: its simulated
  # warpgroup threads are separate executions with ordered effects).
  from jaxlab.attention.flash import _flash_bwd, _flash_fwd, _segment_ids, choose_blocks
  bq, bk = block
  tqp, tkp = -(-tq // bq) * bq, -(-tk // bk) * bk
  q_seg, kv_seg = _segment_ids(mask, b, tqp, tkp)
  cfg = portable.KernelConfig(q_len=tq, kv_len=tk, causal=mask.causal, window=mask.window,
                              has_segments=q_seg is not None, scale=SCALE, block_q=bq, block_k=bk,
                              interpret=True, num_stages=choose_blocks("mosaic_gpu", h, tq, tk).num_stages)
  pad = lambda x, t, tp: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  args = (pad(q, tq, tqp), pad(k, tk, tkp), pad(v, tk, tkp), q_seg, kv_seg)
  o_p, res = jax.jit(lambda *a: _flash_fwd(cfg, mosaic_gpu, *a))(*args)
  out = jnp.swapaxes(o_p[:, :, :tq], 1, 2)
  assert out.dtype == dtype
  err = {"out": float(np.abs(f32(out) - f32(ref)).max())}
  np.testing.assert_allclose(f32(out), f32(ref), atol=tol, rtol=tol)
  lse_ref, lse = f32(portable.forward(cfg, *args)[1][:, :, :tq]), f32(res[-1][:, :, :tq])
  sees_keys = lse_ref > 0.5 * _NEG  # rows that see no key carry the sentinel, checked exactly
  err["lse"] = float(np.abs(lse - lse_ref)[sees_keys].max())
  assert err["lse"] < 1e-2 * max(1.0, float(np.abs(lse_ref[sees_keys]).max()) / 10)
  np.testing.assert_array_equal(lse[~sees_keys], lse_ref[~sees_keys])
  grads = jax.jit(lambda res, ct: _flash_bwd(cfg, mosaic_gpu, res, ct)[:3])(res, pad(ct, tq, tqp))
  ref_grads = ref_vjp(up(ct))
  for name, g, rg, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
    g = jnp.swapaxes(g[:, :, :x.shape[1]], 1, 2)
    assert g.dtype == dtype and np.isfinite(f32(g)).all(), name
    err[name] = float(np.abs(f32(g) - f32(rg)).max())
    np.testing.assert_allclose(f32(g), f32(rg), atol=GRAD_TOL[dtype], rtol=GRAD_TOL[dtype],
                               err_msg=name)
  return err


# (B, Tq, Tk, N, K, H, dtype, static mask, (q cut, kv cut) of two segments or None, (block_q, block_k))
INTERPRET_CASES = {
    # one compute warpgroup, GQA, causal + window + separate q/kv segments, ragged tails, bf16, grads
    "one_wg_bf16_causal_window_segments_gqa": (
        1, 50, 90, 2, 1, 64, jnp.bfloat16, dict(causal=True, window=(40, None)), (20, 30), (64, 64)),
    # two compute warpgroups (pingpong rendezvous), 4 K/V steps through a 3-slot ring (refill + drain),
    # causal with Tq < Tk, fp16
    "two_wg_fp16_causal_ring": (1, 130, 200, 1, 1, 64, jnp.float16, dict(causal=True), None, (128, 64)),
    # backward: dK/dV CTA of two warpgroups (128 keys) over two 64-row query tiles per query head, two
    # heads per kv head (GQA): 4 Q/dO steps through the 3-slot ring (refill across heads); dQ CTAs of
    # two warpgroups over two K/V tiles; interior (unmasked) and edge tiles of the causal band
    "two_wg_fp16_causal_gqa_two_q_tiles": (
        1, 100, 100, 2, 1, 64, jnp.float16, dict(causal=True), None, (128, 64)),
}
SLOW_INTERPRET_CASES = {
    "two_wg_bf16_window_segments_mqa": (
        1, 150, 130, 2, 1, 64, jnp.bfloat16, dict(window=(30, 10)), (60, 70), (128, 64)),
    "one_wg_fp16_h128_dense_tq_gt_tk": (1, 100, 60, 2, 2, 128, jnp.float16, {}, None, (64, 64)),
    "two_wg_bf16_causal_tq_gt_tk_empty_rows": (
        1, 200, 70, 1, 1, 64, jnp.bfloat16, dict(causal=True), None, (128, 64)),
    # two-sided window without segment ids: interior and edge tiles on both sides of the band in the
    # dQ and dK/dV kernels, GQA ring refills across heads
    "two_wg_fp16_window_gqa_interior": (
        1, 150, 130, 2, 1, 64, jnp.float16, dict(window=(30, 10)), None, (128, 64)),
}


def test_interpret_one_warpgroup_with_gradients():
  err = _check(INTERPRET_CASES["one_wg_bf16_causal_window_segments_gqa"], grads=True)
  print("max errors", err)


def test_interpret_two_warpgroups_pingpong_ring():
  err = _check(INTERPRET_CASES["two_wg_fp16_causal_ring"], grads=False)
  print("max errors", err)


def test_interpret_backward_two_query_tiles_per_key_block():
  err = _check(INTERPRET_CASES["two_wg_fp16_causal_gqa_two_q_tiles"], grads=True)
  print("max errors", err)


@slow
@pytest.mark.parametrize("name", sorted(SLOW_INTERPRET_CASES))
def test_interpret_more_cases(name):
  print("max errors", _check(SLOW_INTERPRET_CASES[name], grads=True))


# ----------------------------------------------------------------------------------------------------
# Dispatch and argument checks.

def test_dispatch_and_supports():
  spec = lambda hd, dtype=jnp.bfloat16: jax.ShapeDtypeStruct((1, 8, 2, hd), dtype)
  ok = lambda *a, **kw: flash.supports_mosaic_gpu(*a, check_device=False, **kw)[0]
  assert ok(spec(128), spec(128), spec(128))
  assert ok(spec(64, jnp.float16), spec(64, jnp.float16), spec(64, jnp.float16))
  assert not ok(spec(128, jnp.float32), spec(128, jnp.float32), spec(128, jnp.float32))
  assert not ok(spec(80), spec(80), spec(80))
  assert not ok(spec(64), spec(64), spec(64), bias=1.0)
  assert "mosaic_gpu" in flash.KERNELS
  if not flash.is_hopper():
    assert not flash.supports_mosaic_gpu(spec(128), spec(128), spec(128))[0]
  if jax.default_backend() == "cpu":  # CPU default is unchanged: no kernel in the traced program
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    assert "pallas_call" not in str(jax.make_jaxpr(
        lambda q: dot_product_attention(q, q, q, causal=True))(q))


def test_bad_arguments_are_named():
  mask = make_mask(64, 64, 1)
  q16 = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="bfloat16"):
    q32 = q16.astype(jnp.float32)
    flash_attention(q32, q32, q32, mask, scale=1.0, kernel="mosaic_gpu", interpret=True)
  with pytest.raises(ValueError, match="head_dim"):
    q80 = jnp.zeros((1, 64, 1, 80), jnp.bfloat16)
    flash_attention(q80, q80, q80, mask, scale=1.0, kernel="mosaic_gpu", interpret=True)
  with pytest.raises(ValueError, match="block_q"):
    flash_attention(q16, q16, q16, mask, scale=1.0, kernel="mosaic_gpu", block_q=32, interpret=True)
  with pytest.raises(ValueError, match="block_k"):
    flash_attention(q16, q16, q16, mask, scale=1.0, kernel="mosaic_gpu", block_k=96, interpret=True)


def test_explicit_tiles_the_mosaic_kernel_refuses_go_to_the_portable_kernel(monkeypatch):
  """On a Hopper GPU (simulated: the choice only, interpret mode) the default kernel choice took the
  Mosaic kernel whatever the tiles, so block_q=32, which works on an A100, raised there."""
  monkeypatch.setattr(flash, "is_hopper", lambda device=None: True)
  monkeypatch.setattr(flash, "MOSAIC_GPU_BY_DEFAULT", True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  q, k, v, _ = qkv_inputs(0, 1, 40, 40, 2, 2, 64, jnp.bfloat16)
  mask = make_mask(40, 40, 1, causal=True)
  with pytest.raises(ValueError, match="block_q must be 64 or 128"):  # asked for Mosaic: refused
    flash_attention(q, k, v, mask, scale=0.125, block_q=32, kernel="mosaic_gpu", interpret=True)
  out = flash_attention(q, k, v, mask, scale=0.125, block_q=32, block_k=16, interpret=True)
  want = xla_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                       mask=mask, scale=0.125)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2)


# ----------------------------------------------------------------------------------------------------
# Real Hopper GPU.

@pytest.mark.skipif(not flash.is_hopper(), reason="needs an NVIDIA Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("h,dtype,causal", [(128, jnp.bfloat16, True), (64, jnp.float16, False),
                                            (256, jnp.bfloat16, True)])
def test_on_hopper_matches_xla(h, dtype, causal, monkeypatch):
  # Checks the Hopper default dispatch (MOSAIC_GPU_BY_DEFAULT; set here too, so that the test keeps
  # checking the kernel if the default is ever switched off again).
  monkeypatch.setattr(flash, "MOSAIC_GPU_BY_DEFAULT", True)
  b, t, n, kh = 2, 2048, 8, 2
  q, k, v, ct = qkv_inputs(h, b, t, t, n, kh, h, dtype)
  seg = _segments(b, t, 700)
  kw = dict(causal=causal, q_segment_ids=seg, kv_segment_ids=seg, scale=h ** -0.5)

  def run(impl):
    fn = lambda q, k, v: dot_product_attention(q, k, v, implementation=impl, **kw)
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(ct)

  text = jax.jit(lambda q, k, v: run("pallas")).lower(q, k, v).as_text()
  # The default pallas dispatch picked the Hopper kernels (the call target: this file's own path
  # contains "mosaic_gpu"): forward, dQ and dK/dV, or the forward alone at head_dim 256.
  assert text.count("@mosaic_gpu_v2") == (3 if h in mosaic_gpu.BWD_HEAD_DIMS else 1)
  got = jax.jit(lambda q, k, v: run("pallas"))(q, k, v)
  up = lambda x: x.astype(jnp.float32)
  want = jax.jit(lambda q, k, v: run("xla"))(up(q), up(k), up(v))
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    tol = (DTYPE_TOL if name == "out" else GRAD_TOL)[dtype]
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=tol, rtol=tol,
                               err_msg=name)
