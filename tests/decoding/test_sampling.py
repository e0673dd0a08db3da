"""Temperature / top-k / top-p filtering against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.decoding.sampling import filter_logits, sample_token


def numpy_filter(logits, top_k, top_p):
  """Top-k first, then the nucleus of the renormalised top-k distribution (the usual order)."""
  out = logits.copy()
  for row in out:
    order = np.argsort(-row, kind="stable")
    if top_k:
      row[order[top_k:]] = -np.inf
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    mass = 0.0
    for i in order:
      if mass >= top_p:
        row[i] = -np.inf
      mass += probs[i]
  return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (4, 0.8), (1, 0.9)])
def test_filter_matches_numpy(top_k, top_p):
  logits = np.asarray(jax.random.normal(jax.random.key(0), (4, 10)), np.float32)
  got = np.asarray(filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
  want = numpy_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(want), got > -1e30)
  np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)])


def test_sampling_frequencies_follow_the_filtered_distribution():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(1), 4000)
  draws = jax.vmap(lambda k: sample_token(k, logits, top_k=2)[0])(keys)
  freq = np.bincount(np.asarray(draws), minlength=4) / len(keys)
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
  assert int(sample_token(keys[0], logits, temperature=0.0)[0]) == 0
  # The temperature first, then the nucleus: at T = 0.5, [.5, .3, .2] becomes [.66, .24, .10] and
  # top_p = 0.6 keeps token 0 alone (the nucleus of the unscaled probabilities also kept token 1).
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  draws = jax.vmap(lambda k: sample_token(k, logits, temperature=0.5, top_p=0.6)[0])(keys)
  assert (np.asarray(draws) == 0).all()


def test_filters_keep_exactly_k_and_the_smallest_nucleus_with_tied_logits():
  """Ties are ranked by token id: top-k keeps k tokens and top-p the smallest set with mass >= p,
  however many tokens share the logit at the cut (the NumPy reference ranks the same way)."""
  tied = np.array([np.log([0.5, 0.25, 0.25, 1e-9, 1e-9]), np.log([0.2] * 5)], np.float32)
  for top_k, top_p, kept in ((0, 0.55, [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]),
                             (2, 1.0, [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]),
                             (0, 0.1, [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]),
                             (4, 0.7, [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])):
    got = np.asarray(filter_logits(jnp.asarray(tied), top_k=top_k, top_p=top_p)) > -1e30
    np.testing.assert_array_equal(got, np.array(kept, bool), err_msg=f"top_k={top_k} top_p={top_p}")
    np.testing.assert_array_equal(got, np.isfinite(numpy_filter(tied, top_k, top_p)))
  # bfloat16-rounded logits over a large vocabulary tie often; the nucleus is still the smallest.
  logits = jax.random.normal(jax.random.key(2), (8, 4096)).astype(jnp.bfloat16).astype(jnp.float32)
  got = np.asarray(filter_logits(logits, top_p=0.9)) > -1e30
  np.testing.assert_array_equal(got, np.isfinite(numpy_filter(np.asarray(logits), 0, 0.9)))


def test_tiny_temperatures_approach_greedy_and_negative_ones_are_refused():
  logits = jnp.array([[-2.0, -1.0, -3.0], [5.0, 1e30, -1e30]])
  for temperature in (1e-3, 1e-20, 1e-38, 1e-45):
    for top_p in (1.0, 0.9):
      draws = sample_token(jax.random.key(0), logits, temperature=temperature, top_p=top_p)
      np.testing.assert_array_equal(draws, [1, 1], err_msg=f"T={temperature}, top_p={top_p}")
  with pytest.raises(ValueError, match="temperature"):
    sample_token(jax.random.key(0), logits, temperature=-1.0)
  with pytest.raises(ValueError, match="temperature must be finite"):  # sampled uniformly before
    sample_token(jax.random.key(0), logits, temperature=float("inf"))


def test_bad_arguments():
  with pytest.raises(ValueError, match="top_p"):
    filter_logits(jnp.zeros((1, 3)), top_p=0.0)
  with pytest.raises(ValueError, match="logits must be"):
    filter_logits(jnp.zeros((3,)))
  for top_k in (2.5, True):  # a TypeError deep in lax.top_k before; True would mean 1
    with pytest.raises(ValueError, match="integer top_k"):
      filter_logits(jnp.zeros((1, 3)), top_k=top_k)


def test_the_nucleus_boundary_and_16_bit_logits():
  """A token is kept while the mass before it is < top_p: at probabilities [.5, .25, .25] and
  top_p = 0.75 the third token is cut (the mass before it is exactly 0.75). 16-bit logits get the
  float32 nucleus (in float16 the running sum stalled below 0.9 and nothing was cut)."""
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  kept = np.asarray(filter_logits(logits, top_p=0.75)) > -1e30
  np.testing.assert_array_equal(kept, [[True, True, False]])
  wide = jax.random.normal(jax.random.key(3), (4, 4096)) * 2.0
  for dtype in (jnp.float16, jnp.bfloat16):
    low = wide.astype(dtype)
    got = filter_logits(low, top_p=0.9)
    assert got.dtype == dtype
    want = filter_logits(low.astype(jnp.float32), top_p=0.9) > -1e30
    np.testing.assert_array_equal(np.asarray(got) > np.finfo(dtype).min, want)
    assert not np.asarray(want).all()


def test_prompt_ids_outside_the_vocabulary_and_bad_filters_at_temperature_0_are_refused():
  from jaxlab.decoding.sampling import generate, generate_long
  from jaxlab.models.gpt import GPT, GPTConfig
  model = GPT(GPTConfig(vocab_size=11, num_layers=1, width=16, num_heads=2, num_kv_heads=2,
                        max_len=16))
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  for prompt in ([[1, 2, 11]], [[1, -3, 2]]):
    for fn in (generate, generate_long):
      with pytest.raises(ValueError, match="prompt_BP holds token ids outside \\[0, 11\\)"):
        fn(model, params, prompt, jax.random.key(0), num_tokens=2)
  assert generate(model, params, [[1, 2, 10]], jax.random.key(0), num_tokens=2).shape == (1, 5)
  with pytest.raises(ValueError, match="top_p"):
    sample_token(jax.random.key(0), jnp.zeros((1, 3)), temperature=0.0, top_p=5.0)


@pytest.mark.parametrize("dtype,limit", [(jnp.float16, 2048), (jnp.float32, 32768)])
def test_decoding_past_xpos_range_is_refused(dtype, limit):
  """xPos's key scales zeta^(-(n - c)/512) leave the dtype's range far from c = max_len // 2: the
  logits turn NaN and sampling emitted token 0 from there on, silently (found by review). generate
  and speculative_generate refuse such lengths; up to the limit the logits are finite."""
  import flax.linen as nn
  from jaxlab.decoding.sampling import check_decoding_length, generate
  from jaxlab.decoding.draft_tree import DraftTree
  from jaxlab.decoding.speculative import speculative_generate
  from jaxlab.models.gpt import GPT, GPTConfig
  model = GPT(GPTConfig(vocab_size=7, num_layers=1, width=16, num_heads=2, num_kv_heads=1, max_len=64,
                        position="xpos", dtype=dtype, medusa_heads=2))
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params = jax.tree.map(lambda a: a * 8.0 if a.ndim > 1 else a, params)  # keys of large entries
  prompt, center = jnp.zeros((1, 4), jnp.int32), 32
  most = center + limit + 1  # positions 0 .. center + limit
  logits_at = lambda *pos: model.apply({"params": params}, jnp.ones((1, len(pos)), jnp.int32),
                                       jnp.asarray([pos]))
  assert np.isfinite(np.asarray(logits_at(0, 1, most - 2, most - 1))).all()
  if dtype == jnp.float16:  # the failure the check prevents (float32's is past 36k)
    assert not np.isfinite(np.asarray(logits_at(0, 3 * limit + center))).all()
  check_decoding_length(model.config, most)
  with pytest.raises(ValueError, match=f"at most {most} tokens here"):
    generate(model, params, prompt, jax.random.key(0), num_tokens=most - 4 + 1)
  with pytest.raises(ValueError, match=r"\(\+ 2 draft positions\).*at most"):
    speculative_generate(model, params, prompt, jax.random.key(0), num_tokens=most - 4 - 1)
  # A tree's drafts reach its depth past the last token, not its size (6 here)
  with pytest.raises(ValueError, match=r"\(\+ 2 draft positions\).*at most"):
    speculative_generate(model, params, prompt, jax.random.key(0), num_tokens=most - 4 - 1,
                         tree=DraftTree.product((2, 2)))
  check_decoding_length(model.config, most - 2, drafts=2)
  wide = GPT(GPTConfig(vocab_size=7, num_layers=1, width=16, num_heads=2, num_kv_heads=1,
                       max_len=2 * limit + 4, position="xpos", dtype=dtype))
  with pytest.raises(ValueError, match="position 0 is past"):  # centred too far from position 0
    check_decoding_length(wide.config, 8)
