"""Sliding-window and block-sparse attention against the XLA reference.

Values and gradients (dq, dk, dv) must match `implementation="xla"` with the equivalent dense mask, at
odd lengths (T=29, 13) with block sizes that do not divide them. The mask arrays are passed into the
jitted function, so they are traced as in training. The structural test checks that the band is all that
is ever materialised, in the forward and the backward.
"""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from attention_test_utils import max_intermediate_size

from jaxlab.attention import dot_product_attention
from jaxlab.attention.masks import AttentionMask
from jaxlab.attention.local import (bigbird_layout, block_layout_from_window, block_sparse_attention,
                                    local_attention, strided_layout)
from jaxlab.attention.softmax import xla_attention

SCALE = 0.37  # not 1/sqrt(H), so a dropped or doubled scale shows


def _inputs(seed, b, tq, tk, n, kh, h):
  rng = np.random.default_rng(seed)
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  return normal((b, tq, n, h)), normal((b, tk, kh, h)), normal((b, tk, kh, h)), normal((b, tq, n, h))


def _value_and_grads(fns, q, k, v, ct, arrays):
  """For each fn: (out, (dq, dk, dv)) of fn(q, k, v, **arrays), all under one jit (one compile), the
  mask arrays traced."""

  @jax.jit
  def run(q, k, v, arrays, ct):
    results = []
    for fn in fns:
      out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **arrays), q, k, v)
      results.append((out, vjp(ct)))
    return results

  return run(q, k, v, arrays, ct)


def _assert_match(got, ref):
  out, grads = got
  ref_out, ref_grads = ref
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
  for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5, err_msg=name)


def _segments(b, t, cuts, seed=0):
  ids = np.zeros((b, t), np.int32)
  for r in range(b):
    for c in cuts[r]:
      ids[r, c:] += 1
  return jnp.asarray(ids + seed)


def _arrays(kind, b, t):
  if kind is None:
    return {}
  if kind == "segments":
    seg = _segments(b, t, [[7, 20], [11]][:b], seed=3)
    return dict(q_segment_ids=seg, kv_segment_ids=seg)
  if kind == "kv_segments_only":  # the q ids default to the kv ids (self-attention)
    return dict(kv_segment_ids=_segments(b, t, [[5, 6, 17], [12]][:b]))
  if kind == "lengths":
    return dict(q_lengths=jnp.array([21, 29][:b], jnp.int32),
                kv_lengths=jnp.array([29, 0][:b], jnp.int32))
  raise ValueError(kind)


# (id, B, T, N, K, H, window, causal, block_size, mask arrays)
LOCAL_CASES = [
    ("w0_0", 2, 29, 2, 2, 8, (0, 0), False, None, None),
    ("w3_0_b5", 1, 29, 2, 2, 8, (3, 0), False, 5, None),
    ("w5_2", 2, 29, 2, 2, 8, (5, 2), False, None, None),
    ("w5_2_b3", 1, 29, 2, 2, 8, (5, 2), False, 3, None),  # two key blocks on the left
    ("w0_4_b6", 1, 29, 2, 2, 8, (0, 4), False, 6, None),
    ("w5_2_causal", 2, 29, 2, 2, 8, (5, 2), True, 4, None),
    ("segments", 2, 29, 2, 2, 8, (5, 2), False, 4, "segments"),
    ("gqa_causal_segments", 2, 29, 4, 2, 8, (6, 0), True, 8, "kv_segments_only"),
    ("mqa_lengths", 2, 29, 4, 1, 16, (3, 3), False, 5, "lengths"),
    ("window_wider_than_t", 1, 13, 2, 1, 8, (40, 40), False, None, None),
    # int32's maximum as "unbounded": i + right wrapped, and rows 1.. saw no key (zeros)
    ("right_side_int32_max", 1, 12, 2, 1, 8, (0, 2**31 - 1), False, 4, None),
    ("both_sides_int32_max", 1, 12, 2, 1, 8, (2**31 - 1, 2**31 - 1), False, None, "segments"),
]


@pytest.mark.parametrize("case", LOCAL_CASES, ids=[c[0] for c in LOCAL_CASES])
def test_local_matches_reference(case):
  name, b, t, n, kh, h, window, causal, block_size, kind = case
  q, k, v, ct = _inputs(len(name), b, t, t, n, kh, h)
  arrays = _arrays(kind, b, t)
  local = lambda q, k, v, **m: local_attention(q, k, v, window=window, causal=causal, scale=SCALE,
                                               block_size=block_size, **m)
  ref = lambda q, k, v, **m: dot_product_attention(q, k, v, window=window, causal=causal, scale=SCALE,
                                                   implementation="xla", **m)
  got, want = _value_and_grads((local, ref), q, k, v, ct, arrays)
  assert got[0].shape == q.shape and got[0].dtype == q.dtype
  _assert_match(got, want)
  if kind == "lengths":  # batch row 1 has kv_length 0: every row is empty -> zeros, zero gradients
    out, (dq, dk, dv) = got
    for x in (out, dq, dk, dv):
      assert np.isfinite(np.asarray(x)).all()
      np.testing.assert_array_equal(x[1], 0.0)


