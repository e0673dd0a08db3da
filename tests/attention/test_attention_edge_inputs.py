"""Edge inputs of `dot_product_attention` that every implementation must treat alike: negative segment
ids with lengths, an additive -inf bias, a traced scale, empty sequences, NumPy mask arrays, and the
arguments it refuses (bias shapes, an infinite soft cap)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.attention import dot_product_attention

IMPLEMENTATIONS = ("xla", "blockwise", "pallas")  # pallas: the portable kernel in interpret mode


def _qkv(b=2, tq=8, tk=8, n=2, kh=1, h=16, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((b, tq, n, h), (b, tk, kh, h), (b, tk, kh, h)))


def _naive(q, k, v, visible_BTS, bias_BNTS=None):
  """float64 NumPy: softmax over the visible keys; a logit below -1e38 (a bias of -inf or float32's
  min: an additive mask) counts as hidden; a row that sees no key is 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if bias_BNTS is not None:
    logits = logits + np.asarray(bias_BNTS, np.float64)
  visible = np.broadcast_to(np.asarray(visible_BTS)[:, None], logits.shape) & (logits > -1e38)
  logits = np.where(visible, logits, -np.inf)
  row_max = np.max(logits, axis=-1, keepdims=True)
  p = np.where(visible, np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
  total = p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p / np.where(total > 0, total, 1.0), v)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("ids", [-1, -2])
def test_negative_segment_ids_with_lengths(implementation, ids):
  """The kernels fold lengths into fill ids -1 (queries) and -2 (keys): user ids equal to them must
  not make padded queries or keys visible."""
  q, k, v = _qkv()
  seg = jnp.asarray([[0, 0, 0, 0, 0, ids, ids, ids], [ids] * 8], jnp.int32)
  q_lengths, kv_lengths = jnp.asarray([5, 8]), jnp.asarray([8, 4])
  out = dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_lengths=q_lengths,
                              kv_lengths=kv_lengths, implementation=implementation)
  pos = np.arange(8)
  visible = ((np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :])
             & (pos[None, :, None] < np.asarray(q_lengths)[:, None, None])
             & (pos[None, None, :] < np.asarray(kv_lengths)[:, None, None]))
  np.testing.assert_allclose(out, _naive(q, k, v, visible), atol=2e-5)
  assert np.all(np.asarray(out)[0, 5:] == 0)  # queries past q_length see nothing


@pytest.mark.parametrize("implementation", ("xla", "blockwise"))
@pytest.mark.parametrize("fill", [-np.inf, float(np.finfo(np.float32).min)])
def test_an_additive_minus_inf_bias_never_reveals_masked_keys(implementation, fill):
  """A bias that hides every key a causal row may see: the row is 0 (not the mean of future keys), and
  a batch row whose keys are all biased away gives 0 and finite gradients (not NaN)."""
  q, k, v = _qkv(b=2, tq=4, tk=4, n=1)
  bias = jnp.zeros((2, 1, 4, 4)).at[:, :, :, 0].set(fill).at[1].set(fill)
  causal = np.tril(np.ones((4, 4), bool))[None].repeat(2, 0)

  def f(q, k, v, bias):
    return dot_product_attention(q, k, v, causal=True, bias=bias, implementation=implementation)

  out = f(q, k, v, bias)
  np.testing.assert_allclose(out, _naive(q, k, v, causal, bias), atol=2e-5)
  assert np.all(np.asarray(out)[0, 0] == 0) and np.all(np.asarray(out)[1] == 0)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3))(q, k, v, bias)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  row0_dv = jax.grad(lambda v: jnp.sum(f(q, k, v, bias)[0, 0]))(v)
  assert np.all(np.asarray(row0_dv) == 0)  # row 0 leans on no value (not on future keys)
  no_mask = dot_product_attention(q, k, v, bias=bias, implementation=implementation)
  assert np.all(np.isfinite(np.asarray(no_mask))) and np.all(np.asarray(no_mask)[1] == 0)


