"""RoPE: relative-position property, norms, complex form, partial rotary, 2-D axial, dtypes, errors.

Inputs are NumPy arrays and checks are done in NumPy, so the only compiled programs are the library's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import positions as P

B, T, N, H = 2, 6, 3, 8


def _x(seed=0, shape=(B, T, N, H)):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _pos(offset=0, t=T, b=B):
  return np.broadcast_to(np.arange(t, dtype=np.int32) + offset, (b, t)).copy()


def _logits(q, k):
  return np.einsum("bqnh,bknh->bnqk", np.asarray(q, np.float64), np.asarray(k, np.float64))


def _np_rope(x, pos, theta=10000.0):
  """Independent float64 NumPy RoPE: pair (i, i + R/2) rotated by p * theta^(-2i/R)."""
  x, r = np.asarray(x, np.float64), x.shape[-1]
  a = np.asarray(pos, np.float64)[:, :, None, None] * theta ** (-2.0 * np.arange(r // 2) / r)
  x1, x2 = x[..., :r // 2], x[..., r // 2:]
  return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)], -1)


def test_plain_rope_matches_numpy_and_the_previous_frequencies():
  x, pos = _x(), _pos(3)
  np.testing.assert_allclose(np.asarray(P.apply_rope(x, pos)), _np_rope(x, pos), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(P.apply_rope(x, pos, theta=100.0)), _np_rope(x, pos, 100.0),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(P.rope_frequencies(H)), 1e4 ** (-np.arange(0, H, 2) / H), rtol=1e-6)


def test_position_zero_is_identity_and_head_dim_two_rotates_by_one_radian():
  x = _x()
  np.testing.assert_array_equal(np.asarray(P.apply_rope(x, np.zeros((B, T), np.int32))), x)
  out = np.asarray(P.apply_rope(np.array([1.0, 0.0], np.float32).reshape(1, 1, 1, 2), np.ones((1, 1))))
  np.testing.assert_allclose(out.ravel(), [np.cos(1.0), np.sin(1.0)], rtol=1e-6)


@pytest.mark.parametrize("scaling", [None, {"kind": "linear", "factor": 3.0},
                                     {"kind": "yarn", "factor": 4.0, "original_max_len": 16}])
def test_logits_depend_only_on_relative_position(scaling):
  q, k = _x(1), _x(2)
  m = np.array([[0, 3, 5, 9, 2, 7], [4, 4, 1, 0, 8, 3]])
  rope = lambda v, p: P.apply_rope(v, p, scaling=scaling)
  base = _logits(rope(q, m), rope(k, m))
  for shift in (17, 250):
    np.testing.assert_allclose(_logits(rope(q, m + shift), rope(k, m + shift)), base, rtol=1e-4, atol=1e-4)
  # Control: shifting only the queries changes the logits, so the check above can fail.
  assert np.abs(_logits(rope(q, m + 17), rope(k, m)) - base).max() > 1e-2


def test_norms_preserved_per_pair():
  x = _x(3)
  pos = np.random.default_rng(4).integers(0, 10_000, (B, T))
  out = np.asarray(P.apply_rope(x, pos), np.float64)
  pair = lambda v: v[..., :H // 2] ** 2 + v[..., H // 2:] ** 2
  np.testing.assert_allclose(pair(out), pair(x.astype(np.float64)), rtol=1e-5, atol=1e-6)
  assert np.abs(out - x).max() > 1e-2


@pytest.mark.parametrize("kw", [{}, {"rotary_fraction": 0.5, "theta": 500.0},
                                {"scaling": P.RopeScaling("dynamic_ntk", 2.0, original_max_len=3)}])
def test_rotate_half_equals_complex_form(kw):
  x = _x(5)
  pos = np.random.default_rng(6).integers(0, 100, (B, T))
  np.testing.assert_allclose(np.asarray(P.apply_rope(x, pos, **kw)),
                             np.asarray(P.apply_rope_complex(x, pos, **kw)), rtol=1e-5, atol=1e-5)


def test_partial_rotary_passes_through_the_tail():
  x = _x(7, shape=(B, T, N, 16))
  pos = _pos(11)
  out = np.asarray(P.apply_rope(x, pos, rotary_fraction=0.25))  # 4 rotary dims
  np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
  np.testing.assert_allclose(out[..., :4], _np_rope(x[..., :4], pos), rtol=1e-5, atol=1e-5)
  assert np.abs(out[..., :4] - x[..., :4]).max() > 1e-2



def test_rotary_fraction_that_rounds_below_a_whole_number_counts_as_it():
  """100 * 0.58 is 57.99999999999999 in floating point: 58 rotary dims, not an odd 57 (refused);
  100 * 0.57 = 56.99999999999999 stays int()'s 56, as in Hugging Face."""
  from jaxlab.configs import load_config
  from jaxlab.positions.rope import rotary_dim
  assert (rotary_dim(100, 0.57), rotary_dim(100, 0.58), rotary_dim(80, 0.4)) == (56, 58, 32)
  # the LM config's check counts as the layer does (it used int() and refused 0.58 for head_dim 100)
  load_config("lm_char", ["--config.model.width=400", "--config.model.num_heads=4",
                          "--config.model.rotary_fraction=0.58"], check_devices=False)
  x = _x(12, shape=(1, 3, 1, 100))
  pos = np.array([[0, 5000, 20000]])  # the last pair turns slowly: far positions show it
  out = np.asarray(P.apply_rope(x, pos, rotary_fraction=0.58))
  np.testing.assert_array_equal(out[..., 58:], x[..., 58:])
  assert np.abs(out[..., 56:58] - x[..., 56:58]).max() > 1e-3

