"""The compiled Pallas flash-attention kernels on a real CUDA GPU, against the XLA reference.

Skipped without a GPU (the CPU suite checks the same kernels in interpret mode: test_flash.py and
test_flash_mosaic_gpu.py). Run them with

    JAX_PLATFORMS=cuda python -m pytest tests/attention/test_flash_gpu.py

Each case compiles the kernel for the device with the block table's own tiles (`blocks.TABLE`), so the
lengths are ragged against them (Tq, Tk not multiples of 64 or 128, Tq != Tk) and every mask feature
is covered: causal with Tq < Tk and Tq > Tk (rows that see no key), separate q/kv segment ids, a batch
row with kv_length 0, sliding and one-sided windows, GQA and MQA, head_dim 64/128/256. Values and
dQ/dK/dV are compared with float32 "xla" on the same (rounded) inputs: the largest error must stay
within a bound per dtype (relative to the reference's largest value) or within twice the error of
"xla" itself run in the same dtype; query rows that see no key must give exact zeros. The lowered
program must call the kernels asked for, forward, dQ and dK/dV (a silent fallback to XLA or to the
other kernel would pass the numerical comparison).

With JAXLAB_GPU_ERRORS=FILE each case appends its largest errors to FILE (one JSON object per line).
"""

import json
import os

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from attention_test_utils import qkv_inputs, segment_ids

from jaxlab.attention import flash
from jaxlab.attention.flash import flash_attention, mosaic_gpu
from jaxlab.attention.masks import make_mask
from jaxlab.attention.softmax import xla_attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a CUDA GPU (JAX_PLATFORMS=cuda)")
SCALE = 0.37
# Bounds (absolute and relative) against float32 "xla". float32 runs IEEE matmuls here (the suite sets
# jax_default_matmul_precision="highest"; with the default precision Triton takes TF32, as XLA does).
TOL = {jnp.float32: 2e-4, jnp.bfloat16: 5e-2, jnp.float16: 1e-2}
# Custom-call targets of the two kernels in a lowered program (matched with their "@", so a file path
# or function name that merely contains "mosaic_gpu" does not count).
TRITON_CALL, MOSAIC_CALL = "@__gpu$xla.gpu.triton", "@mosaic_gpu_v2"


def kernel_calls(kernel: str, h: int) -> dict:
  """{call target: count} of one forward + backward: forward, dQ and dK/dV kernels."""
  if kernel == "portable":
    return {TRITON_CALL: 3, MOSAIC_CALL: 0}
  mosaic_backward = h in mosaic_gpu.BWD_HEAD_DIMS  # head_dim 256: portable dQ and dK/dV
  return {MOSAIC_CALL: 3 if mosaic_backward else 1, TRITON_CALL: 0 if mosaic_backward else 2}


