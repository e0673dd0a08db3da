"""CPC's multi-step InfoNCE against a loop-by-loop NumPy reference (float64), in value and gradient,
with ragged lengths; padding changes nothing; a context that predicts its futures exactly drives the
loss to 0; bad shapes name the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.losses.cpc import cpc_loss


def reference(z, c, w, lengths, predicts=None):
  """van den Oord et al. 2018, eq. 3-4 written out: per step k, per valid (b, t) of a row that
  predicts, the softmax over all valid latents of the batch of z^T W_k c_t, the positive z_{b, t+k}."""
  z, c, w = (np.asarray(a, np.float64) for a in (z, c, w))
  b, t, _ = z.shape
  candidates = [(r, s) for r in range(b) for s in range(lengths[r])]
  per_step = []
  for k in range(1, w.shape[0] + 1):
    losses = []
    for r in range(b):
      if predicts is not None and not predicts[r]:
        continue
      for s in range(lengths[r] - k):
        p = w[k - 1].T @ c[r, s]
        scores = np.array([z[r2, s2] @ p for r2, s2 in candidates])
        positive = candidates.index((r, s + k))
        losses.append(np.log(np.sum(np.exp(scores - scores.max()))) + scores.max()
                      - scores[positive])
    per_step.append(np.mean(losses) if losses else 0.0)
  return np.mean(per_step)


def _inputs(seed=0, b=3, t=6, d=4, c=5, k=3):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(keys[0], (b, t, d)), jax.random.normal(keys[1], (b, t, c)),
          0.5 * jax.random.normal(keys[2], (k, c, d)))


@pytest.mark.parametrize("lengths,predicts", [(None, None), ([6, 4, 2], None), ([6, 1, 5], None),
                                              ([6, 4, 5], [True, False, True])])
def test_equals_the_reference_in_value_and_gradient(lengths, predicts):
  z, c, w = _inputs()
  full = [6, 6, 6] if lengths is None else lengths
  args = {} if lengths is None else {"lengths_B": jnp.asarray(lengths)}
  if predicts is not None:
    args["predicts_B"] = jnp.asarray(predicts)
  np.testing.assert_allclose(cpc_loss(z, c, w, **args), reference(z, c, w, full, predicts),
                             rtol=1e-5)
  grads = jax.grad(lambda z, c, w: cpc_loss(z, c, w, **args), argnums=(0, 1, 2))(z, c, w)
  # The reference's gradient by central differences in float64, on a few entries of each input.
  rng = np.random.default_rng(0)
  for i, (x, g) in enumerate(zip((z, c, w), grads)):
    assert np.all(np.isfinite(np.asarray(g)))
    for _ in range(6):
      idx = tuple(rng.integers(0, n) for n in x.shape)
      def at(delta):
        moved = [np.asarray(a, np.float64) for a in (z, c, w)]
        moved[i][idx] += delta
        return reference(*moved, full, predicts)
      numeric = (at(1e-5) - at(-1e-5)) / 2e-5
      np.testing.assert_allclose(float(g[idx]), numeric, rtol=2e-3, atol=1e-5, err_msg=f"{i} {idx}")


@pytest.mark.parametrize("lengths", [[6, 6, 6], [6, 4, 5]])
def test_rows_that_only_give_negatives(lengths):
  """predicts_B=False rows are scored against (their latents are negatives of the other rows) but
  predict nothing: the reference's loss, and not the loss of the predicting rows alone."""
  z, c, w = _inputs()
  predicts = [True, False, True]
  got = cpc_loss(z, c, w, lengths_B=jnp.asarray(lengths), predicts_B=jnp.asarray(predicts))
  np.testing.assert_allclose(got, reference(z, c, w, lengths, predicts), rtol=1e-5)
  alone = cpc_loss(z[::2], c[::2], w, lengths_B=jnp.asarray(lengths[::2]))
  assert float(got) > float(alone) + 0.05  # more negatives: a harder softmax
  gc = jax.grad(lambda c: cpc_loss(z, c, w, lengths_B=jnp.asarray(lengths),
                                   predicts_B=jnp.asarray(predicts)))(c)
  assert np.all(np.asarray(gc)[1] == 0) and np.any(np.asarray(gc)[0] != 0)  # its contexts: unused


def test_padding_changes_nothing_and_gets_no_gradient():
  z, c, w = _inputs()
  lengths = jnp.asarray([6, 3, 4])
  loss = lambda z, c: cpc_loss(z, c, w, lengths_B=lengths)
  pad_BT = jnp.arange(6)[None, :] >= lengths[:, None]
  noise = 100.0 * jnp.ones_like(z)
  z2 = jnp.where(pad_BT[..., None], noise, z)
  c2 = jnp.where(pad_BT[..., None], -noise[..., :1], c)
  assert float(loss(z, c)) == pytest.approx(float(loss(z2, c2)), rel=1e-6)
  gz, gc = jax.grad(loss, argnums=(0, 1))(z2, c2)
  assert np.all(np.asarray(gz)[np.asarray(pad_BT)] == 0)
  assert np.all(np.asarray(gc)[np.asarray(pad_BT)] == 0)


def test_exact_predictions_give_a_loss_near_zero_and_random_ones_about_log_n():
  """W_k c_t = a z_{t+k} with a large a (and orthogonal latents): the positive wins every softmax."""
  b, t = 2, 5
  n = b * t
  z = jnp.eye(n).reshape(b, t, n)  # one-hot latents: distinct and orthogonal
  # c_t holds z_{t+1} and z_{t+2} in two halves; W_k picks half k, scaled.
  c = jnp.concatenate([jnp.roll(z, -1, axis=1), jnp.roll(z, -2, axis=1)], axis=-1)
  w = 30.0 * jnp.stack([jnp.concatenate([jnp.eye(n), jnp.zeros((n, n))]),
                        jnp.concatenate([jnp.zeros((n, n)), jnp.eye(n)])])
  assert float(cpc_loss(z, c, w)) < 1e-6
  random = cpc_loss(z, jax.random.normal(jax.random.PRNGKey(1), c.shape), 1e-3 * w)
  assert float(random) == pytest.approx(np.log(n), rel=1e-2)  # scores ~ 0: uniform over N


def test_a_step_no_row_reaches_counts_zero():
  z, c, w = _inputs(k=3)
  lengths = [3, 2, 1]  # no row has a position t with t + 3 < its length
  got = cpc_loss(z, c, w, lengths_B=jnp.asarray(lengths))
  np.testing.assert_allclose(got, reference(z, c, w, lengths), rtol=1e-5)


@pytest.mark.parametrize("args,name", [
    (dict(z=np.zeros((2, 6))), "z_BTD must be"),
    (dict(c=np.zeros((2, 5, 5))), "c_BTC must have z_BTD's batch and time"),
    (dict(w=np.zeros((3, 4, 4))), "w_KCD must be [steps, context, latent]"),
    (dict(w=np.zeros((6, 5, 4))), "w_KCD's K=6 prediction steps"),
    (dict(z=np.zeros((3, 6, 4), np.int32)), "z_BTD must be a float array"),
    (dict(lengths_B=np.array([6.0, 6.0, 6.0])), "lengths_B must be int [batch]"),
    (dict(predicts_B=np.array([1, 0, 1])), "predicts_B must be bool [batch]"),
])
def test_bad_inputs_name_the_argument(args, name):
  z, c, w = _inputs()
  kwargs = {name: args.pop(name) for name in ("lengths_B", "predicts_B") if name in args}
  inputs = {**dict(z=z, c=c, w=w), **args}
  with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
    cpc_loss(inputs["z"], inputs["c"], inputs["w"], **kwargs)
