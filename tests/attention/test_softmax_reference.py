"""The XLA reference attention against a naive per-head loop, and the mask vocabulary's semantics."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxlab import attention


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


def allowed_grid(b, tq, tk, causal=False, window=None, q_seg=None, kv_seg=None, kv_len=None):
  allowed = np.ones((b, tq, tk), bool)
  for bi in range(b):
    for i in range(tq):
      ip = i + tk - tq
      for j in range(tk):
        ok = True
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
def test_xla_matches_naive(tq, tk, n, kh, causal, window):
  kq, kk, kv, kb = jax.random.split(jax.random.key(0), 4)
  b, h = 2, 8
  q, k, v = rand(kq, (b, tq, n, h)), rand(kk, (b, tk, kh, h)), rand(kv, (b, tk, kh, h))
  bias = rand(kb, (b, n, tq, tk))
  out = attention.dot_product_attention(q, k, v, causal=causal, window=window, bias=bias,
                                        implementation="xla")
  ref = naive_attention(q, k, v, allowed_grid(b, tq, tk, causal, window), bias)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


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


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=(2, 4, 3, 8), k=(2, 4, 2, 8)), "multiple of k/v heads"),
    (dict(q=(2, 4, 4, 8), k=(2, 4, 2, 4)), "head_dim"),
    (dict(q=(2, 4, 8), k=(2, 4, 2, 8)), "q must be"),
])
def test_bad_shapes_name_the_argument(kwargs, match):
  q = jnp.zeros(kwargs["q"])
  k = jnp.zeros(kwargs["k"])
  with pytest.raises(ValueError, match=match):
    attention.dot_product_attention(q, k, k)


def test_bad_mask_arguments():
  q = jnp.zeros((2, 4, 2, 8))
  with pytest.raises(ValueError, match="q_segment_ids"):
    attention.dot_product_attention(q, q, q, q_segment_ids=jnp.zeros((2, 3), jnp.int32),
                                    kv_segment_ids=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="window"):
    attention.dot_product_attention(q, q, q, window=(1,))
  with pytest.raises(ValueError, match="bias"):
    attention.dot_product_attention(q, q, q, bias=jnp.zeros((3, 1, 4, 4)))


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
