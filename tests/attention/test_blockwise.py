"""Blockwise (memory-efficient, FlashAttention-style) attention against the XLA reference.

Values and gradients (dq, dk, dv, dbias) must match `xla_attention` for every mask combination, with
lengths that are not multiples of the (deliberately small) block sizes, so every case has several tiles
and ragged tails. The mask arrays are passed into the jitted function, so they are traced as in training.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from attention_test_utils import max_intermediate_size

from jaxlab.attention.blockwise import blockwise_attention
from jaxlab.attention.masks import make_mask
from jaxlab.attention.softmax import xla_attention

SCALE = 0.37  # not 1/sqrt(H), so a dropped or doubled scale shows


def _inputs(seed, b, tq, tk, n, kh, h, bias_shape=None, dtype=jnp.float32):
  """NumPy randomness (no per-shape eager XLA compiles, which dominate at these sizes)."""
  rng = np.random.default_rng(seed)
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
  q, k, v = normal((b, tq, n, h)), normal((b, tk, kh, h)), normal((b, tk, kh, h))
  bias = None if bias_shape is None else normal(bias_shape)
  return q, k, v, bias, normal((b, tq, n, h))


def _value_and_grads(impl, q, k, v, bias, ct, static_mask, arrays, block=(8, 8)):
  """(out, (dq, dk, dv, dbias)) of `impl` under jit, the mask's arrays traced."""
  b, tq = q.shape[:2]
  tk = k.shape[1]

  @jax.jit
  def run(q, k, v, bias, arrays, ct):
    def f(q, k, v, bias):
      mask = make_mask(tq, tk, b, **static_mask, **arrays)
      if impl == "blockwise":
        return blockwise_attention(q, k, v, mask, bias=bias, scale=SCALE, block_q=block[0],
                                   block_k=block[1])
      return xla_attention(q, k, v, mask, bias=bias, scale=SCALE)

    out, vjp = jax.vjp(f, q, k, v, bias)
    return out, vjp(ct)

  return run(q, k, v, bias, arrays, ct)


def _segments(b, t, cuts, seed):
  """Segment ids [b, t]: row r is split at the positions cuts[r]."""
  ids = np.zeros((b, t), np.int32)
  for r in range(b):
    for c in cuts[r]:
      ids[r, c:] += 1
  return jnp.asarray(ids + seed)


# (id, B, Tq, Tk, N, K, H, static mask kwargs, array mask kwargs (built from b, tq, tk), bias shape,
#  (block_q, block_k))
CASES = [
    ("none", 2, 13, 13, 2, 2, 8, {}, None, None, (8, 8)),
    ("causal_tq_lt_tk", 2, 13, 29, 2, 2, 8, dict(causal=True), None, None, (8, 16)),
    ("window", 1, 29, 29, 2, 2, 8, dict(window=(4, 2)), None, None, (16, 8)),
    ("window_one_sided", 2, 13, 29, 2, 2, 8, dict(window=(None, 3)), None, None, (8, 8)),
    ("segments", 2, 29, 29, 2, 2, 8, {}, "segments", None, (8, 8)),
    ("lengths", 2, 13, 29, 2, 2, 8, {}, "lengths", None, (8, 8)),
    ("bias", 2, 13, 29, 2, 2, 8, {}, None, (2, 2, 13, 29), (8, 8)),
    ("gqa_causal_alibi_bias", 1, 29, 29, 4, 2, 8, dict(causal=True), None, (4, 1, 29), (8, 16)),
    # Broadcast over heads and queries. (A [B, 1, Tq, 1] bias adds a constant per row, which the
    # softmax ignores: its true gradient is 0 and the case tested nothing.)
    ("mqa_window_bias", 2, 13, 29, 4, 1, 16, dict(window=(6, 1)), None, (2, 1, 1, 29), (8, 8)),
    ("all_combined_gqa", 2, 13, 29, 4, 2, 8, dict(causal=True, window=(9, None)), "all",
     (1, 4, 13, 29), (8, 8)),
]


