"""The GPT on a real CUDA GPU trains through the Pallas flash kernel with no config change.

Skipped without a GPU. Run with `JAX_PLATFORMS=cuda python -m pytest tests/models/test_gpt_gpu.py`.
With attention_impl=None (the default) the lowered train step must hold the Pallas kernel, and its loss,
gradients and a short AdamW run must match the same model with attention_impl="xla".
"""

import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp

from jaxlab.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a CUDA GPU (JAX_PLATFORMS=cuda)")


def _model(impl, dtype):
  # head_dim 64 (a Pallas head dim); lengths ragged against the kernel's 64/128 tiles.
  return GPT(GPTConfig(vocab_size=65, num_layers=2, width=128, num_heads=2, num_kv_heads=1,
                       max_len=200, position="rope", attention_impl=impl, dtype=dtype))


# (dtype, first-loss rtol, gradient tolerance x each leaf's largest |value|, trajectory rtol = atol).
# bfloat16, measured in interpret mode on CPU: first losses 4e-6 apart, gradients 0.8% of a leaf's
# largest value, 30-step losses 0.015 apart.
@pytest.mark.parametrize("dtype,loss_tol,grad_tol,curve_tol", [(jnp.float32, 1e-4, 1e-3, 1e-3),
                                                               (jnp.bfloat16, 1e-3, 3e-2, 5e-2)])
def test_default_dispatch_trains_with_the_pallas_kernel(dtype, loss_tol, grad_tol, curve_tol):
  # A learnable stream: each row counts up by a fixed stride modulo the vocabulary.
  tokens = (jnp.arange(190)[None, :] * jnp.array([[3], [5], [7], [11]]) + 1) % 65
  params = _model("xla", dtype).init(jax.random.key(1), tokens[:, :-1])["params"]

  def loss_fn(params, impl):
    logits = _model(impl, dtype).apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]).mean()

  grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)
  has_kernel = lambda text: "@__gpu$xla.gpu.triton" in text or "@mosaic_gpu_v2" in text
  assert has_kernel(grad.lower(params, None).as_text()), "the default dispatch did not pick Pallas"
  assert not has_kernel(grad.lower(params, "xla").as_text())
  (loss, g), (loss_ref, g_ref) = grad(params, None), grad(params, "xla")
  np.testing.assert_allclose(loss, loss_ref, rtol=loss_tol)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    scale = float(jnp.max(jnp.abs(b.astype(jnp.float32)))) + 1e-6
    assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) <= grad_tol * scale

  opt = optax.adamw(1e-3)

  def train(impl, steps=30):
    @jax.jit
    def step(p, s):
      loss, g = jax.value_and_grad(loss_fn)(p, impl)
      updates, s = opt.update(g, s, p)
      return optax.apply_updates(p, updates), s, loss
    p, s, losses = params, opt.init(params), []
    for _ in range(steps):
      p, s, loss = step(p, s)
      losses.append(float(loss))
    return np.array(losses)

  ours, ref = train(None), train("xla")
  assert ours[-1] < ours[0] - 0.3  # it learns
  np.testing.assert_allclose(ours, ref, rtol=curve_tol, atol=curve_tol)
