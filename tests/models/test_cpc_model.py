"""The CPC model: contexts are causal (c_t depends on x_<=t only, by Jacobian), its loss is
`cpc_loss` of its own z, c and W, it learns a predictable sequence (the true future wins the softmax),
and sharded over data / fsdp / tensor its loss and gradients equal one device's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.losses.cpc import cpc_loss
from jaxlab.models.cpc import CPC
from jaxlab.train import sharding


def _model(**kw):
  return CPC(**{"latent_dim": 8, "context_dim": 16, "steps": 3, "encoder_hidden": 32, **kw})


def test_contexts_are_causal_and_latents_are_per_step():
  model = _model()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 5))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), x)["params"])
  z_jac, c_jac = jax.jacrev(lambda x: model.apply({"params": params}, x))(x)  # [B,T,*, B,T,F]
  dep_z = np.abs(np.asarray(z_jac)).sum(axis=(2, 5))  # [B, T, B, T]
  dep_c = np.abs(np.asarray(c_jac)).sum(axis=(2, 5))
  for b in range(2):
    for t in range(7):
      assert np.all(dep_c[b, t, b, t + 1:] == 0), (b, t)  # no future input reaches c_t
      assert np.all(dep_c[b, t, b, :t + 1] > 0), (b, t)  # every past one does
      assert np.all(np.delete(dep_z[b, t, b], t) == 0) and dep_z[b, t, b, t] > 0
      assert np.all(dep_c[b, t, 1 - b] == 0)  # rows are independent


def test_loss_is_cpc_loss_of_its_own_latents_contexts_and_maps():
  model = _model()
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 5))
  lengths = jnp.asarray([6, 4, 5])
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), x)["params"])
  z, c = model.apply({"params": params}, x)
  expected = cpc_loss(z, c, params["predictors"], lengths_B=lengths)
  got = model.apply({"params": params}, x, lengths, method=model.loss)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def _sequences(key, batch, length=8, vocab=6):
  """One-hot of (s + t) mod vocab with a random start s per row: the future is a function of the
  present."""
  start = jax.random.randint(key, (batch, 1), 0, vocab)
  return jax.nn.one_hot((start + jnp.arange(length)) % vocab, vocab)


def test_it_learns_a_predictable_sequence():
  model = _model(steps=2)
  x = _sequences(jax.random.PRNGKey(0), 16)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), x)["params"])
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state, key):
    loss, grads = jax.value_and_grad(
        lambda p: model.apply({"params": p}, _sequences(key, 16), method=model.loss))(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  first = None
  for i in range(300):
    params, state, loss = step(params, state, jax.random.PRNGKey(i))
    first = float(loss) if first is None else first
  # 16 x 8 = 128 candidates, 16 of them one-hots of the same value: the best possible loss is
  # log(#latents equal to the positive), about log(128 / 6) = 3.06; chance is log(128) = 4.85.
  x = _sequences(jax.random.PRNGKey(999), 16)
  final = float(model.apply({"params": params}, x, method=model.loss))
  assert first > 4.5 and final < 3.5, (first, final)


def test_sharded_loss_and_gradients_equal_one_device_s():
  model = _model()
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 4))  # features: an fsdp-sharded axis
  boxed = model.init(jax.random.PRNGKey(1), x)["params"]
  params = nn.meta.unbox(boxed)
  loss_and_grad = lambda p, x: jax.value_and_grad(
      lambda p: model.apply({"params": p}, x, method=model.loss))(p)
  expected = loss_and_grad(params, x)
  mesh = sharding.make_mesh((2, 2, 2))
  param_shardings = sharding.logical_shardings(boxed, mesh)  # refuses unknown or clashing names
  with mesh, nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    placed = jax.device_put(params, nn.meta.unbox(param_shardings))
    batch = jax.device_put(x, sharding.batch_sharding(mesh))
    got = jax.jit(loss_and_grad)(placed, batch)
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got[1],
               expected[1])


@pytest.mark.parametrize("kw,message", [(dict(steps=0), "steps must be an int >= 1"),
                                        (dict(latent_dim=2.5), "latent_dim must be an int")])
def test_bad_sizes_name_the_attribute(kw, message):
  with pytest.raises(ValueError, match=message):
    _model(**kw).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 3)))


def test_bad_input_names_it():
  with pytest.raises(ValueError, match=r"x_BTF must be a float \[batch, time, features\]"):
    _model().init(jax.random.PRNGKey(0), jnp.zeros((4, 3)))
