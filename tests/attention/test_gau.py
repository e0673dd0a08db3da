"""GAU and FLASH mixed chunk attention (Hua et al. 2022) against plain O(T^2) references."""

import math

import chex
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from attention_test_utils import max_intermediate_size

from jaxlab.attention.gau import (flash_init_state, flash_prefill_state, flash_step, gau_attention,
                                  mixed_chunk_attention, scale_offset)

# One compile per configuration instead of op-by-op dispatch.
gau = jax.jit(gau_attention, static_argnames=("causal", "kind", "scale", "logn_train_len"))
mixed = jax.jit(mixed_chunk_attention, static_argnames=("chunk_size", "causal", "kind",
                                                        "quad_scale", "linear_scale"))


def rand(seed, *shapes):
  """Float32 standard normal arrays (NumPy's generator: no per-shape compile)."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for shape in shapes]


def qkv(seed, b=2, tq=13, tk=None, n=4, kh=2, s=8, e=12):
  tk = tq if tk is None else tk
  return rand(seed, (b, tq, n, s), (b, tk, kh, s), (b, tk, kh, e))


def np_weights(logits, kind):
  if kind == "relu2":
    return np.maximum(logits, 0.0) ** 2
  w = np.exp(logits - logits.max())
  return w / w.sum()


# ---------------------------------------------------------------------------------------------------
# Plain references. NumPy float64 loops (values) and dense jnp (differentiable, K/V repeated for GQA).

def naive_gau_np(q, k, v, *, causal, kind, scale, bias=None, kv_mask=None, logn=0):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, tq, n, _ = q.shape
  tk, kh, e = k.shape[1], k.shape[2], v.shape[3]
  out = np.zeros((b, tq, n, e))
  for bi in range(b):
    for ni in range(n):
      ki = ni // (n // kh)
      for i in range(tq):
        seen = [j for j in range(tk) if (not causal or j <= i + tk - tq)
                and (kv_mask is None or kv_mask[bi, j])]
        if not seen:
          continue
        mult = max(1.0, math.log(len(seen)) / math.log(logn)) if logn else 1.0
        logits = np.array([mult * scale * q[bi, i, ni] @ k[bi, j, ki] +
                           (0.0 if bias is None else bias[bi, ni, i, j]) for j in seen])
        out[bi, i, ni] = np_weights(logits, kind) @ v[bi, seen, ki]
  return out


def naive_gau_jnp(q, k, v, *, causal, kind, scale, bias=None, logn=0):
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  tq, tk = q.shape[1], k.shape[1]
  valid = jnp.ones((tq, tk), bool)
  if causal:
    valid = jnp.arange(tk)[None] <= jnp.arange(tq)[:, None] + tk - tq
  logits = jnp.einsum("btns,bjns->bntj", q, k) * scale
  if logn:
    logits = logits * jnp.maximum(1.0, jnp.log(valid.sum(-1)) / math.log(logn))[:, None]
  if bias is not None:
    logits = logits + bias
  if kind == "relu2":
    w = jnp.where(valid, jax.nn.relu(logits) ** 2, 0.0)
  else:
    w = jax.nn.softmax(jnp.where(valid, logits, -1e30), axis=-1) * valid.any(-1)[:, None]
  return jnp.einsum("bntj,bjne->btne", w, v)


def naive_mixed_np(qq, qk, lq, lk, v, *, c, causal, kind, qs, ls, bias=None):
  """Per query i in chunk g = i // c: quadratic over keys of chunk g (j <= i if causal) plus
  ls * lq_i . sum_j lk_j v_j^T over all keys (non-causal) or the keys of chunks before g (causal)."""
  qq, qk, lq, lk, v = (np.asarray(x, np.float64) for x in (qq, qk, lq, lk, v))
  b, t, n, _ = qq.shape
  kh, e = qk.shape[2], v.shape[3]
  out = np.zeros((b, t, n, e))
  for bi in range(b):
    for ni in range(n):
      ki = ni // (n // kh)
      for i in range(t):
        local = [j for j in range(t) if j // c == i // c and (not causal or j <= i)]
        logits = np.array([qs * qq[bi, i, ni] @ qk[bi, j, ki] +
                           (0.0 if bias is None else bias[bi, ni, i % c, j % c]) for j in local])
        quad = np_weights(logits, kind) @ v[bi, local, ki]
        far = [j for j in range(t) if not causal or j // c < i // c]
        lin = sum((ls * lq[bi, i, ni] @ lk[bi, j, ki]) * v[bi, j, ki] for j in far) if far else 0.0
        out[bi, i, ni] = quad + lin
  return out


def _mixed_masks(t: int, c: int, causal: bool):
  """Query/key index grids and the dense masks of mixed chunk attention: `same` (the quadratic part,
  inside a chunk) and `far` (the linear part: earlier chunks when causal, every key otherwise)."""
  i, j = jnp.arange(t)[:, None], jnp.arange(t)[None]
  same = (i // c) == (j // c)
  if causal:
    same = same & (j <= i)
  far = (j // c) < (i // c) if causal else jnp.ones((t, t), bool)
  return i, j, same, far


def naive_mixed_jnp(qq, qk, lq, lk, v, *, c, causal, qs, ls):
  """Dense [T, T] form (relu2): block-diagonal quadratic weights + masked linear weights."""
  g = qq.shape[2] // qk.shape[2]
  qk, lk, v = (jnp.repeat(x, g, axis=2) for x in (qk, lk, v))
  t = qq.shape[1]
  i, j, same, far = _mixed_masks(t, c, causal)
  quad = jnp.where(same, jax.nn.relu(jnp.einsum("btns,bjns->bntj", qq, qk) * qs) ** 2, 0.0)
  lin = jnp.where(far, ls * jnp.einsum("btns,bjns->bntj", lq, lk), 0.0)
  return jnp.einsum("bntj,bjne->btne", quad + lin, v)


def naive_mixed_softmax_jnp(qq, qk, lq, lk, v, bias, *, c, causal, qs, ls):
  """Dense [T, T] form with a softmax quadratic part: in-chunk logits qs * qq.qk + bias[i % c, j % c],
  softmax over the chunk's visible keys, plus the masked linear weights (differentiable in the bias)."""
  g = qq.shape[2] // qk.shape[2]
  qk, lk, v = (jnp.repeat(x, g, axis=2) for x in (qk, lk, v))
  t = qq.shape[1]
  i, j, same, far = _mixed_masks(t, c, causal)
  bias_tt = jnp.broadcast_to(bias, bias.shape[:2] + (c, c))[:, :, i % c, j % c]  # [., N, T, T]
  logits = jnp.einsum("btns,bjns->bntj", qq, qk) * qs + bias_tt
  quad = jax.nn.softmax(jnp.where(same, logits, -1e30), axis=-1)
  lin = jnp.where(far, ls * jnp.einsum("btns,bjns->bntj", lq, lk), 0.0)
  return jnp.einsum("bntj,bjne->btne", quad + lin, v)


