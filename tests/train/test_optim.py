"""Weight decay reaches matrices only (and embeddings only when asked); the schedule's shape."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxlab.train import optim


def test_decay_mask():
  params = {"embed": {"embedding": jnp.ones((5, 4))}, "pos_embed": jnp.ones((3, 4)),
            "block_0": {"ln_attn": {"scale": jnp.ones(4)}, "mlp": {"wi": {"kernel": jnp.ones((4, 8)),
                                                                          "bias": jnp.ones(8)}}}}
  mask = optim.decay_mask(params)
  assert mask["block_0"]["mlp"]["wi"]["kernel"]
  assert not mask["block_0"]["mlp"]["wi"]["bias"] and not mask["block_0"]["ln_attn"]["scale"]
  assert not mask["embed"]["embedding"] and not mask["pos_embed"]
  mask = optim.decay_mask(params, decay_embeddings=True)
  assert mask["embed"]["embedding"] and mask["pos_embed"] and not mask["block_0"]["ln_attn"]["scale"]


def test_weight_decay_changes_only_masked_leaves():
  cfg = ml_collections.ConfigDict(dict(lr=0.1, min_lr=0.0, warmup_steps=1, b1=0.9, b2=0.99,
                                       eps=1e-8, weight_decay=0.5, grad_clip=0.0,
                                       decay_embeddings=False))
  tx = optim.make_optimizer(cfg, total_steps=10)
  params = {"embed": {"embedding": jnp.ones((2, 2))}, "w": {"kernel": jnp.ones((2, 2))},
            "b": {"bias": jnp.ones(2)}}
  state = tx.init(params)
  zero = {k: {kk: jnp.zeros_like(vv) for kk, vv in v.items()} for k, v in params.items()}
  updates, state = tx.update(zero, state, params)  # step 0: lr 0
  updates, state = tx.update(zero, state, params)  # step 1: lr 0.1, zero gradients
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["w"]["kernel"], 1 - 0.1 * 0.5)
  np.testing.assert_array_equal(new["embed"]["embedding"], 1.0)
  np.testing.assert_array_equal(new["b"]["bias"], 1.0)


def test_schedule_warmup_then_cosine_to_min():
  cfg = ml_collections.ConfigDict(dict(lr=1e-3, min_lr=1e-4, warmup_steps=100))
  s = optim.learning_rate_schedule(cfg, 2000)
  np.testing.assert_allclose([s(0), s(50), s(100), s(1050), s(2000), s(3000)],
                             [0.0, 5e-4, 1e-3, 5.5e-4, 1e-4, 1e-4], rtol=1e-5, atol=1e-9)