# ---------------------------------------------------------------------------------------------------
# Block-sparse attention.


@dataclasses.dataclass(frozen=True)
class _DenseMask(AttentionMask):
  """An `AttentionMask` whose `full()` (what `xla_attention` reads) is an arbitrary grid."""
  grid: np.ndarray = None  # [Tq, Tk] bool

  def full(self):
    return jnp.asarray(self.grid)[None, None]


def _dense_grid(layout, bs, tq, tk, causal):
  i = np.arange(tq)[:, None]
  j = np.arange(tk)[None, :]
  grid = np.asarray(layout)[i // bs, j // bs]
  if causal:
    grid = grid & (j <= i + tk - tq)
  return grid


_EMPTY_ROW = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1]], bool)

# (id, B, Tq, Tk, N, K, H, layout, block_size, causal)
SPARSE_CASES = [
    ("window_layout", 2, 29, 29, 2, 2, 8, block_layout_from_window(6, 1, 1), 5, False),
    ("window_layout_causal_gqa", 1, 29, 29, 4, 2, 8, block_layout_from_window(4, 2, 0), 8, True),
    ("empty_row_causal_mqa", 2, 29, 29, 4, 1, 8, _EMPTY_ROW, 8, True),
    ("bigbird", 1, 29, 29, 2, 2, 8, bigbird_layout(10, window=1, num_global=1, num_random=2, seed=3),
     3, False),
    ("strided_causal", 1, 29, 29, 2, 2, 8, strided_layout(8, local_blocks=2, stride=3), 4, True),
    ("tq_ne_tk_causal", 2, 13, 29, 2, 2, 8, np.array([[1, 1, 0, 1], [0, 1, 1, 1]], bool), 8, True),
]


@pytest.mark.parametrize("case", SPARSE_CASES, ids=[c[0] for c in SPARSE_CASES])
def test_block_sparse_matches_reference(case):
  name, b, tq, tk, n, kh, h, layout, bs, causal = case
  q, k, v, ct = _inputs(len(name), b, tq, tk, n, kh, h)
  mask = _DenseMask(tq, tk, grid=_dense_grid(layout, bs, tq, tk, causal))
  sparse = lambda q, k, v: block_sparse_attention(q, k, v, layout=layout, block_size=bs,
                                                  causal=causal, scale=SCALE)
  ref = lambda q, k, v: xla_attention(q, k, v, mask, scale=SCALE)
  got, want = _value_and_grads((sparse, ref), q, k, v, ct, {})
  assert got[0].shape == q.shape and got[0].dtype == q.dtype
  _assert_match(got, want)
  empty = ~mask.grid.any(axis=1)
  if name.startswith("empty_row"):
    assert empty[8:16].all()
    np.testing.assert_array_equal(np.asarray(got[0])[:, empty], 0.0)
    np.testing.assert_array_equal(np.asarray(got[1][0])[:, empty], 0.0)  # dq


# ---------------------------------------------------------------------------------------------------
# Memory: only the band is ever materialised.


def test_memory_is_linear_in_length():
  """Forward + backward at T=4096, window (64, 0), block 64: the largest intermediate is at most
  2 * T * (left + right + block) elements (measured exactly T * (left + right + block) = T * 128 for
  both; a [T, T] tensor is 32x larger than the bound)."""
  t, h, left = 4096, 16, 64
  spec = jax.ShapeDtypeStruct((1, t, 1, h), jnp.float32)
  bs = 64
  layout = block_layout_from_window(t // bs, 1, 0)
  impls = {
      "local": lambda q, k, v: local_attention(q, k, v, window=(left, 0), causal=True),
      "block_sparse": lambda q, k, v: block_sparse_attention(q, k, v, layout=layout, block_size=bs,
                                                             causal=True),
      "xla": lambda q, k, v: dot_product_attention(q, k, v, window=(left, 0), causal=True,
                                                   implementation="xla"),
  }
  biggest = {}
  for name, fn in impls.items():
    grad = jax.grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))
    biggest[name] = max_intermediate_size(jax.make_jaxpr(grad)(spec, spec, spec).jaxpr)
  assert biggest["xla"] >= t * t, biggest  # the check can see a materialised score matrix
  band = 2 * t * (left + 0 + bs)  # local's default block size is max(left, right) = 64 = bs
  assert biggest["local"] <= band, biggest
  assert biggest["block_sparse"] <= band, biggest


