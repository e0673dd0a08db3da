"""The XLA reference attention against a naive per-head loop, and the mask vocabulary's semantics."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxlab import attention
from jaxlab.attention.performer import performer_attention


def naive_attention(q, k, v, allowed, bias=None, soft_cap=None):
  """Loops over batch and heads in NumPy float64; allowed: [B, Tq, Tk] bool."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, tq, n, h = q.shape
  kh = k.shape[2]
  out = np.zeros((b, tq, n, h))
  for bi in range(b):
    for ni in range(n):
      ki = ni // (n // kh)
      logits = q[bi, :, ni] @ k[bi, :, ki].T / np.sqrt(h)
      if bias is not None:
        logits = logits + np.asarray(bias, np.float64)[bi, ni]
      if soft_cap is not None:
        logits = soft_cap * np.tanh(logits / soft_cap)
      for i in range(tq):
        row = allowed[bi, i]
        if not row.any():
          continue
        w = np.exp(logits[i, row] - logits[i, row].max())
        out[bi, i, ni] = (w / w.sum()) @ v[bi, row, ki]
  return out


def allowed_grid(b, tq, tk, causal=False, window=None, q_seg=None, kv_seg=None, kv_len=None,
                 q_len=None):
  allowed = np.ones((b, tq, tk), bool)
  for bi in range(b):
    for i in range(tq):
      ip = i + tk - tq
      for j in range(tk):
        ok = q_len is None or i < q_len[bi]
        if causal:
          ok &= j <= ip
        if window is not None:
          ok &= (window[0] is None or j >= ip - window[0]) and (window[1] is None or j <= ip + window[1])
        if q_seg is not None:
          ok &= q_seg[bi, i] == kv_seg[bi, j]
        if kv_len is not None:
          ok &= j < kv_len[bi]
        allowed[bi, i, j] = ok
  return allowed


def rand(key, shape):
  return jax.random.normal(key, shape, jnp.float32)


@pytest.mark.parametrize("tq,tk,n,kh", [(7, 7, 4, 4), (5, 9, 4, 2), (9, 9, 6, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, (2, 1)])
@pytest.mark.parametrize("with_q_lengths", [False, True])
def test_xla_matches_naive(tq, tk, n, kh, causal, window, with_q_lengths):
  kq, kk, kv, kb = jax.random.split(jax.random.key(0), 4)
  b, h = 2, 8
  q, k, v = rand(kq, (b, tq, n, h)), rand(kk, (b, tk, kh, h)), rand(kv, (b, tk, kh, h))
  bias = rand(kb, (b, n, tq, tk))
  q_len = np.array([tq - 2, tq]) if with_q_lengths else None
  out = attention.dot_product_attention(
      q, k, v, causal=causal, window=window, bias=bias, implementation="xla",
      q_lengths=None if q_len is None else jnp.asarray(q_len, jnp.int32))
  ref = naive_attention(q, k, v, allowed_grid(b, tq, tk, causal, window, q_len=q_len), bias)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  if with_q_lengths:  # padded queries give zeros; the others are unaffected by q_lengths
    np.testing.assert_array_equal(out[0, tq - 2:], 0.0)
    assert np.abs(np.asarray(ref[0, :tq - 2])).max() > 1e-2


def test_q_lengths_with_kv_lengths_value_and_gradient():
  """q_lengths and kv_lengths together against the naive grid; padded queries get zero gradients."""
  kq, kk, kv = jax.random.split(jax.random.key(6), 3)
  b, tq, tk, n, kh, h = 2, 6, 8, 4, 2, 8
  q, k, v = rand(kq, (b, tq, n, h)), rand(kk, (b, tk, kh, h)), rand(kv, (b, tk, kh, h))
  q_len, kv_len = np.array([4, 6]), np.array([8, 5])

  @jax.jit
  def run(q, k, v, q_len, kv_len):
    f = lambda q, k, v: attention.dot_product_attention(q, k, v, causal=True, q_lengths=q_len,
                                                        kv_lengths=kv_len, implementation="xla")
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(jnp.cos(out))  # the gradient of sum(sin(out))

  out, (dq, dk, dv) = run(q, k, v, jnp.asarray(q_len), jnp.asarray(kv_len))
  ref = naive_attention(q, k, v, allowed_grid(b, tq, tk, True, kv_len=kv_len, q_len=q_len))
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(dq[0, 4:], 0.0)
  np.testing.assert_array_equal(dk[1, 5:], 0.0)
  np.testing.assert_array_equal(dv[1, 5:], 0.0)
  assert np.abs(np.asarray(dq[0, :4])).min() > 0.0


def test_segments_and_padding_and_fully_masked_rows():
  b, t, n, h = 2, 6, 2, 4
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q, k, v = rand(kq, (b, t, n, h)), rand(kk, (b, t, n, h)), rand(kv, (b, t, n, h))
  seg = jnp.array([[1, 1, 2, 2, 2, 3], [5, 5, 5, 5, 6, 6]])
  kv_len = jnp.array([4, 6])
  out = attention.dot_product_attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                                        kv_lengths=kv_len)
  allowed = allowed_grid(b, t, t, True, None, np.asarray(seg), np.asarray(seg), np.asarray(kv_len))
  assert not allowed[0, 5].any()  # the test includes a row that sees nothing
  np.testing.assert_allclose(out, naive_attention(q, k, v, allowed), atol=2e-5)
  np.testing.assert_array_equal(out[0, 5], 0.0)

  def loss(q, k, v):
    return attention.dot_product_attention(q, k, v, causal=True, q_segment_ids=seg,
                                           kv_segment_ids=seg, kv_lengths=kv_len).sum()

  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_array_equal(grads[0][0, 5], 0.0)


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_segments_without_causality_and_out_of_order_ids(implementation):
  """Not causal, ids that go down and come back (packed segments in any order, separate q and kv
  ids): a query sees exactly the keys of its own id. Causal, increasing ids could not tell == from
  <= (a later segment's id is larger, and causality hides it anyway)."""
  b, tq, tk, n, h = 2, 6, 7, 2, 4
  kq, kk, kv = jax.random.split(jax.random.key(11), 3)
  q, k, v = rand(kq, (b, tq, n, h)), rand(kk, (b, tk, n, h)), rand(kv, (b, tk, n, h))
  q_seg = jnp.array([[3, 3, 1, 1, 2, 2], [0, 5, 0, 5, 9, 9]])
  kv_seg = jnp.array([[1, 3, 2, 3, 1, 2, 2], [5, 5, 0, 9, 0, 9, 5]])
  out = attention.dot_product_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                        implementation=implementation)
  allowed = np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
  np.testing.assert_allclose(out, naive_attention(q, k, v, allowed), atol=2e-5)