def test_rope_2d_factorises_into_row_and_column_rope():
  x = _x(8, shape=(B, T, N, 16))
  rng = np.random.default_rng(9)
  rows, cols = rng.integers(0, 20, (B, T)), rng.integers(0, 20, (B, T))
  zeros = np.zeros_like(rows)
  # Row-only: the first half of the rotary dims is 1-D RoPE with the rows, the rest unchanged.
  out = np.asarray(P.apply_rope_2d(x, np.stack([rows, zeros], -1)))
  np.testing.assert_allclose(out[..., :8], _np_rope(x[..., :8], rows), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[..., 8:], x[..., 8:])
  # Column-only: the mirror image.
  out = np.asarray(P.apply_rope_2d(x, np.stack([zeros, cols], -1)))
  np.testing.assert_array_equal(out[..., :8], x[..., :8])
  np.testing.assert_allclose(out[..., 8:], _np_rope(x[..., 8:], cols), rtol=1e-5, atol=1e-5)
  # Both, with partial rotary: the two 1-D RoPEs side by side, the tail untouched.
  out = np.asarray(P.apply_rope_2d(x, np.stack([rows, cols], -1), rotary_fraction=0.5))
  want = np.concatenate([_np_rope(x[..., :4], rows), _np_rope(x[..., 4:8], cols), x[..., 8:]], -1)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_rope_2d_logits_depend_only_on_the_2d_offset():
  q, k = _x(11, shape=(B, T, N, 16)), _x(12, shape=(B, T, N, 16))
  rc = np.random.default_rng(13).integers(0, 8, (B, T, 2))
  base = _logits(P.apply_rope_2d(q, rc), P.apply_rope_2d(k, rc))
  moved = _logits(P.apply_rope_2d(q, rc + np.array([5, -3])), P.apply_rope_2d(k, rc + np.array([5, -3])))
  np.testing.assert_allclose(moved, base, rtol=1e-4, atol=1e-4)
  swapped = _logits(P.apply_rope_2d(q, rc[..., ::-1].copy()), P.apply_rope_2d(k, rc))
  assert np.abs(swapped - base).max() > 1e-2


def test_packed_segments_and_decoding_offsets():
  x = _x(14, shape=(1, 7, N, H))
  packed = np.array([[0, 1, 2, 3, 0, 1, 2]])  # two segments, the second restarts at 0
  out = np.asarray(P.apply_rope(x, packed))
  np.testing.assert_allclose(out[:, 4:], _np_rope(x[:, 4:], _pos(0, 3, 1)), rtol=1e-5, atol=1e-5)
  full = np.asarray(P.apply_rope(x, _pos(0, 7, 1)))
  step = np.asarray(P.apply_rope(x[:, 5:6], np.array([[5]])))  # one decoding step at offset 5
  np.testing.assert_allclose(step, full[:, 5:6], rtol=1e-6)


def test_low_precision_input_is_computed_in_float32():
  x = jnp.asarray(_x(15)).astype(jnp.bfloat16)
  pos = _pos(1000)
  out = P.apply_rope(x, pos)
  assert out.dtype == jnp.bfloat16
  want = _np_rope(np.asarray(x, np.float32), pos)  # float64 from the same bf16 inputs
  err = np.abs(np.asarray(out, np.float64) - want)
  assert err.max() <= 2 ** -7 * np.abs(want).max()  # one bf16 rounding of a float32/64 result


def test_jit_with_scaling_dataclass_and_traced_positions():
  sc = P.RopeScaling("yarn", 8.0, original_max_len=4)
  f = jax.jit(lambda x, p: P.apply_rope(x, p, scaling=sc, rotary_fraction=0.5))
  x, pos = _x(16), _pos(2)
  eager = P.apply_rope(x, pos, scaling=sc, rotary_fraction=0.5)
  np.testing.assert_allclose(np.asarray(f(x, pos)), np.asarray(eager), rtol=1e-6, atol=1e-6)
  assert sc == P.as_rope_scaling({"kind": "yarn", "factor": 8, "original_max_len": 4})