# ---------------------------------------------------------------------------------------------------
# Layout helpers.


def test_block_layout_from_window():
  got = block_layout_from_window(4, 1, 0)
  want = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(block_layout_from_window(3, 0, 5), np.triu(np.ones((3, 3), bool)))


def test_bigbird_layout():
  nb, g, r = 12, 2, 2
  layout = bigbird_layout(nb, window=1, num_global=g, num_random=r, seed=7)
  assert layout.shape == (nb, nb) and layout.dtype == bool
  assert layout[:g].all() and layout[:, :g].all()
  band = block_layout_from_window(nb, 1, 1)
  assert (layout >= band).all()
  base = band.copy()
  base[:, :g] = True
  np.testing.assert_array_equal((layout & ~base)[g:].sum(axis=1), r)  # exactly r random per row
  np.testing.assert_array_equal(layout, bigbird_layout(nb, window=1, num_global=g, num_random=r,
                                                       seed=7))
  assert not all(np.array_equal(layout, bigbird_layout(nb, window=1, num_global=g, num_random=r,
                                                       seed=s)) for s in range(8, 12))


def test_strided_layout():
  layout = strided_layout(7, local_blocks=2, stride=3)
  i, j = np.indices((7, 7))
  want = (j <= i) & ((j >= i - 1) | (j % 3 == 2))
  np.testing.assert_array_equal(layout, want)
  both = strided_layout(7, local_blocks=2, stride=3, causal=False)
  np.testing.assert_array_equal(both, (abs(i - j) <= 1) | (j % 3 == 2))


# ---------------------------------------------------------------------------------------------------
# Argument checking.


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=(-1, 0)), "window left"),
    (dict(window=(2, 1.5)), "window right"),
    (dict(window=(None, 2)), "window left"),
    (dict(window=None), "window"),
    (dict(window=(3,)), "window"),
    (dict(window=(True, 0)), "window left"),
    (dict(window=(2, 2), block_size=0), "block_size"),
    (dict(window=(2, 2), block_size=4.0), "block_size"),
    (dict(window=(2, 2), q_segment_ids=jnp.zeros((1, 5), jnp.int32)), "q_segment_ids"),
])
def test_local_bad_arguments_name_the_argument(kwargs, match):
  q = jnp.zeros((1, 6, 2, 8))
  with pytest.raises(ValueError, match=match):
    local_attention(q, q, q, **kwargs)


def test_local_rejects_cross_attention():
  q, kv = jnp.zeros((1, 6, 2, 8)), jnp.zeros((1, 7, 2, 8))
  with pytest.raises(ValueError, match="self-attention.*Tq=6.*Tk=7"):
    local_attention(q, kv, kv, window=(1, 1))


@pytest.mark.parametrize("kwargs,match", [
    (dict(layout=np.ones((2, 3), bool), block_size=4), r"layout.*\(2, 2\)"),
    (dict(layout=np.ones((2,), bool), block_size=4), "layout"),
    (dict(layout=np.full((2, 2), 0.5), block_size=4), "layout.*dtype"),
    (dict(layout=np.ones((2, 2), bool), block_size=0), "block_size"),
    (dict(layout=np.ones((2, 2), bool), block_size=True), "block_size"),
])
def test_block_sparse_bad_arguments_name_the_argument(kwargs, match):
  q = jnp.zeros((1, 6, 2, 8))
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(q, q, q, **kwargs)


def test_block_sparse_rejects_traced_layout():
  q = jnp.zeros((1, 6, 2, 8))
  with pytest.raises(ValueError, match="layout"):
    jax.jit(lambda layout: block_sparse_attention(q, q, q, layout=layout, block_size=4))(
        jnp.ones((2, 2), bool))


@pytest.mark.parametrize("fn,kwargs,match", [
    (block_layout_from_window, dict(num_blocks=0, left_blocks=1, right_blocks=1), "num_blocks"),
    (block_layout_from_window, dict(num_blocks=4, left_blocks=-1, right_blocks=1), "left_blocks"),
    (bigbird_layout, dict(num_blocks=4, num_global=5), "num_global"),
    (bigbird_layout, dict(num_blocks=4, num_random=-1), "num_random"),
    (bigbird_layout, dict(num_blocks=4, window=(1, 2, 3)), "window"),
    (strided_layout, dict(num_blocks=4, local_blocks=2, stride=0), "stride"),
    (strided_layout, dict(num_blocks=4, local_blocks=0, stride=2), "local_blocks"),
])
def test_layout_helpers_bad_arguments(fn, kwargs, match):
  with pytest.raises(ValueError, match=match):
    fn(**kwargs)