def test_gradient_matches_repeated_kv_mha():
  """GQA equals MHA with K/V repeated per group, in value and gradient."""
  b, t, n, kh, h = 2, 5, 6, 2, 4
  kq, kk, kv = jax.random.split(jax.random.key(2), 3)
  q, k, v = rand(kq, (b, t, n, h)), rand(kk, (b, t, kh, h)), rand(kv, (b, t, kh, h))

  def gqa(q, k, v):
    return (attention.dot_product_attention(q, k, v, causal=True) ** 2).sum()

  def mha(q, k, v):
    rep = lambda x: jnp.repeat(x, n // kh, axis=2)
    return (attention.dot_product_attention(q, rep(k), rep(v), causal=True) ** 2).sum()

  np.testing.assert_allclose(gqa(q, k, v), mha(q, k, v), rtol=1e-5)
  for a, r in zip(jax.grad(gqa, (0, 1, 2))(q, k, v), jax.grad(mha, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, r, atol=1e-5)


@pytest.mark.parametrize("shapes,match", [
    (((2, 4, 3, 8), (2, 4, 2, 8), (2, 4, 2, 8)), r"q heads \(3\).*k/v heads \(2\)"),
    (((2, 4, 4, 8), (2, 4, 2, 4), (2, 4, 2, 4)), r"k head_dim 4 does not match q head_dim 8"),
    (((2, 4, 8), (2, 4, 2, 8), (2, 4, 2, 8)), r"q must be .*\(2, 4, 8\)"),
    (((2, 4, 2, 8), (2, 4, 8), (2, 4, 2, 8)), r"k must be .*\(2, 4, 8\)"),
    (((2, 4, 2, 8), (2, 4, 2, 8), (2, 4, 2, 8, 1)), r"v must be .*\(2, 4, 2, 8, 1\)"),
    (((2, 4, 2, 8), (2, 4, 2, 8), (2, 5, 2, 8)), r"k and v .* k \(2, 4, 2, 8\) and v \(2, 5, 2, 8\)"),
    (((2, 4, 2, 8), (3, 4, 2, 8), (3, 4, 2, 8)), r"k batch 3 does not match q batch 2"),
])
def test_bad_shapes_name_the_argument(shapes, match):
  q, k, v = (jnp.zeros(s) for s in shapes)
  with pytest.raises(ValueError, match=match):
    attention.dot_product_attention(q, k, v)


@pytest.mark.parametrize("dtypes,match", [
    ((jnp.float32, jnp.bfloat16, jnp.float32), "k dtype bfloat16 does not match q dtype float32"),
    ((jnp.float32, jnp.float32, jnp.bfloat16), "v dtype bfloat16 does not match q dtype float32"),
    ((jnp.bfloat16, jnp.float32, jnp.float32), "k dtype float32 does not match q dtype bfloat16"),
    ((jnp.float32, jnp.float32, jnp.float16), "v dtype float16 does not match q dtype float32"),
])
@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_dtype_mismatch_names_the_argument_and_both_dtypes(dtypes, match, implementation):
  q, k, v = (jnp.zeros((1, 4, 2, 8), d) for d in dtypes)
  with pytest.raises(ValueError, match=match):
    attention.dot_product_attention(q, k, v, implementation=implementation)
  with pytest.raises(ValueError, match=match):  # the shared check, which the other attention kinds use
    performer_attention(q, k, v, key=jax.random.key(0), num_features=4)


def test_bad_mask_arguments():
  q = jnp.zeros((2, 4, 2, 8))
  with pytest.raises(ValueError, match="q_segment_ids"):
    attention.dot_product_attention(q, q, q, q_segment_ids=jnp.zeros((2, 3), jnp.int32),
                                    kv_segment_ids=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="window"):
    attention.dot_product_attention(q, q, q, window=(1,))
  with pytest.raises(ValueError, match="window left"):
    attention.dot_product_attention(q, q, q, window=(True, 0))
  with pytest.raises(ValueError, match="bias"):
    attention.dot_product_attention(q, q, q, bias=jnp.zeros((3, 1, 4, 4)))


def test_window_takes_numpy_integers_as_local_attention_does():
  x = jax.random.normal(jax.random.key(0), (1, 9, 2, 8))
  numpy_window = (np.int64(2), np.int32(0))
  want = attention.dot_product_attention(x, x, x, window=(2, 0))
  np.testing.assert_array_equal(attention.dot_product_attention(x, x, x, window=numpy_window), want)
  np.testing.assert_allclose(attention.local_attention(x, x, x, window=numpy_window), want,
                             rtol=1e-5, atol=1e-6)


def test_more_queries_than_keys_causal_rows_before_the_keys_are_zero():
  """Tq > Tk with end alignment: the first Tq - Tk queries see no key and must give zeros."""
  kq, kk, kv = jax.random.split(jax.random.key(3), 3)
  q, k, v = rand(kq, (1, 6, 2, 4)), rand(kk, (1, 3, 2, 4)), rand(kv, (1, 3, 2, 4))
  out = attention.dot_product_attention(q, k, v, causal=True)
  np.testing.assert_array_equal(out[0, :3], 0.0)
  np.testing.assert_allclose(out, naive_attention(q, k, v, allowed_grid(1, 6, 3, causal=True)),
                             atol=2e-5)


def test_public_entry_point_dispatches_blockwise():
  """implementation="blockwise" through the contract equals "xla" (value and gradient), and the
  automatic choice switches to blockwise for long sequences."""
  kq, kk, kv = jax.random.split(jax.random.key(4), 3)
  q, k, v = rand(kq, (2, 11, 4, 8)), rand(kk, (2, 11, 2, 8)), rand(kv, (2, 11, 2, 8))
  seg = jnp.array([[0] * 5 + [1] * 6, [0] * 11])

  def loss(impl, q, k, v):
    out = attention.dot_product_attention(q, k, v, causal=True, q_segment_ids=seg,
                                          kv_segment_ids=seg, implementation=impl)
    return (out ** 2).sum()

  for a, b in zip(jax.grad(loss, (1, 2, 3))("blockwise", q, k, v),
                  jax.grad(loss, (1, 2, 3))("xla", q, k, v)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert attention.choose_implementation(128, 128) == "xla"
  assert attention.choose_implementation(4096, 4096) == "blockwise"


def test_logit_soft_cap_xla_and_blockwise():
  """c * tanh(logits / c): the reference equals the naive loop; blockwise equals the reference in value
  and in every gradient (q, k, v, bias), including through the cap's derivative."""
  kq, kk, kv, kb = jax.random.split(jax.random.key(5), 4)
  q, k, v = 3 * rand(kq, (2, 13, 4, 8)), 3 * rand(kk, (2, 13, 2, 8)), rand(kv, (2, 13, 2, 8))
  bias = rand(kb, (1, 4, 13, 13))
  cap = 2.0
  out = attention.dot_product_attention(q, k, v, causal=True, bias=bias, logit_soft_cap=cap,
                                        implementation="xla")
  ref = naive_attention(q, k, v, allowed_grid(2, 13, 13, causal=True), np.broadcast_to(bias, (2, 4, 13, 13)),
                        soft_cap=cap)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  uncapped = attention.dot_product_attention(q, k, v, causal=True, bias=bias, implementation="xla")
  assert np.abs(np.asarray(out - uncapped)).max() > 1e-2  # the cap is active at this scale

  def loss(impl, q, k, v, bias):
    o = attention.dot_product_attention(q, k, v, causal=True, bias=bias, logit_soft_cap=cap,
                                        implementation=impl)
    return (o * jnp.cos(o)).sum()

  np.testing.assert_allclose(loss("blockwise", q, k, v, bias), loss("xla", q, k, v, bias), rtol=1e-5)
  for a, r in zip(jax.grad(loss, (1, 2, 3, 4))("blockwise", q, k, v, bias),
                  jax.grad(loss, (1, 2, 3, 4))("xla", q, k, v, bias)):
    np.testing.assert_allclose(a, r, atol=2e-5, rtol=1e-4)
  with pytest.raises(ValueError, match="logit_soft_cap"):
    attention.dot_product_attention(q, k, v, logit_soft_cap=0.0)


def _primitives(jaxpr):
  """Names of every primitive in a jaxpr, recursing into sub-jaxprs (loops, custom_vjp, pjit)."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          names |= _primitives(sub)
  return names


def test_gqa_never_repeats_kv_in_memory():
  """Forward and backward of GQA under "xla": no intermediate as large as a [B, Tk, N, H] (repeated)
  copy of K or V. The sizes are chosen so that this is larger than every legitimate tensor (q, the
  output, k, v, the [B, N, Tq, Tk] logits); the same check on K/V repeated by hand does see it."""
  from attention_test_utils import max_intermediate_size
  b, tq, tk, n, kh, h = 2, 3, 7, 8, 2, 16
  repeated = b * tk * n * h
  assert repeated > max(b * tq * n * h, b * n * tq * tk, b * tk * kh * h)
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  q, k = spec(b, tq, n, h), spec(b, tk, kh, h)

  def biggest(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)
    return max_intermediate_size(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, k).jaxpr)

  xla = lambda q, k, v: attention.dot_product_attention(q, k, v, causal=True, implementation="xla")
  rep = lambda x: jnp.repeat(x, n // kh, axis=2)
  assert biggest(lambda q, k, v: xla(q, rep(k), rep(v))) >= repeated  # the check can see a repeat
  assert biggest(xla) < repeated


def test_automatic_choice_runs_blockwise_for_long_sequences(monkeypatch):
  """implementation=None on CPU with Tq * Tk >= BLOCKWISE_MIN_LOGITS goes through blockwise_attention
  (its loop is in the jaxpr and no [Tq, Tk] tensor is formed); just below the threshold it is the
  reference, which materialises the logits. Traced only, nothing runs at these sizes."""
  from attention_test_utils import max_intermediate_size
  from jaxlab.attention import blockwise, flash, softmax
  calls = []
  real = blockwise.blockwise_attention
  monkeypatch.setattr(blockwise, "blockwise_attention",
                      lambda *a, **kw: calls.append(1) or real(*a, **kw))
  spec = lambda t: jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32)
  tk = 4096
  tq = softmax.BLOCKWISE_MIN_LOGITS // tk
  assert not flash.supports(spec(tq), spec(tk), spec(tk))[0]  # head_dim 8: never the Pallas kernel
  fn = lambda q, k, v: attention.dot_product_attention(q, k, v, causal=True)
  long = jax.make_jaxpr(fn)(spec(tq), spec(tk), spec(tk)).jaxpr
  assert calls == [1]
  assert "while" in _primitives(long), _primitives(long)
  assert max_intermediate_size(long) < tq * tk // 16
  short = jax.make_jaxpr(fn)(spec(tq - 1), spec(tk), spec(tk)).jaxpr
  assert calls == [1]  # not called again
  assert "while" not in _primitives(short)
  assert max_intermediate_size(short) >= (tq - 1) * tk


def test_integer_inputs_are_refused_by_every_attention_kind():
  """Outputs take q's dtype: integer q, k, v were computed in float and truncated back to ints."""
  from jaxlab.attention import linear_attention, local_attention
  q = k = v = jnp.ones((1, 4, 2, 8), jnp.int32)
  match = "q, k and v must have a floating dtype, got int32"
  for call in (lambda: attention.dot_product_attention(q, k, v),
               lambda: linear_attention(q, k, v, causal=True),
               lambda: performer_attention(q, k, v, key=jax.random.key(0), num_features=4),
               lambda: local_attention(q, k, v, window=(1, 0))):
    with pytest.raises(ValueError, match=match):
      call()