@pytest.mark.parametrize("implementation", ("xla", "blockwise"))
def test_a_float16_additive_mask_masks_like_minus_inf(implementation):
  """float16 cannot hold -inf-like masks but its finfo.min (-65504), the usual fp16 additive mask:
  the same outputs and gradients as a -inf bias, a fully hidden row 0 (not attention over it)."""
  q, k, v = _qkv(b=2, tq=4, tk=4, n=1)
  hide = np.zeros((2, 1, 4, 4), bool)
  hide[:, :, :, 0] = True
  hide[1] = True
  as_inf = jnp.where(hide, -jnp.inf, 0.0)
  as_fp16 = jnp.where(hide, float(np.finfo(np.float16).min), 0.0).astype(jnp.float16)
  f = lambda q, k, v, bias: jnp.sum(dot_product_attention(q, k, v, bias=bias,
                                                          implementation=implementation) ** 2)
  out = dot_product_attention(q, k, v, bias=as_fp16, implementation=implementation)
  np.testing.assert_allclose(out, dot_product_attention(q, k, v, bias=as_inf,
                                                        implementation=implementation), atol=1e-6)
  assert np.all(np.asarray(out)[1] == 0)
  for got, want in zip(jax.grad(f, argnums=(0, 1, 2))(q, k, v, as_fp16),
                       jax.grad(f, argnums=(0, 1, 2))(q, k, v, as_inf)):
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("implementation", ("xla", "blockwise"))
def test_a_minus_inf_bias_masks_under_a_soft_cap_too(implementation):
  """The cap c * tanh(x / c) would turn -inf into -c (keys it should hide keep weight): a causal mask
  written as a -inf bias equals causal=True, with the cap as without."""
  q, k, v = _qkv(b=2, tq=5, tk=5, n=2)
  causal_bias = jnp.where(np.tril(np.ones((5, 5), bool)), 0.0, -jnp.inf)
  kw = dict(logit_soft_cap=5.0, implementation=implementation)
  np.testing.assert_allclose(dot_product_attention(q, k, v, bias=causal_bias, **kw),
                             dot_product_attention(q, k, v, causal=True, **kw), atol=1e-6)
  hidden_row = jnp.zeros((5, 5)).at[2].set(-jnp.inf)  # query 2 sees nothing
  out = dot_product_attention(q, k, v, bias=hidden_row, **kw)
  assert np.all(np.asarray(out)[:, 2] == 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_traced_scale_works_in_every_implementation(implementation):
  """A learned temperature: a traced scale gives the same values and scale-gradient as "xla"."""
  q, k, v = _qkv()

  def f(scale, implementation):
    return jnp.sum(dot_product_attention(q, k, v, causal=True, scale=scale,
                                         implementation=implementation) ** 2)

  value, grad = jax.jit(jax.value_and_grad(f), static_argnums=1)(0.3, implementation)
  ref_value, ref_grad = jax.value_and_grad(f)(0.3, "xla")
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4)
  assert abs(float(grad)) > 1e-3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("tq,tk", [(0, 5), (5, 0), (0, 0)])
def test_empty_sequences_give_empty_or_zero_outputs(implementation, tq, tk):
  q, k, v = _qkv(tq=tq, tk=tk)
  out = dot_product_attention(q, k, v, implementation=implementation)
  assert out.shape == (2, tq, 2, 16) and np.all(np.asarray(out) == 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_numpy_mask_arrays_under_jit(implementation):
  q, k, v = _qkv()
  seg = np.array([[0] * 4 + [1] * 4, [0] * 8], np.int32)
  lengths = np.array([8, 6], np.int32)
  got = jax.jit(lambda q, k, v: dot_product_attention(
      q, k, v, q_segment_ids=seg, kv_segment_ids=seg, kv_lengths=lengths,
      implementation=implementation))(q, k, v)
  visible = (seg[:, :, None] == seg[:, None, :]) & (np.arange(8)[None, None] < lengths[:, None, None])
  np.testing.assert_allclose(got, _naive(q, k, v, visible), atol=2e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(1, 2, 2, 1, 8), (2, 2, 3, 8)])
