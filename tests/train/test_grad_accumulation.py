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


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("microbatches", [2, 3, 6])
def test_microbatches_equal_the_whole_batch(microbatches, scaled):
  """Slice counts differ (m = 3: 0, 2 and 4 weighted rows). With a loss scale (float16 training)
  each slice's mean is scaled and re-weighted by its count: that branch had no test with uneven
  counts (the LM's slices all count alike), and a mean of slice means passed."""
  from jaxlab.train import loss_scale
  scale = (loss_scale.scaler({"scale": jnp.float32(1024.0), "counter": jnp.int32(0)}, 2000)
           if scaled else None)
  task, params, batch = WeightedRegression(), {"w": jnp.array([0.3, -0.2, 0.5])}, _batch(6)
  loss, grads = loss_and_grads(task, params, batch, jax.random.key(1))
  loss_m, grads_m = jax.jit(lambda p, b: loss_and_grads(task, p, b, jax.random.key(1),
                                                        microbatches, scale=scale))(params, batch)
  np.testing.assert_allclose(loss_m, loss, rtol=1e-6)
  np.testing.assert_allclose(grads_m["w"], grads["w"], rtol=1e-5)


def test_microbatches_must_divide_the_batch():
  with pytest.raises(ValueError, match="microbatches=4"):
    loss_and_grads(WeightedRegression(), {"w": jnp.zeros(3)}, _batch(6), jax.random.key(1), 4)


class NoisyRows:
  """A loss that draws one uniform per row from its key: its gradient shows which rows each slice
  held and which key it drew with."""

  def loss(self, params, batch, rng, *, train):
    del train
    noise_B = jax.random.uniform(rng, batch["x"].shape[:1])
    total = jnp.sum(batch["weights"] * noise_B * batch["x"][:, 0]) * params["w"][0]
    count = jnp.sum(batch["weights"])
    return total / count, (total, count)


def test_slices_are_strided_rows_each_with_its_own_key():
  """Slice j holds rows j, j + m, ... (each device keeps its rows: no resharding) and draws with
  fold_in(key, j): contiguous slices, or one key for every slice (the same dropout masks), passed
  the equality test above, whose loss ignores its key."""
  m, rng, batch = 3, jax.random.key(1), _batch(12)
  _, grads = loss_and_grads(NoisyRows(), {"w": jnp.ones(3)}, batch, rng, m)
  x0, weights = np.asarray(batch["x"][:, 0]), np.asarray(batch["weights"])
  noise = [np.asarray(jax.random.uniform(jax.random.fold_in(rng, j), (12 // m,))) for j in range(m)]
  expected = sum(np.sum(weights[j::m] * noise[j] * x0[j::m]) for j in range(m)) / weights.sum()
  np.testing.assert_allclose(grads["w"][0], expected, rtol=1e-5)
  assert not np.allclose(noise[0], noise[1])