def grads(fn, args, seed=9):
  """Gradients of sum(w * fn(*args)) with respect to every argument, for a fixed random w."""
  w = rand(seed, jax.eval_shape(fn, *args).shape)[0]
  return jax.jit(jax.grad(lambda *a: jnp.sum(w * fn(*a)), argnums=tuple(range(len(args)))))(*args)


# ---------------------------------------------------------------------------------------------------
# GAU

@pytest.mark.parametrize("causal,kind,logn,with_bias", [
    (False, "relu2", 0, False), (True, "relu2", 0, True), (True, "softmax", 4, False),
    (False, "softmax", 8, True)])
def test_gau_matches_naive(causal, kind, logn, with_bias):
  q, k, v = qkv(0)
  bias = rand(1, (2, 4, 13, 13))[0] if with_bias else None
  out = gau(q, k, v, causal=causal, kind=kind, bias=bias, logn_train_len=logn)
  chex.assert_shape(out, (2, 13, 4, 12))
  chex.assert_type(out, q.dtype)
  scale = 1 / 13 if kind == "relu2" else 1 / math.sqrt(8)
  want = naive_gau_np(q, k, v, causal=causal, kind=kind, scale=scale, logn=logn,
                      bias=None if bias is None else np.asarray(bias))
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["relu2", "softmax"])
def test_gau_cross_lengths_and_padding(kind):
  """Tq != Tk with end-aligned causality, padded keys, and a query that sees no key at all."""
  q, k, v = qkv(2, tq=5, tk=11)
  kv_mask = np.ones((2, 11), bool)
  kv_mask[0, :8] = False  # batch 0, query 0 sees keys <= 6: none left
  kv_mask[1, 3] = False
  out = gau(q, k, v, causal=True, kind=kind, kv_mask=jnp.asarray(kv_mask), scale=0.3)
  want = naive_gau_np(q, k, v, causal=True, kind=kind, scale=0.3, kv_mask=kv_mask)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(out)[0, 0] == 0.0)
  g = grads(lambda q, k, v: gau_attention(q, k, v, causal=True, kind=kind, scale=0.3,
                                          kv_mask=jnp.asarray(kv_mask)), (q, k, v))
  assert all(np.all(np.isfinite(x)) for x in g)
  assert np.all(np.asarray(g[0])[0, 0] == 0.0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["relu2", "softmax"])