def _mask_arrays(kind, b, tq, tk):
  if kind is None:
    return {}
  if kind == "segments":
    seg = _segments(b, tq, [[7, 20], [11]], seed=3)
    return dict(q_segment_ids=seg, kv_segment_ids=seg)
  if kind == "lengths":
    return dict(q_lengths=jnp.array([9, 13], jnp.int32), kv_lengths=jnp.array([17, 29], jnp.int32))
  if kind == "all":
    return dict(q_segment_ids=_segments(b, tq, [[4], [9]], seed=0),
                kv_segment_ids=_segments(b, tk, [[21], [25]], seed=0),
                q_lengths=jnp.array([13, 11], jnp.int32), kv_lengths=jnp.array([27, 29], jnp.int32))
  raise ValueError(kind)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_values_and_gradients_match_reference(case):
  _, b, tq, tk, n, kh, h, static_mask, kind, bias_shape, block = case
  q, k, v, bias, ct = _inputs(len(case[0]), b, tq, tk, n, kh, h, bias_shape)
  arrays = _mask_arrays(kind, b, tq, tk)
  out, grads = _value_and_grads("blockwise", q, k, v, bias, ct, static_mask, arrays, block)
  ref, ref_grads = _value_and_grads("xla", q, k, v, bias, ct, static_mask, arrays)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
    if r is None:
      assert g is None, name
      continue
    assert g.shape == r.shape and g.dtype == r.dtype, name
    assert np.abs(np.asarray(r)).max() > 1e-2, name  # a gradient that is there to get wrong
    np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5, err_msg=name)


def test_rows_that_see_no_key_are_zero_with_finite_gradients():
  """Tq > Tk causal (the first Tq - Tk queries precede every key), plus a batch row with kv_length 0."""
  b, tq, tk, n, kh, h = 2, 13, 6, 2, 1, 8
  q, k, v, bias, ct = _inputs(7, b, tq, tk, n, kh, h, (b, n, tq, tk))
  arrays = dict(kv_lengths=jnp.array([6, 0], jnp.int32))
  out, grads = _value_and_grads("blockwise", q, k, v, bias, ct, dict(causal=True), arrays)
  ref, ref_grads = _value_and_grads("xla", q, k, v, bias, ct, dict(causal=True), arrays)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_array_equal(out[0, :tq - tk], 0.0)
  np.testing.assert_array_equal(out[1], 0.0)
  dq, dk, dv, dbias = grads
  np.testing.assert_array_equal(dq[0, :tq - tk], 0.0)
  np.testing.assert_array_equal(dq[1], 0.0)
  np.testing.assert_array_equal(dk[1], 0.0)
  np.testing.assert_array_equal(dv[1], 0.0)
  np.testing.assert_array_equal(dbias[1], 0.0)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5)


