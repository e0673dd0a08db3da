"""The jitted train step's randomness: dropout masks drawn from (run key, step)."""

import jax
import jax.numpy as jnp

from jaxlab.train import trainer


def test_each_step_draws_its_own_dropout_masks_and_a_step_replays_its_own(tiny_lm_config,
                                                                           tmp_path):
  """The step's key is fold_in(run key, step): the same parameters and batch at another step give
  another loss (one key for every step passed every resume test: those are deterministic either
  way), and the same step gives the same loss (what makes a resumed run reproduce)."""
  run = trainer.setup(tiny_lm_config("--config.model.dropout=0.5"), tmp_path)
  run.checkpointer.close()
  step_fn = trainer.make_train_step(run)
  batch = run.place_batch(next(run.task.train_iterator()))
  state = trainer.init_state(run)
  snapshot = jax.device_get(state)

  def loss_at(step: int) -> float:
    fresh = jax.tree.map(jnp.asarray, snapshot)  # the step donates its state
    fresh["step"] = jnp.asarray(step, snapshot["step"].dtype)
    with run.mesh, run.rules():
      _, metrics = step_fn(jax.device_put(fresh, run.state_shardings), batch)
    return float(metrics["loss"])

  first, again, later = loss_at(0), loss_at(0), loss_at(1)
  assert first == again
  assert abs(first - later) > 1e-4, (first, later)
