"""The feed-forward block against its definition act(x W_in + b_in) W_out + b_out for each activation
of `model.activation`, in value and gradient, and the GPT's flag reaching its MLPs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from jaxlab.layers.mlp import ACTIVATIONS, MLP
from jaxlab.models.gpt import GPT, GPTConfig

# Plain definitions (NumPy / SciPy, float64): Hendrycks & Gimpel 2016 (exact GELU and its tanh
# approximation), ReLU, SiLU = x sigmoid(x) (Elfwing et al. 2018).
REFERENCE = {
    "gelu": lambda x: 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3))),
    "relu": lambda x: np.maximum(x, 0.0),
    "silu": lambda x: x * special.expit(x),
}


def test_every_activation_has_a_reference():
  assert sorted(ACTIVATIONS) == sorted(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_activation_equals_its_definition_in_value_and_gradient(name):
  x = np.linspace(-6.0, 6.0, 241)
  got = np.asarray(ACTIVATIONS[name](jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, REFERENCE[name](x), atol=2e-6, rtol=1e-6)
  # Gradient against a central difference of the definition (away from ReLU's kink at 0).
  x = x[np.abs(x) > 1e-3]
  grad = np.asarray(jax.vmap(jax.grad(ACTIVATIONS[name]))(jnp.asarray(x, jnp.float32)))
  h = 1e-5
  numeric = (REFERENCE[name](x + h) - REFERENCE[name](x - h)) / (2 * h)
  np.testing.assert_allclose(grad, numeric, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_mlp_equals_its_definition(name, use_bias):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
  mlp = MLP(hidden=16, activation=name, use_bias=use_bias, init_std=0.5, out_init_std=0.5)
  params = nn.meta.unbox(mlp.init(jax.random.PRNGKey(1), x)["params"])
  params = jax.tree.map(lambda p: p + 0.1 if p.ndim == 1 else p, params)  # nonzero biases
  w_in, w_out = np.float64(params["wi"]["kernel"]), np.float64(params["wo"]["kernel"])
  b_in = np.float64(params["wi"]["bias"]) if use_bias else 0.0
  b_out = np.float64(params["wo"]["bias"]) if use_bias else 0.0
  expected = REFERENCE[name](np.float64(x) @ w_in + b_in) @ w_out + b_out
  np.testing.assert_allclose(np.asarray(mlp.apply({"params": params}, x)), expected,
                             atol=1e-5, rtol=1e-5)


def test_unknown_activation_is_refused_by_name():
  with pytest.raises(ValueError, match="activation must be one of"):
    MLP(hidden=4, activation="tanh").init(jax.random.PRNGKey(0), jnp.zeros((1, 1, 2)))


def test_the_gpt_flag_reaches_its_mlps():
  """One set of parameters, the four activations: four different outputs, and gelu's equals the
  default model's."""
  tokens = jnp.arange(6)[None] % 5
  make = lambda act: GPT(GPTConfig(vocab_size=5, num_layers=1, width=16, num_heads=2,
                                   num_kv_heads=2, max_len=8, activation=act))
  params = make("gelu").init(jax.random.PRNGKey(0), tokens)["params"]
  # At the init scale (0.02) the pre-activations are ~0.1, where gelu and gelu_tanh agree to 1e-8.
  params = jax.tree.map(lambda p: 40 * p, params)
  logits = {a: np.asarray(make(a).apply({"params": params}, tokens)) for a in sorted(REFERENCE)}
  default = GPT(GPTConfig(vocab_size=5, num_layers=1, width=16, num_heads=2, num_kv_heads=2,
                          max_len=8))
  np.testing.assert_array_equal(np.asarray(default.apply({"params": params}, tokens)),
                                logits["gelu"])
  names = sorted(logits)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert np.abs(logits[a] - logits[b]).max() > 1e-4, (a, b)