def test_bias_shapes_that_only_broadcast_the_other_way_are_refused(implementation, shape):
  """A 5-D bias, or a [B, N, 3, Tk] bias for one query, broadcasts with [B, N, Tq, Tk] but not to it."""
  q, k, v = _qkv(tq=1)
  with pytest.raises(ValueError, match=r"bias of shape .* does not broadcast to \[B, N, Tq, Tk\]"):
    dot_product_attention(q, k, v, bias=jnp.zeros(shape), implementation=implementation)


@pytest.mark.parametrize("cap", [float("inf"), float("nan"), 0.0, -1.0])
def test_a_soft_cap_must_be_finite_and_positive(cap):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="logit_soft_cap must be a finite number > 0"):
    dot_product_attention(q, k, v, logit_soft_cap=cap)
  # The exported implementations check it too (0 gave uniform weights, -1 flipped the logits).
  from jaxlab.attention import masks
  from jaxlab.attention.blockwise import blockwise_attention
  from jaxlab.attention.softmax import xla_attention
  for fn in (blockwise_attention, xla_attention):
    with pytest.raises(ValueError, match="soft_cap must be a finite number > 0"):
      fn(q, k, v, masks.make_mask(q.shape[1], k.shape[1], q.shape[0]), scale=0.5, soft_cap=cap)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_segment_ids_at_the_int32_extremes_stay_distinct(implementation):
  """Ids -2**31 + 1 and 2**31 - 1 are different segments: the Pallas kernels renumber ids by rank
  (they shifted negative ids down by 2, which wrapped the first onto the second)."""
  q, k, v = _qkv()
  lo, hi = -2**31 + 1, 2**31 - 1
  seg = jnp.asarray([[lo] * 4 + [hi] * 4, [hi, lo] * 4], jnp.int32)
  visible = np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :]
  got = dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                              implementation=implementation)
  np.testing.assert_allclose(got, _naive(q, k, v, visible), atol=2e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_window_side_past_every_distance_means_unbounded(implementation):
  """window=(0, 2**31 - 1), a natural 'unbounded', overflowed i + right in int32 (blockwise's gradients
  came out inf); any side >= Tq + Tk is the same mask as None, in value and gradient."""
  q, k, v = _qkv(tq=6, tk=9)
  for huge, same in (((0, 2**31 - 1), (0, None)), ((2**31 - 1, 0), (None, 0))):
    def loss(window):
      return lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(
          q, k, v, window=window, implementation=implementation)))
    got = jax.value_and_grad(loss(huge), argnums=(0, 1, 2))(q, k, v)
    want = jax.value_and_grad(loss(same), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_numpy_integer_lengths_and_a_traced_soft_cap_at_long_lengths(monkeypatch):
  """make_mask takes NumPy ints for Tq, Tk (blockwise read them as arrays and crashed); a traced
  soft cap goes to xla even where the automatic choice would tile (the tiled ones compile the cap in)."""
  from jaxlab.attention import softmax
  from jaxlab.attention.blockwise import blockwise_attention
  from jaxlab.attention.masks import make_mask
  q, k, v = _qkv(tq=5, tk=5)
  mask = make_mask(np.int64(5), np.int64(5), 2, causal=True)
  assert type(mask.q_len) is int
  np.testing.assert_allclose(blockwise_attention(q, k, v, mask, scale=0.25),
                             softmax.xla_attention(q, k, v, mask, scale=0.25), atol=2e-6)
  monkeypatch.setattr(softmax, "choose_implementation", lambda tq, tk: "blockwise")
  capped = jax.jit(lambda q, c: dot_product_attention(q, k, v, causal=True, logit_soft_cap=c))
  np.testing.assert_allclose(capped(q, 1.5), dot_product_attention(q, k, v, causal=True,
                                                                   logit_soft_cap=1.5,
                                                                   implementation="xla"), atol=2e-6)
  with pytest.raises(ValueError, match="static logit_soft_cap"):
    jax.jit(lambda q, c: dot_product_attention(q, k, v, logit_soft_cap=c,
                                               implementation="blockwise"))(q, 1.5)


@pytest.mark.parametrize("name", ["linear", "performer", "local"])
def test_the_causal_linear_time_families_take_empty_sequences(name):
  """T = 0 gave ZeroDivisionError (a chunk or block of size min(size, T) = 0); now [B, 0, N, H], as
  dot_product_attention and the non-causal forms give."""
  from jaxlab import attention
  q, k, v = _qkv(tq=0, tk=0)
  call = {"linear": lambda: attention.linear_attention(q, k, v, causal=True),
          "performer": lambda: attention.performer_attention(q, k, v, causal=True,
                                                             key=jax.random.key(0)),
          "local": lambda: attention.local_attention(q, k, v, window=(2, 0))}[name]
  out = call()
  assert out.shape == q.shape and out.dtype == q.dtype


def test_a_mask_made_for_other_shapes_is_named_by_every_kernel():
  """The exported kernels take an AttentionMask built elsewhere; one for another batch failed deep in
  a broadcast ("Incompatible shapes for broadcasting: (3, 1, 5, 7), (2, 4, 5, 7)")."""
  from jaxlab.attention import masks
  from jaxlab.attention.blockwise import blockwise_attention
  from jaxlab.attention.flash import flash_attention
  from jaxlab.attention.softmax import xla_attention
  q, k, v = _qkv(tq=5, tk=7)
  other_batch = masks.make_mask(5, 7, 3, kv_lengths=jnp.array([1, 2, 3]))
  other_lengths = masks.make_mask(5, 8, 2)
  for fn in (xla_attention, blockwise_attention, flash_attention):
    with pytest.raises(ValueError, match=r"mask.kv_lengths is for batch 3 but q has batch 2"):
      fn(q, k, v, other_batch, scale=0.5)
    with pytest.raises(ValueError, match=r"mask is for \(Tq, Tk\) = \(5, 8\) but q and k give \(5, 7\)"):
      fn(q, k, v, other_lengths, scale=0.5)
    with pytest.raises(TypeError, match="mask must be an AttentionMask"):
      fn(q, k, v, None, scale=0.5)
    # An AttentionMask built by hand with one side's segment ids (make_mask fills in the other)
    # failed inside an index helper.
    one_sided = dataclasses.replace(masks.make_mask(5, 7, 2), q_segment_ids=jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="only one of q_segment_ids and kv_segment_ids"):
      fn(q, k, v, one_sided, scale=0.5)


def test_causal_must_be_a_bool_everywhere():
  """causal="no" ran causal attention (bool("no") is True)."""
  from jaxlab.attention import masks
  from jaxlab.attention.gau import gau_attention, mixed_chunk_attention
  from jaxlab.attention.linear import linear_attention
  from jaxlab.positions.alibi import alibi_bias, alibi_bias_from_positions
  from jaxlab.attention.local import block_sparse_attention, local_attention
  from jaxlab.attention.performer import performer_attention
  q, k, v = _qkv()
  calls = [lambda c: dot_product_attention(q, k, v, causal=c),
           lambda c: masks.make_mask(8, 8, 2, causal=c),
           lambda c: linear_attention(q, k, v, causal=c),
           lambda c: local_attention(q, k, v, window=(2, 0), causal=c),
           lambda c: block_sparse_attention(q, k, v, layout=np.ones((2, 2), bool), block_size=4,
                                            causal=c),
           lambda c: performer_attention(q, k, v, key=jax.random.key(0), num_features=8, causal=c),
           lambda c: gau_attention(q, k, v, causal=c),
           lambda c: mixed_chunk_attention(q, k, q, k, v, chunk_size=4, causal=c),
           lambda c: alibi_bias(2, 8, 8, causal=c),
           lambda c: alibi_bias_from_positions(2, jnp.zeros((1, 8)), jnp.zeros((1, 8)), causal=c)]
  for call in calls:
    with pytest.raises(TypeError, match="causal must be a bool, got 'no'"):
      call("no")
    call(np.bool_(True))  # NumPy's bool is a bool