def _mask_arrays(kind, b, tq, tk):
  if kind is None:
    return {}
  if kind == "segments":  # separate q and kv ids; segment 2 of row 1 has queries but no keys
    return dict(q_segment_ids=segment_ids(b, tq, [[tq // 3], [tq // 5, tq // 2]][:b]),
                kv_segment_ids=segment_ids(b, tk, [[tk // 3], [tk // 5, tk]][:b]))
  if kind == "lengths":  # row 1 has no valid key at all
    return dict(q_lengths=jnp.array([tq - 7, tq], jnp.int32)[:b],
                kv_lengths=jnp.array([tk - 40, 0], jnp.int32)[:b])
  if kind == "all":
    return dict(q_segment_ids=segment_ids(b, tq, [[tq // 2], [tq // 4]][:b]),
                kv_segment_ids=segment_ids(b, tk, [[tk // 2], [tk // 4]][:b]),
                q_lengths=jnp.array([tq - 3, tq - 60], jnp.int32)[:b],
                kv_lengths=jnp.array([tk - 11, tk], jnp.int32)[:b])
  raise ValueError(kind)


def _check(kernel, case, dtype):
  name, b, tq, tk, n, kh, h, static_mask, kind = case
  q, k, v, ct = qkv_inputs(len(name) + h, b, tq, tk, n, kh, h, dtype)
  arrays = _mask_arrays(kind, b, tq, tk)

  def value_and_grads(fn, q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(ct)

  @jax.jit  # one program per case: compiling is most of a case's time on a GPU
  def run(q, k, v, ct, arrays):
    mask = make_mask(tq, tk, b, **static_mask, **arrays)
    ours = lambda q, k, v: flash_attention(q, k, v, mask, scale=SCALE, kernel=kernel)
    xla = lambda q, k, v: xla_attention(q, k, v, mask, scale=SCALE)
    up = lambda x: x.astype(jnp.float32)
    plain = xla_attention(up(q), up(k), up(v), make_mask(tq, tk, b), scale=SCALE)
    return (value_and_grads(ours, q, k, v, ct), value_and_grads(xla, up(q), up(k), up(v), up(ct)),
            value_and_grads(xla, q, k, v, ct), plain)

  lowered = run.lower(q, k, v, ct, arrays)
  text = lowered.as_text()
  for target, count in kernel_calls(kernel, h).items():
    assert text.count(target) == count, f"{kernel}: {text.count(target)} calls of {target}, not {count}"
  got, want, low, plain = lowered.compile()(q, k, v, ct, arrays)
  tol = TOL[dtype]
  errors = {}
  for gname, g, w, r, x in zip(("out", "dq", "dk", "dv"), got, want, low, (q, q, k, v)):
    assert g.shape == x.shape and g.dtype == dtype, gname
    g32, w32, r32 = (np.asarray(a, np.float32) for a in (g, w, r))
    assert np.isfinite(g32).all(), gname
    err, err_xla = float(np.max(np.abs(g32 - w32))), float(np.max(np.abs(r32 - w32)))
    errors[gname], errors[gname + "_xla_same_dtype"] = err, err_xla
    # Bound: tol relative to the reference's largest value, or twice what XLA's own run in this dtype
    # misses by (float32: XLA's run is the reference itself, so only the first applies).
    bound = max(tol * max(1.0, float(np.max(np.abs(w32)))), 2.0 * err_xla)
    assert err <= bound, f"{kernel} {name} {gname}: max |error| {err:.3g} > bound {bound:.3g}"
  # Query rows that see no key (the reference gives them exact zeros) get exact zeros and no gradient.
  empty = np.all(np.asarray(want[0]) == 0.0, axis=-1)  # [B, Tq, N]
  if "empty" in name or kind in ("segments", "lengths"):
    assert empty.any(), "the case was built to have query rows that see no key"
  for gname, g in zip(("out", "dq"), got[:2]):
    np.testing.assert_array_equal(np.asarray(g, np.float32)[empty], 0.0, err_msg=gname)
  if kind == "lengths":  # the batch row with no valid key: no gradient reaches its keys either
    for gname, g in zip(("dk", "dv"), got[2:]):
      np.testing.assert_array_equal(np.asarray(g[1], np.float32), 0.0, err_msg=gname)
  # The comparison can fail: the unmasked result is far from the masked one.
  if static_mask or arrays:
    assert np.abs(np.asarray(plain) - np.asarray(want[0])).max() > 10 * tol
  report = os.environ.get("JAXLAB_GPU_ERRORS")
  if report:
    with open(report, "a") as f:
      f.write(json.dumps(dict(kernel=kernel, case=name, dtype=jnp.dtype(dtype).name,
                              device=jax.devices()[0].device_kind, **errors)) + "\n")


# (id, B, Tq, Tk, N, K, H, static mask, mask arrays)
CASES = [
    ("dense_gqa_h64", 2, 300, 517, 4, 2, 64, {}, None),
    ("causal_tq_lt_tk_h128", 1, 300, 517, 4, 4, 128, dict(causal=True), None),
    ("causal_tq_gt_tk_empty_rows_h64", 1, 517, 300, 2, 1, 64, dict(causal=True), None),
    ("window_mqa_h128", 1, 700, 700, 4, 1, 128, dict(window=(130, 40)), None),
    ("window_one_sided_h64", 1, 300, 517, 2, 2, 64, dict(window=(None, 70)), None),
    ("segments_separate_q_kv_h128", 2, 300, 517, 2, 2, 128, {}, "segments"),
    ("lengths_empty_row_h64", 2, 300, 517, 2, 1, 64, dict(causal=True), "lengths"),
    ("all_combined_gqa_h256", 2, 300, 517, 4, 2, 256, dict(causal=True, window=(200, None)), "all"),
]
BY_NAME = {c[0]: c for c in CASES}
ids = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_portable_kernel_bf16(case):
  _check("portable", case, jnp.bfloat16)


@pytest.mark.parametrize("dtype,name", [(jnp.float32, "all_combined_gqa_h256"),
                                        (jnp.float32, "window_mqa_h128"),
                                        (jnp.float16, "segments_separate_q_kv_h128"),
                                        (jnp.float16, "causal_tq_gt_tk_empty_rows_h64")])
def test_portable_kernel_other_dtypes(dtype, name):
  _check("portable", BY_NAME[name], dtype)


needs_hopper = pytest.mark.skipif(not flash.is_hopper(), reason="needs a Hopper GPU (compute 9.x)")


@needs_hopper
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_mosaic_gpu_kernel_bf16(case):
  _check("mosaic_gpu", case, jnp.bfloat16)


@needs_hopper
@pytest.mark.parametrize("name", ["segments_separate_q_kv_h128", "causal_tq_gt_tk_empty_rows_h64",
                                  "all_combined_gqa_h256"])
def test_mosaic_gpu_kernel_fp16(name):
  _check("mosaic_gpu", BY_NAME[name], jnp.float16)
