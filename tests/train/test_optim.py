"""Weight decay reaches matrices only (and embeddings only when asked); the schedule's shape."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

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


@pytest.mark.parametrize("config,overrides", [
    ("lm_char", ["--config.model.use_bias=True", "--config.model.position=t5"]),
    ("lm_char", ["--config.model.attention=flash", "--config.model.medusa_heads=1"]),
    ("contrastive_digits", ["--config.model.image_encoder=swin"]),
    ("made", ["--config.model.direct=True"]), ("nade", []), ("fvsbn", []), ("pixelcnn", [])])
def test_decay_mask_on_every_model_decays_weights_only(config, overrides):
  """Every parameter of the real models, by its role: multi-dimensional biases (qkv [N, 3, H]), GAU's
  [4, E] scales and offsets and the relative-position tables of T5 and Swin are not decayed."""
  import flax.linen as nn
  import jax
  from jaxlab.configs import load_config
  from jaxlab.train import tasks
  task = tasks.build_task(load_config(config, overrides + ["--config.mesh.data=1"],
                                      check_devices=False))
  params = nn.meta.unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
  for decay_embeddings in (False, True):
    mask = optim.decay_mask(params, decay_embeddings=decay_embeddings)
    flat = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), decayed in zip(flat, jax.tree_util.tree_leaves(mask)):
      name = path[-1].key
      table = name in ("embedding", "pos_embed", "rel_embedding", "relative_position_bias_table")
      weight = name in ("kernel", "w", "v", "weight", "direct") or name.startswith("kernel_")
      assert decayed == (weight or (decay_embeddings and table)), (jax.tree_util.keystr(path),
                                                                  leaf.shape)
      if leaf.ndim >= 2 and not weight and not table:  # what the rank rule got wrong
        assert name in ("bias", "gamma", "beta"), jax.tree_util.keystr(path)
      if leaf.ndim == 2 and name not in ("gamma", "beta") and not table:  # every 2-D weight counts
        assert weight, jax.tree_util.keystr(path)


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_changes_only_masked_leaves(decay_embeddings):
  """optim.decay_embeddings=True decays the token table too (the optimizer ignoring the flag passed
  when only False was tried); biases never."""
  cfg = ml_collections.ConfigDict(dict(lr=0.1, min_lr=0.0, warmup_steps=1, b1=0.9, b2=0.99,
                                       eps=1e-8, weight_decay=0.5, grad_clip=0.0,
                                       decay_embeddings=decay_embeddings))
  tx = optim.make_optimizer(cfg, total_steps=10)
  params = {"embed": {"embedding": jnp.ones((2, 2))}, "w": {"kernel": jnp.ones((2, 2))},
            "b": {"bias": jnp.ones(2)}}
  state = tx.init(params)
  zero = {k: {kk: jnp.zeros_like(vv) for kk, vv in v.items()} for k, v in params.items()}
  updates, state = tx.update(zero, state, params)  # step 0: lr 0
  updates, state = tx.update(zero, state, params)  # step 1: lr 0.1, zero gradients
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["w"]["kernel"], 1 - 0.1 * 0.5)
  np.testing.assert_allclose(new["embed"]["embedding"], 1 - 0.1 * 0.5 if decay_embeddings else 1.0)
  np.testing.assert_array_equal(new["b"]["bias"], 1.0)


def test_schedule_warmup_then_cosine_to_min():
  cfg = ml_collections.ConfigDict(dict(lr=1e-3, min_lr=1e-4, warmup_steps=100))
  s = optim.learning_rate_schedule(cfg, 2000)
  np.testing.assert_allclose([s(0), s(50), s(100), s(1050), s(2000), s(3000)],
                             [0.0, 5e-4, 1e-3, 5.5e-4, 1e-4, 1e-4], rtol=1e-5, atol=1e-9)


def test_clip_above_keeps_a_parameter_at_its_bound_under_momentum():
  """CLIP's logit scale clipped in place after each step (OpenCLIP's clamp_): Adam's momentum, built
  up while the gradient pushed it up, carries the plain parameter past the bound; clip_above keeps it
  there, lets it come down as soon as the gradient turns, touches no other leaf and keeps the state
  of the optimizer it wraps (checkpoints unchanged)."""
  bound = float(np.log(5.0))
  inner = optax.adam(0.05)
  tx = optim.clip_above(inner, {"log_scale": bound})
  params = {"log_scale": jnp.float32(1.0), "w": jnp.ones(3)}
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(inner.init(params))

  def run(tx, steps_up=30, steps_down=20):
    p, state, trace = params, tx.init(params), []
    for i in range(steps_up + steps_down):
      sign = -1.0 if i < steps_up else 1.0  # descent on +log_scale (up), then on -log_scale (down)
      grads = {"log_scale": jnp.float32(sign), "w": jnp.full(3, 0.5)}
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
      trace.append((float(p["log_scale"]), np.asarray(p["w"])))
    return trace

  plain, clipped = run(inner), run(tx)
  assert max(t[0] for t in plain) > bound + 0.3  # momentum overshoots without the clamp
  assert max(t[0] for t in clipped) <= bound + 1e-6
  assert clipped[29][0] == pytest.approx(bound)
  # Once the gradient turns, Adam's first moment changes sign after ~7 steps (0.9**k < 1/2): the clipped
  # parameter then leaves the bound at once, the plain one first walks back its overshoot.
  first_below = next(i for i, t in enumerate(clipped) if i >= 30 and t[0] < bound - 1e-6)
  assert first_below <= 38 and plain[first_below][0] > bound + 0.5 and plain[-1][0] > bound
  for (_, w_plain), (_, w_clipped) in zip(plain, clipped):
    np.testing.assert_array_equal(w_plain, w_clipped)


def test_clip_above_sees_through_boxed_parameters():
  """Parameters still boxed with their logical axis names (flax's LogicallyPartitioned) are bounded too."""
  import flax.linen as nn
  tx = optim.clip_above(optax.sgd(1.0), {"log_scale": 1.0})
  box = lambda x, names: nn.LogicallyPartitioned(jnp.asarray(x, jnp.float32), names)
  params = {"log_scale": box(0.5, ()), "w": box([1.0, 1.0], ("embed",))}
  grads = {"log_scale": box(-3.0, ()), "w": box([1.0, 1.0], ("embed",))}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(updates["log_scale"].value) == 0.5  # 0.5 + 3.0 clipped to 1.0
  np.testing.assert_array_equal(updates["w"].value, [-1.0, -1.0])


def test_clip_above_matches_the_whole_path_and_refuses_unknown_names():
  """A bound on the top-level 'log_scale' leaves a deeper leaf of the same name alone, a '/'-joined path
  bounds a nested leaf, and a bound that names no parameter is an error rather than a silent no-op."""
  params = {"log_scale": jnp.float32(0.5), "tower": {"log_scale": jnp.float32(0.5)}}
  grads = {"log_scale": jnp.float32(-3.0), "tower": {"log_scale": jnp.float32(-3.0)}}
  top = optim.clip_above(optax.sgd(1.0), {"log_scale": 1.0})
  updates, _ = top.update(grads, top.init(params), params)
  assert float(updates["log_scale"]) == 0.5 and float(updates["tower"]["log_scale"]) == 3.0
  nested = optim.clip_above(optax.sgd(1.0), {"tower/log_scale": 1.0})
  updates, _ = nested.update(grads, nested.init(params), params)
  assert float(updates["log_scale"]) == 3.0 and float(updates["tower"]["log_scale"]) == 0.5
  typo = optim.clip_above(optax.sgd(1.0), {"log_scle": 1.0})
  with pytest.raises(ValueError, match="log_scle"):
    typo.update(grads, typo.init(params), params)
