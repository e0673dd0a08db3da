"""trainer.loss_and_grads: microbatches give the whole batch's mean loss and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.train.trainer import loss_and_grads


class WeightedRegression:
  """A task with the trainer's loss contract: (mean, (sum over examples, count)); rows weighted."""

  def loss(self, params, batch, rng, *, train):
    del rng, train
    err_B = jnp.tanh(batch["x"] @ params["w"]) - batch["y"]
    total = jnp.sum(batch["weights"] * err_B ** 2)
    count = jnp.sum(batch["weights"])
    return total / count, (total, count)


def _batch(rows):
  k = jax.random.split(jax.random.key(0), 2)
  return {"x": jax.random.normal(k[0], (rows, 3)), "y": jax.random.normal(k[1], (rows,)),
          "weights": jnp.arange(rows, dtype=jnp.float32) % 3}  # unequal counts per slice


@pytest.mark.parametrize("microbatches", [2, 3, 6])
def test_microbatches_equal_the_whole_batch(microbatches):
  task, params, batch = WeightedRegression(), {"w": jnp.array([0.3, -0.2, 0.5])}, _batch(6)
  loss, grads = loss_and_grads(task, params, batch, jax.random.key(1))
  loss_m, grads_m = jax.jit(lambda p, b: loss_and_grads(task, p, b, jax.random.key(1),
                                                        microbatches))(params, batch)
  np.testing.assert_allclose(loss_m, loss, rtol=1e-6)
  np.testing.assert_allclose(grads_m["w"], grads["w"], rtol=1e-5)


def test_microbatches_must_divide_the_batch():
  with pytest.raises(ValueError, match="microbatches=4"):
    loss_and_grads(WeightedRegression(), {"w": jnp.zeros(3)}, _batch(6), jax.random.key(1), 4)