def test_padding_masked_by_kv_mask_changes_no_real_token(causal, kind):
  """Default scales: a batch padded to 11 keys with the padding masked gives each row's real tokens
  their unpadded outputs (relu2's 1/n counts the row's visible keys, not the padded length)."""
  q, k, v = qkv(4, b=2, tq=11)
  real = [7, 11]
  kv_mask = np.arange(11)[None, :] < np.asarray(real)[:, None]
  padded = gau(q, k, v, causal=causal, kind=kind, kv_mask=jnp.asarray(kv_mask))
  for row, n in enumerate(real):
    alone = gau(q[row:row + 1, :n], k[row:row + 1, :n], v[row:row + 1, :n], causal=causal, kind=kind)
    np.testing.assert_allclose(padded[row:row + 1, :n], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal,kind,logn", [(True, "relu2", 0), (False, "relu2", 0),
                                              (True, "softmax", 4)])
def test_gau_gradients_match_naive(causal, kind, logn):
  q, k, v = qkv(3, tq=11)
  bias = rand(4, (1, 4, 11, 11))[0]
  scale = 1 / 11 if kind == "relu2" else 1 / math.sqrt(8)
  got = grads(lambda q, k, v, b: gau_attention(q, k, v, causal=causal, kind=kind, bias=b,
                                               logn_train_len=logn), (q, k, v, bias))
  want = grads(lambda q, k, v, b: naive_gau_jnp(q, k, v, causal=causal, kind=kind, scale=scale,
                                                bias=b, logn=logn), (q, k, v, bias))
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,logn", [("relu2", 0), ("softmax", 3)])
def test_gau_kv_cache_decoding_equals_forward(kind, logn):
  """Decoding with a fixed-size KV cache (unfilled slots masked) reproduces the causal forward pass;
  relu2 needs the training scale 1/T passed explicitly (the cache length is not the training length)."""
  q, k, v = qkv(5, b=1, tq=9, n=2, kh=1)
  scale = 1 / 9 if kind == "relu2" else None
  full = gau(q, k, v, causal=True, kind=kind, scale=scale, logn_train_len=logn)
  cap = 12
  k_cache, v_cache = jnp.zeros((1, cap, 1, 8)), jnp.zeros((1, cap, 1, 12))
  step = jax.jit(lambda q, k, v, mask: gau_attention(q, k, v, kind=kind, scale=scale, kv_mask=mask,
                                                     logn_train_len=logn))
  for p in range(9):
    k_cache, v_cache = k_cache.at[:, p].set(k[:, p]), v_cache.at[:, p].set(v[:, p])
    out = step(q[:, p:p + 1], k_cache, v_cache, (jnp.arange(cap) <= p)[None])
    np.testing.assert_allclose(out[:, 0], full[:, p], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# FLASH mixed chunk attention

def flash_inputs(seed, b=2, t=13, n=4, kh=2, s=8, e=12):
  return rand(seed, (b, t, n, s), (b, t, kh, s), (b, t, n, s), (b, t, kh, s), (b, t, kh, e))


@pytest.mark.parametrize("causal,c,kind,with_bias", [
    (True, 4, "relu2", False), (False, 5, "relu2", True), (True, 4, "softmax", True),
    (True, 16, "relu2", False), (False, 1, "relu2", False)])
def test_mixed_chunk_matches_naive(causal, c, kind, with_bias):
  args = flash_inputs(10)
  bias = rand(11, (1, 4, c, c))[0] if with_bias else None
  out = mixed(*args, chunk_size=c, causal=causal, kind=kind, bias=bias)
  chex.assert_shape(out, (2, 13, 4, 12))
  chex.assert_type(out, jnp.float32)
  qs = 1 / c if kind == "relu2" else 1 / math.sqrt(8)
  want = naive_mixed_np(*args, c=c, causal=causal, kind=kind, qs=qs, ls=1 / c,
                        bias=None if bias is None else np.broadcast_to(bias, (2, 4, c, c)))
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_mixed_chunk_gradients_match_naive(causal):
  args = flash_inputs(12, t=11)
  got = grads(lambda *a: mixed_chunk_attention(*a, chunk_size=4, causal=causal, quad_scale=0.5,
                                               linear_scale=0.2), args)
  want = grads(lambda *a: naive_mixed_jnp(*a, c=4, causal=causal, qs=0.5, ls=0.2), args)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_mixed_chunk_softmax_with_bias_gradients_match_naive(causal):
  """kind="softmax" with an in-chunk bias: gradients for all five inputs and the bias against the dense
  reference (T=11 with chunks of 4: a ragged last chunk)."""
  args = flash_inputs(22, t=11)
  bias = rand(23, (1, 4, 4, 4))[0]
  fn = lambda *a: mixed_chunk_attention(*a[:5], chunk_size=4, causal=causal, kind="softmax",
                                        quad_scale=0.5, linear_scale=0.2, bias=a[5])
  ref = lambda *a: naive_mixed_softmax_jnp(*a[:5], a[5], c=4, causal=causal, qs=0.5, ls=0.2)
  want_out = naive_mixed_np(*args, c=4, causal=causal, kind="softmax", qs=0.5, ls=0.2,
                            bias=np.broadcast_to(bias, (2, 4, 4, 4)))
  for f in (fn, ref):  # the dense reference is itself checked against the NumPy loop
    np.testing.assert_allclose(jax.jit(f)(*args, bias), want_out, rtol=1e-4, atol=1e-5)
  got, want = grads(fn, (*args, bias)), grads(ref, (*args, bias))
  assert np.abs(np.asarray(got[5])).max() > 1e-2  # the bias gradient is not trivially zero
  for name, a, b in zip(("quad_q", "quad_k", "lin_q", "lin_k", "v", "bias"), got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("causal", [True, False])
def test_one_chunk_without_linear_part_is_gau(causal):
  """With one chunk covering the sequence and lin_q = 0, FLASH is relu^2 GAU with scale 1/C."""
  qq, qk, _, lk, v = flash_inputs(13, t=9)
  out = mixed(qq, qk, jnp.zeros_like(qq), lk, v, chunk_size=12, causal=causal)
  np.testing.assert_allclose(out, gau(qq, qk, v, causal=causal, scale=1 / 12), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("which", ["gau", "mixed"])
def test_causality_by_gradient(which):
  args = flash_inputs(14, t=10, n=2, kh=1)
  if which == "gau":
    fn = lambda qq, qk, lq, lk, v: gau_attention(qq + lq, qk + lk, v, causal=True)
  else:
    fn = lambda *a: mixed_chunk_attention(*a, chunk_size=3, causal=True)
  at = jax.jit(lambda t: jax.grad(lambda *a: jnp.sum(jnp.take(fn(*a), t, axis=1)),
                                  argnums=(0, 1, 2, 3, 4))(*args))
  for t in (0, 4, 9):
    for arg, g in enumerate(at(t)):
      g = np.asarray(g)
      assert np.all(g[:, t + 1:] == 0.0)
      # FLASH's linear queries/keys only act across chunks: nothing before the first chunk ends.
      if which == "gau" or arg not in (2, 3) or t >= 3:
        assert np.any(g[:, :t + 1] != 0.0)


def test_mixed_chunk_memory_is_linear():
  """No [T, T] tensor in the forward or backward pass: the largest intermediate grows like T."""
  def biggest(t):
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flash_inputs(0, b=1, t=t, n=1, kh=1)]
    loss = lambda *a: jnp.sum(mixed_chunk_attention(*a, chunk_size=16, causal=True))
    return max_intermediate_size(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(
        *args).jaxpr)
  small, large = biggest(512), biggest(1024)
  assert large <= 2 * small + 64
  assert large < 1024 * 1024 // 32


@pytest.mark.parametrize("kind,with_bias,prefill", [("relu2", False, 0), ("relu2", True, 6),
                                                    ("softmax", True, 4)])
def test_flash_decoding_equals_forward(kind, with_bias, prefill):
  """Prefill (optional) + one token at a time == causal mixed chunk attention over the sequence."""
  qq, qk, lq, lk, v = flash_inputs(15, t=11)
  c = 4
  bias = rand(16, (1, 4, c, c))[0] if with_bias else None
  full = mixed(qq, qk, lq, lk, v, chunk_size=c, causal=True, kind=kind, bias=bias)
  if prefill:
    state = flash_prefill_state(qk[:, :prefill], lk[:, :prefill], v[:, :prefill], chunk_size=c)
  else:
    state = flash_init_state(2, 2, 8, 12, c)
  step = jax.jit(lambda *a: flash_step(*a, kind=kind, bias=bias))
  for p in range(prefill, 11):
    sl = lambda x: x[:, p:p + 1]
    out, state = step(sl(qq), sl(qk), sl(lq), sl(lk), sl(v), state)
    chex.assert_shape(out, (2, 1, 4, 12))
    np.testing.assert_allclose(out[:, 0], full[:, p], rtol=1e-5, atol=1e-5)
  assert int(state.index) == 11


def test_scale_offset():
  z, gamma, beta = rand(17, (2, 5, 8), (4, 8), (4, 8))
  out = scale_offset(z, gamma, beta)
  assert out.shape == (2, 5, 4, 8)
  np.testing.assert_allclose(out[:, :, 2], z * gamma[2] + beta[2], rtol=1e-6)


def test_bfloat16_inputs():
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv(18))
  out = gau(q, k, v, causal=True)
  chex.assert_type(out, jnp.bfloat16)
  ref = gau(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)
  args = [x.astype(jnp.bfloat16) for x in flash_inputs(19)]
  assert mixed(*args, chunk_size=4, causal=True).dtype == jnp.bfloat16


def test_bad_arguments():
  q, k, v = qkv(20)
  qq, qk, lq, lk, fv = flash_inputs(21)
  with pytest.raises(ValueError, match="kind"):
    gau_attention(q, k, v, kind="relu")
  with pytest.raises(ValueError, match="q must be"):
    gau_attention(q[0], k, v)
  with pytest.raises(ValueError, match="v .* must be"):
    gau_attention(q, k, v[:, :5])
  with pytest.raises(ValueError, match="k .* must be"):
    gau_attention(q, k[..., :4], v)
  with pytest.raises(ValueError, match="multiple"):
    gau_attention(q[:, :, :3], k, v)
  with pytest.raises(ValueError, match="bias"):
    gau_attention(q, k, v, bias=jnp.zeros((4, 13, 12)))
  with pytest.raises(ValueError, match="kv_mask"):
    gau_attention(q, k, v, kv_mask=jnp.ones((2, 12), bool))
  with pytest.raises(ValueError, match="kv_mask must be boolean"):  # 0.5 read as True
    gau_attention(q, k, v, kv_mask=jnp.full((2, 13), 0.5))
  np.testing.assert_array_equal(  # nested lists are arrays too
      gau_attention(q, k, v, kv_mask=[[True] * 13] * 2), gau_attention(q, k, v))
  with pytest.raises(ValueError, match="logn_train_len"):
    gau_attention(q, k, v, logn_train_len=8)
  with pytest.raises(ValueError, match="logn_train_len"):
    gau_attention(q, k, v, kind="softmax", logn_train_len=1)
  with pytest.raises(ValueError, match="chunk_size"):
    mixed_chunk_attention(qq, qk, lq, lk, fv, chunk_size=0)
  with pytest.raises(ValueError, match="lin_q"):
    mixed_chunk_attention(qq, qk, lq[..., :4], lk, fv)
  with pytest.raises(ValueError, match="lin_k"):
    mixed_chunk_attention(qq, qk, lq, lk[:, :5], fv)
  with pytest.raises(ValueError, match="self-attention"):
    mixed_chunk_attention(qq[:, :5], qk, lq[:, :5], lk, fv)
  with pytest.raises(ValueError, match="bias"):
    mixed_chunk_attention(qq, qk, lq, lk, fv, chunk_size=4, bias=jnp.zeros((5, 5)))
  with pytest.raises(ValueError, match="gamma"):
    scale_offset(jnp.zeros((2, 5, 8)), jnp.zeros((4, 7)), jnp.zeros((4, 7)))
  with pytest.raises(ValueError, match="z must be"):
    scale_offset(jnp.zeros((5, 8)), jnp.zeros((4, 8)), jnp.zeros((4, 8)))
  state = flash_init_state(2, 2, 8, 12, 4)
  with pytest.raises(ValueError, match="one token"):
    flash_step(qq[:, :2], qk[:, :2], lq[:, :2], lk[:, :2], fv[:, :2], state)
  with pytest.raises(ValueError, match="state shapes"):
    flash_step(qq[:, :1], qk[:, :1], lq[:, :1], lk[:, :1], fv[:, :1],
               flash_init_state(2, 2, 8, 6, 4))
  with pytest.raises(ValueError, match="lin_k .* do not match"):  # an einsum error before
    flash_step(qq[:, :1], qk[:, :1], lq[:, :1], lk[:, :1], fv[:, :1],
               state._replace(lin_k=flash_init_state(2, 2, 8, 12, 3).lin_k))