def test_bfloat16_inputs():
  """bf16 in, bf16 out; compared with the float32 reference on the same (bf16-rounded) inputs.

  Tolerance: 3e-2 absolute + relative for values and gradients (bf16 has an 8-bit mantissa, ~4e-3
  relative per rounding; probabilities and dS are rounded to bf16 before the matmuls, as in the
  reference). The bf16 reference itself is checked against the same bound so the bound is fair.
  """
  b, tq, tk, n, kh, h = 2, 13, 29, 4, 2, 8
  q, k, v, bias, ct = _inputs(11, b, tq, tk, n, kh, h, (1, n, tq, tk), dtype=jnp.bfloat16)
  static_mask = dict(causal=True, window=(9, None))
  arrays = _mask_arrays("all", b, tq, tk)
  out, grads = _value_and_grads("blockwise", q, k, v, bias, ct, static_mask, arrays)
  f32 = lambda x: x.astype(jnp.float32)
  ref, ref_grads = _value_and_grads("xla", *map(f32, (q, k, v, bias, ct)), static_mask, arrays)
  ref16, ref16_grads = _value_and_grads("xla", q, k, v, bias, ct, static_mask, arrays)
  assert out.dtype == jnp.bfloat16
  for g, x in zip(grads, (q, k, v, bias)):
    assert g.dtype == jnp.bfloat16 and g.shape == x.shape
  for a, r in [(out, ref), (ref16, ref)] + list(zip(grads, ref_grads)) + list(zip(ref16_grads,
                                                                                   ref_grads)):
    np.testing.assert_allclose(f32(a), r, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("qk_mult", [1.0, 4.0], ids=["unit", "peaky"])
def test_16_bit_gradients_are_as_precise_as_xla_s(dtype, qk_mult):
  """The error against float32 (relative to the largest entry) is at most 1.5x that of xla in the
  same dtype, plus a quarter rounding step. D = rowsum(dO * O) from the float32 output: from the
  16-bit one (the Pallas kernels' way), dK was 12x xla's error on peaked attention (q, k x4)."""
  q, k, v, _, ct = _inputs(13, 1, 19, 27, 4, 2, 64, None, dtype)
  q, k = ((x.astype(jnp.float32) * qk_mult).astype(dtype) for x in (q, k))
  static_mask = dict(causal=True, window=(11, None))
  f32 = lambda x: np.asarray(x, np.float32)
  got, low, ref = (
      _value_and_grads(impl, *(x if cast is None else x.astype(cast) for x in (q, k, v)), None,
                       ct if cast is None else ct.astype(cast), static_mask, {})
      for impl, cast in (("blockwise", None), ("xla", None), ("xla", jnp.float32)))
  floor = {jnp.bfloat16: 1e-3, jnp.float16: 1.2e-4}[dtype]
  for i, name in enumerate(("out", "dq", "dk", "dv")):
    pick = lambda result: result[0] if i == 0 else result[1][i - 1]
    want = f32(pick(ref))
    err, err_low = (np.abs(f32(pick(x)) - want).max() / np.abs(want).max() for x in (got, low))
    assert err <= 1.5 * err_low + floor, (name, err, err_low)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_q=0), "block_q"),
    (dict(block_k=-8), "block_k"),
    (dict(block_q=8.0), "block_q"),
    (dict(block_k=True), "block_k"),
])
def test_bad_block_sizes_name_the_argument(kwargs, match):
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match=match):
    blockwise_attention(q, q, q, make_mask(4, 4, 1), scale=1.0, **kwargs)


def test_mask_for_other_lengths_is_rejected():
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="mask"):
    blockwise_attention(q, q, q, make_mask(5, 4, 1), scale=1.0)


def test_memory_is_subquadratic():
  """Forward + backward at T=2048: every intermediate is at most 2 * (block_q * block_k * B * N + B * T * N
  * H) elements (measured: B * T * N * H, the inputs' size; one [block_q, Tk] row of tiles would already
  exceed it, a [Tq, Tk] matrix is 25x larger), and far less XLA temp memory than the reference."""
  t, h = 2048, 32
  spec = jax.ShapeDtypeStruct((1, t, 1, h), jnp.float32)
  mask = make_mask(t, t, 1, causal=True)
  impls = {
      "blockwise": lambda q, k, v: blockwise_attention(q, k, v, mask, scale=SCALE),
      "xla": lambda q, k, v: xla_attention(q, k, v, mask, scale=SCALE),
  }
  biggest, temp = {}, {}
  for name, fn in impls.items():
    grad = jax.grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))
    biggest[name] = max_intermediate_size(jax.make_jaxpr(grad)(spec, spec, spec).jaxpr)
    stats = jax.jit(grad).lower(spec, spec, spec).compile().memory_analysis()
    temp[name] = None if stats is None else stats.temp_size_in_bytes
  assert biggest["xla"] >= t * t  # the check can see a materialised score matrix
  block = 128  # blockwise_attention's default block_q = block_k
  assert biggest["blockwise"] <= 2 * (block * block * 1 * 1 + 1 * t * 1 * h), biggest
  assert 2 * (block * block + t * h) < block * t  # the bound excludes a [block_q, Tk] tile row
  if temp["xla"] is not None:  # memory_analysis is available on CPU in jax 0.10; be tolerant anyway
    assert temp["blockwise"] * 4 <= temp["xla"], temp