def test_a_hugging_face_yarn_dict_gets_the_released_code_s_ramp():
  """HF's YaRN uses the released code's ramp: a dict in HF's keys loads its checkpoints right."""
  hf = {"rope_type": "yarn", "factor": 8, "original_max_position_embeddings": 4}
  assert P.as_rope_scaling(hf) == P.RopeScaling("yarn", 8.0, original_max_len=4,
                                                yarn_ramp="reference")
  assert P.as_rope_scaling({**hf, "yarn_ramp": "paper"}).yarn_ramp == "paper"
  assert P.as_rope_scaling({"kind": "yarn", "factor": 8, "original_max_len": 4}).yarn_ramp == "paper"
  # only the kind's HF spelling marks an HF config (a jaxlab dict may borrow HF's length key)
  mixed = {"kind": "yarn", "factor": 8, "original_max_position_embeddings": 4}
  assert P.as_rope_scaling(mixed).yarn_ramp == "paper"
  # Another kind in HF's keys: no ramp (which that kind would refuse as ignored).
  assert P.as_rope_scaling({"type": "linear", "factor": 2}) == P.RopeScaling("linear", 2.0)
  assert P.as_rope_scaling({"rope_type": "dynamic", "factor": 2.0,
                            "original_max_position_embeddings": 4}).kind == "dynamic_ntk"


_Z3, _Z4 = np.zeros((2, 3, 1, 8), np.float32), np.zeros((2, 3), np.float32)


@pytest.mark.parametrize("call, match", [
    (lambda: P.apply_rope(np.zeros((2, 3, 8), np.float32), _Z4), "x must be"),
    (lambda: P.apply_rope(_Z3, np.zeros((2, 4))), "positions must have shape"),
    (lambda: P.apply_rope(np.zeros((2, 3, 1, 7), np.float32), _Z4), "rotary_fraction"),
    (lambda: P.apply_rope(_Z3, _Z4, rotary_fraction=0.0), "rotary_fraction"),
    (lambda: P.apply_rope(_Z3, _Z4, rotary_fraction=1.5), "rotary_fraction"),
    (lambda: P.apply_rope(_Z3, _Z4, theta=-1.0), "theta"),
    (lambda: P.rope_frequencies(8, theta=-10.0), "theta"),  # NaN before
    (lambda: P.rope_frequencies(0), "head_dim"),  # an empty table before
    (lambda: P.rope_frequencies(-4), "head_dim"),
    (lambda: P.apply_rope(np.zeros((2, 3, 1, 8), np.int32), _Z4), "x must have a floating"),
    (lambda: P.apply_rope(_Z3, _Z4, scaling={"kind": "magic", "factor": 2}), "scaling kind"),
    (lambda: P.apply_rope(_Z3, _Z4, scaling={"kind": "linear", "factor": 0.5}), "scaling factor"),
    (lambda: P.apply_rope(_Z3, _Z4, scaling={"kind": "yarn", "factor": 2}), "original_max_len"),
    (lambda: P.apply_rope(_Z3, _Z4, scaling={"kind": "linear", "factor": 2, "mscale": 1}),
     "unknown key 'mscale'"),
    (lambda: P.apply_rope(_Z3, _Z4, seq_len=4), "seq_len"),
    (lambda: P.apply_rope(_Z3, jnp.asarray(_Z4, jnp.bfloat16)), "positions must be integers or float32"),
    (lambda: P.alibi_bias_from_positions(2, _Z4, np.zeros((2, 3), np.float16)),
     "kv_positions must be integers or float32"),
    (lambda: P.apply_rope(_Z3, _Z4, scaling={"kind": "dynamic_ntk", "factor": 2, "original_max_len": 2},
                          seq_len=np.ones(3)), "seq_len"),
    (lambda: P.apply_rope(np.zeros((2, 3, 1, 2), np.float32), _Z4, scaling={"kind": "ntk", "factor": 2}),
     "more than 2 rotary dims"),
    (lambda: P.apply_rope_2d(np.zeros((2, 3, 1, 6), np.float32), np.zeros((2, 3, 2))), "divisible by 4"),
    (lambda: P.apply_rope_2d(_Z3, _Z4), "positions must have shape"),
    (lambda: P.RopeScaling("yarn", 2.0, original_max_len=8, beta_fast=1.0, beta_slow=2.0), "beta_fast"),
    # YaRN's own options with another kind were accepted and ignored.
    (lambda: P.RopeScaling("ntk", 4.0, beta_fast=8.0), "beta_fast=8.0 applies to kind 'yarn' only"),
    (lambda: P.RopeScaling("linear", 4.0, beta_slow=2.0), "beta_slow=2.0 applies to kind 'yarn'"),
    (lambda: P.as_rope_scaling({"kind": "dynamic", "factor": 2, "original_max_len": 4,
                                "yarn_ramp": "reference"}), "kind 'dynamic_ntk' would ignore it"),
])
def test_bad_arguments_raise_value_error_naming_them(call, match):
  with pytest.raises(ValueError, match=match):
    call()
