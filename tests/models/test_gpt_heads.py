"""Multi-token-prediction and Medusa heads: each head against a computation written here, the
next-token path unchanged by them, causality of every head, cached decoding, and the multi-token loss
against a per-head loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.decoding import sampling
from jaxlab.models.gpt import GPT, GPTConfig
from jaxlab.train.lm_task import heads_loss

V = 11
BASE = dict(vocab_size=V, num_layers=2, width=32, num_heads=4, num_kv_heads=2, max_len=24,
            position="rope")
KINDS = [dict(mtp_heads=2), dict(medusa_heads=3), dict(mtp_heads=1, tie_embeddings=False),
         dict(medusa_heads=2, position="learned", tie_embeddings=False)]


def gpt(**kw):
  return GPT(GPTConfig(**{**BASE, **kw}))


def _tokens(t=9, seed=0):
  return jax.random.randint(jax.random.key(seed), (2, t), 0, V)


def _params(model, seed=1):
  """Initial parameters with every Medusa residual kernel redrawn away from its zero init."""
  params = nn.meta.unbox(model.init(jax.random.key(seed), _tokens())["params"])
  rng = np.random.default_rng(seed)
  for name in params:
    if name.startswith("medusa_"):
      params[name]["res"]["kernel"] = jnp.asarray(0.2 * rng.standard_normal((32, 32)), jnp.float32)
      params[name]["res"]["bias"] = jnp.asarray(0.2 * rng.standard_normal(32), jnp.float32)
  return params


@pytest.mark.parametrize("kw", KINDS)
def test_head_zero_is_the_model_without_extra_heads(kw):
  """Adding heads leaves the next-token model as it was: same parameter init, same logits."""
  model, plain = gpt(**kw), gpt(**{k: v for k, v in kw.items() if not k.endswith("_heads")})
  tokens = _tokens()
  params = _params(model)
  base = nn.meta.unbox(plain.init(jax.random.key(1), tokens)["params"])
  for name in base:  # the shared parameters are initialised exactly as without heads
    jax.tree.map(np.testing.assert_array_equal, params[name], base[name])
  extra = set(params) - set(base)
  assert extra and all(n.startswith(("mtp_block_", "ln_mtp_", "medusa_")) for n in extra)
  all_heads = model.apply({"params": params}, tokens, all_heads=True)
  assert all_heads.shape == (2, 9, 1 + model.config.extra_heads, V)
  np.testing.assert_array_equal(all_heads[:, :, 0], model.apply({"params": params}, tokens))
  np.testing.assert_allclose(all_heads[:, :, 0], plain.apply({"params": base}, tokens), atol=1e-6)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_mtp_head_is_a_block_beside_the_last_one(tie):
  """Head j = unembed(ln_mtp_j(mtp_block_j(trunk))): the plain model with its last block and final
  norm swapped for head j's gives the same logits (Gloeckle et al. 2024, fig. 1); untied, through
  the output layer head/kernel (heads reading the token table instead passed the tied case)."""
  model, plain = gpt(mtp_heads=2, tie_embeddings=tie), gpt(tie_embeddings=tie)
  tokens = _tokens()
  params = _params(model)
  got = model.apply({"params": params}, tokens, all_heads=True)
  for j in (1, 2):
    swapped = {"embed": params["embed"], "block_0": params["block_0"],
               "block_1": params[f"mtp_block_{j}"], "ln_final": params[f"ln_mtp_{j}"],
               **({} if tie else {"head": params["head"]})}
    want = plain.apply({"params": swapped}, tokens)
    np.testing.assert_allclose(got[:, :, j], want, atol=1e-5)
    assert np.abs(np.asarray(got[:, :, j] - got[:, :, 0])).max() > 1e-3


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_medusa_head_is_a_residual_silu_block_on_the_last_hidden_state(tie):
  """Head j = (h + SiLU(h W1 + b1)) E^T with h the final normed hidden state (Cai et al. 2024,
  sec. 2.1.1), computed here from the captured h; at init (W1 = 0, b1 = 0) every head is head 0.
  Untied, E^T is the output layer head/kernel."""
  model = gpt(medusa_heads=2, tie_embeddings=tie)
  tokens = _tokens()
  params = _params(model)
  got, state = model.apply({"params": params}, tokens, all_heads=True,
                           capture_intermediates=lambda mdl, _: mdl.name == "ln_final")
  h = state["intermediates"]["ln_final"]["__call__"][0]
  unembed = params["embed"]["embedding"].T if tie else params["head"]["kernel"]
  for j in (1, 2):
    w, b = params[f"medusa_{j}"]["res"]["kernel"], params[f"medusa_{j}"]["res"]["bias"]
    want = (h + jax.nn.silu(h @ w + b)) @ unembed
    np.testing.assert_allclose(got[:, :, j], want, atol=1e-5)
  fresh = nn.meta.unbox(model.init(jax.random.key(1), tokens)["params"])
  at_init = model.apply({"params": fresh}, tokens, all_heads=True)
  for j in (1, 2):
    np.testing.assert_allclose(at_init[:, :, j], at_init[:, :, 0], atol=1e-6)


def _apply_soft(model, params, x_onehot):
  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
      return x_onehot @ context.module.embedding
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(interceptor):
    return model.apply({"params": params}, jnp.argmax(x_onehot, -1), all_heads=True)


@pytest.mark.parametrize("kw", KINDS[:2])
def test_every_head_is_causal(kw):
  """d logits[:, t, j] / d input[:, s] is zero for s > t and nonzero for s <= t, for every head j."""
  model = gpt(**kw)
  tokens = _tokens()
  params = _params(model)
  jac = jax.jacrev(lambda x: _apply_soft(model, params, x).sum(-1))(jax.nn.one_hot(tokens, V))
  influence = np.abs(np.asarray(jac)).sum(axis=(0, 3, 5))  # [T, J, T(s)]
  later = np.triu(np.ones((9, 9), bool), 1)
  for j in range(influence.shape[1]):
    assert np.all(influence[:, j][later] == 0.0), j
    assert np.all(influence[:, j][~later] > 0.0), j


@pytest.mark.parametrize("kw", KINDS)
def test_cached_decoding_of_all_heads_equals_the_full_pass(kw):
  model = gpt(**kw)
  tokens = _tokens(12)
  params = _params(model)
  full = model.apply({"params": params}, tokens, all_heads=True)
  cache = sampling.init_cache(model, 2, 12)
  step = jax.jit(lambda cache, x, pos, prefill: model.apply(
      {"params": params, "cache": cache}, x, pos, decode=True, prefill=prefill, all_heads=True,
      mutable=["cache"]), static_argnums=3)
  outs, start = [], 0
  for size in (4, 1, 3, 4):
    pos = jnp.broadcast_to(jnp.arange(start, start + size), (2, size))
    out, mut = step(cache, tokens[:, start:start + size], pos, start == 0)
    outs.append(out)
    cache, start = mut["cache"], start + size
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)


def _naive_heads_loss(logits_BTJV, targets_BT, decay):
  """Per head, per position loop: head j at t is scored against the token t + 1 + j."""
  logits, targets = np.asarray(logits_BTJV, np.float64), np.asarray(targets_BT)
  b, t, heads, _ = logits.shape
  loss = 0.0
  for j in range(1, heads):
    terms = []
    for row in range(b):
      for pos in range(t - j):
        z = logits[row, pos, j]
        terms.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[targets[row, pos + j]])
    loss += decay ** j * np.mean(terms)
  return loss


@pytest.mark.parametrize("decay", [1.0, 0.8])
def test_heads_loss_against_a_loop(decay):
  logits = jax.random.normal(jax.random.key(0), (2, 7, 4, V)) * 3
  targets = jax.random.randint(jax.random.key(1), (2, 7), 0, V)
  np.testing.assert_allclose(heads_loss(logits, targets, decay),
                             _naive_heads_loss(logits, targets, decay), rtol=1e-5)
  # Its gradient reaches only the scored entries: head j's last j positions have no target.
  grad = np.asarray(jax.jit(jax.grad(lambda z: heads_loss(z, targets, decay)))(logits))
  assert np.all(grad[:, :, 0] == 0)
  for j in (1, 2, 3):
    assert np.all(grad[:, 7 - j:, j] == 0) and np.abs(grad[:, :7 - j, j]).min() > 0


def test_stop_gradient_heads_leave_the_trunk_gradient_alone():
  """heads_stop_gradient (Medusa-1): the multi-token loss gives the next-token parameters exactly the
  gradient of the next-token loss, and the heads still get one. Untied too: the heads read the
  output layer (head/kernel) through the stop as well (with it undetached the test passed tied)."""
  for kw in (dict(medusa_heads=2), dict(mtp_heads=2), dict(medusa_heads=2, tie_embeddings=False),
             dict(mtp_heads=2, tie_embeddings=False)):
    model = gpt(heads_stop_gradient=True, **kw)
    tokens = _tokens(10)
    params = _params(model)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def losses(p):
      logits = model.apply({"params": p}, inputs, all_heads=True)
      nt = optax.softmax_cross_entropy_with_integer_labels(logits[:, :, 0], targets).mean()
      return nt, nt + heads_loss(logits, targets, 1.0)

    g_nt = jax.jit(jax.grad(lambda p: losses(p)[0]))(params)
    g_all = jax.jit(jax.grad(lambda p: losses(p)[1]))(params)
    for name in params:
      if name.startswith(("mtp_", "ln_mtp_", "medusa_")):
        assert max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(g_all[name])) > 0
      else:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, atol=1e-7 + 1e-6 * np.abs(b).max()), g_all[name], g_nt[name])
    joint = gpt(**kw)  # without the stop: the heads' loss moves the trunk too
    g_joint = jax.jit(jax.grad(lambda p: heads_loss(
        joint.apply({"params": p}, inputs, all_heads=True), targets, 1.0)))(params)
    assert np.abs(np.asarray(g_joint["block_0"]["mlp"]["wi"]["kernel"])).max() > 0


def test_bad_head_counts():
  with pytest.raises(ValueError, match="mtp_heads"):
    gpt(mtp_heads=1, medusa_heads=1)
  with pytest.raises(ValueError, match="medusa_heads"):
    gpt(medusa_heads=-1)


def test_plain_decoding_cache_leaves_out_the_mtp_blocks():
  """generate() reads only the next-token blocks: its cache is that of the model without heads."""
  with_heads = sampling.init_cache(gpt(mtp_heads=2), 2, 12, all_heads=False)
  without = sampling.init_cache(gpt(), 2, 12)
  assert jax.tree.structure(with_heads) == jax.tree.structure(without)
  assert any(name.startswith("mtp_block_") for name in sampling.init_cache(gpt(mtp_heads=2), 2, 12))


def test_a_cache_without_the_mtp_blocks_is_refused_when_decoding_all_heads():
  """init_cache(all_heads=False) read with all_heads=True: the MTP blocks would have decoded against
  fresh empty caches (no history) without an error."""
  model = gpt(mtp_heads=2)
  tokens = jnp.zeros((2, 3), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  cache = sampling.init_cache(model, 2, 12, all_heads=False)
  positions = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (2, 3))
  with pytest.raises(ValueError, match="mtp_block_1/attn: .*all_heads=True"):
    model.apply({"params": params, "cache": cache}, tokens, positions, decode=True, all_heads=True,
                mutable=["cache"])


def test_decoding_after_the_prefill_needs_positions():
  """Positions left out while decoding would restart at 0 (RoPE, learned tables) without an error."""
  model = gpt()
  tokens = jnp.zeros((2, 3), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  cache = sampling.init_cache(model, 2, 12)
  _, mutated = model.apply({"params": params, "cache": cache}, tokens, decode=True, prefill=True,
                           mutable=["cache"])  # a prefill may default to 0..T-1
  with pytest.raises(ValueError, match="decode=True needs positions_BT"):
    model.apply({"params": params, "cache": mutated["cache"]}, tokens[:, :1], decode=True,
                mutable=["cache"])
