"""FVSBN, NADE, MADE, PixelCNN: autoregressive structure (exact zeros in the Jacobian), normalisation over
all 2^D vectors (float64), samples against exp(log_prob) by a chi-square test, NADE against its naive
D-network definition, MADE's ensemble."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxlab.models.fvsbn import FVSBN
from jaxlab.models.made import MADE, made_masks
from jaxlab.models.nade import NADE, nade_logits
from jaxlab.models.pixelcnn import GatedPixelCNN, PixelCNN, raster_mask


def _init(model, dim, seed=0, scale=1.0):
  """Parameters with every entry random (zero-initialised weights would hide structure)."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(seed),
                                        jnp.zeros((1, dim)))["params"])  # drop logical axis boxes
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed + 1)
  leaves = [jnp.asarray(scale * rng.standard_normal(l.shape), l.dtype) for l in leaves]
  return {"params": jax.tree.unflatten(tree, leaves)}


def _all_binary(dim):
  return np.array(list(itertools.product([0.0, 1.0], repeat=dim)))


MODELS = {
    "fvsbn": (lambda: FVSBN(6), 6),
    "nade": (lambda: NADE(6, hidden=5), 6),
    "made": (lambda: MADE(6, hidden=(7, 5), num_masks=3), 6),
    "made_direct": (lambda: MADE(6, hidden=(8,), num_masks=2, direct=True), 6),
    "pixelcnn": (lambda: PixelCNN((2, 3), channels=4, num_layers=1, first_kernel=3), 6),
    "gated_pixelcnn": (lambda: GatedPixelCNN((2, 3), channels=4, num_layers=2, first_kernel=3), 6),
}


def _orders(model, dim):
  """(mask_index, ordering) pairs the model's conditionals follow."""
  if isinstance(model, MADE):
    orders, _, _ = made_masks(dim, tuple(model.hidden), model.num_masks, seed=model.mask_seed)
    return list(enumerate(orders))
  return [(None, np.arange(dim))]


def _summed_abs_jacobian(f, xs, *args):
  """sum over the points xs of |d f(x, *args)_d / d x_j|: [out d, in j]. Reverse mode: NADE's gradient
  is hand-written (custom_vjp), so this also checks that its backward pass respects the ordering."""
  jac = jax.jit(jax.vmap(jax.jacrev(f), in_axes=(0,) + (None,) * len(args)))(xs, *args)
  return np.abs(np.asarray(jac)).sum(0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_jacobian_is_zero_for_inputs_not_before_each_output(name):
  make, dim = MODELS[name]
  model = make()
  variables = _init(model, dim)
  xs = jnp.asarray(np.random.default_rng(0).integers(0, 2, (4, dim)), jnp.float32)
  for k, order in _orders(model, dim):
    if k is None:
      jac = _summed_abs_jacobian(lambda x: model.apply(variables, x[None])[0], xs)
    else:
      jac = _summed_abs_jacobian(lambda x, k: model.apply(variables, x[None], k)[0], xs, k)
    position = np.empty(dim, int)
    position[order] = np.arange(dim)
    allowed = position[None, :] < position[:, None]  # input j comes before output d
    assert np.all(jac[~allowed] == 0.0), f"{name} mask {k}: output sees a later input"
    assert np.any(jac[allowed] != 0.0)  # the check has something to find


@pytest.mark.parametrize("name", sorted(MODELS))
def test_flipping_a_later_input_leaves_each_logit_unchanged(name):
  """The forward pass alone, no derivative: flipping x_j changes no logit d that comes at or before j in
  the ordering (and flips do change later logits: the check has something to find)."""
  make, dim = MODELS[name]
  model = make()
  variables = _init(model, dim)
  x = jnp.asarray(np.random.default_rng(6).integers(0, 2, (1, dim)), jnp.float32)
  for k, order in _orders(model, dim):
    logits = jax.jit(lambda x: model.apply(variables, x) if k is None else model.apply(variables, x, k))
    base = np.asarray(logits(x))[0]
    position = np.empty(dim, int)
    position[order] = np.arange(dim)
    changed = 0
    for j in range(dim):
      flipped = np.asarray(logits(x.at[0, j].set(1.0 - x[0, j])))[0]
      blind = position <= position[j]  # outputs that must not see x_j
      np.testing.assert_array_equal(flipped[blind], base[blind], err_msg=f"{name} mask {k} input {j}")
      changed += int(np.sum(flipped[~blind] != base[~blind]))
    assert changed > 0


def test_gated_pixelcnn_has_no_blind_spot_and_plain_pixelcnn_has_one():
  """Every pixel before (i, j) in raster order reaches logit (i, j) through the two stacks; the plain
  masked-conv stack misses pixels up and to the right (van den Oord et al. 2016b, Fig. 1)."""
  shape, dim = (5, 5), 25
  gated = GatedPixelCNN(shape, channels=4, num_layers=3, first_kernel=5)  # reaches 4 columns
  plain = PixelCNN(shape, channels=4, num_layers=3, first_kernel=3)
  xs = jnp.asarray(np.random.default_rng(1).integers(0, 2, (3, dim)), jnp.float32)
  before = np.tril(np.ones((dim, dim), bool), k=-1)
  for model, want_full in ((gated, True), (plain, False)):
    variables = _init(model, dim, seed=3)
    jac = _summed_abs_jacobian(lambda x: model.apply(variables, x[None])[0], xs)
    assert np.all(jac[~before] == 0.0)
    assert np.all(jac[before] != 0.0) == want_full
  # Plain PixelCNN, pixel (2, 1): pixel (0, 4) is before it but outside every masked 3x3 path.
  assert jac[2 * 5 + 1, 0 * 5 + 4] == 0.0


def test_raster_masks():
  np.testing.assert_array_equal(raster_mask(3, "A"), [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(raster_mask(3, "B"), [[1, 1, 1], [1, 1, 0], [0, 0, 0]])
  with pytest.raises(ValueError, match="mask_type"):
    raster_mask(3, "C")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_probabilities_of_all_binary_vectors_sum_to_one(name):
  make, dim = MODELS[name]
  with jax.enable_x64(True):
    model = make()
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _init(model, dim, scale=2.0))
    x = jnp.asarray(_all_binary(dim), jnp.float64)
    logp = jax.jit(lambda v, x: model.apply(v, x, method=model.log_prob))(variables, x)
    assert logp.dtype == jnp.float64
    np.testing.assert_allclose(float(jnp.sum(jnp.exp(logp))), 1.0, rtol=1e-12)
    if isinstance(model, MADE):  # each mask set alone is normalised too
      for k in range(model.num_masks):
        lp = model.apply(variables, x, k, method=model.log_prob)
        np.testing.assert_allclose(float(jnp.sum(jnp.exp(lp))), 1.0, rtol=1e-12)


def _chi2_pvalue(samples, probs):
  """Pearson's test over the 2^D vectors, the vectors expecting < 5 counts pooled into one bin (the
  test's approximation fails on them: a correct sampler was rejected at p ~ 1e-6 for one key)."""
  dim = samples.shape[1]
  index = (samples.astype(int) * (2 ** np.arange(dim)[::-1])).sum(1)
  counts, expected = np.bincount(index, minlength=2 ** dim), probs * len(samples)
  rare = expected < 5
  if rare.any():
    counts = np.append(counts[~rare], counts[rare].sum())
    expected = np.append(expected[~rare], expected[rare].sum())
  return stats.chisquare(counts, expected).pvalue


SAMPLE_SCALES = {"pixelcnn": 0.5}  # parameter scale per model for the sampling test (default 1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_samples_match_exp_log_prob(name):
  make, _ = MODELS[name]
  model = make()
  dim = 6
  scale = SAMPLE_SCALES.get(name, 1.0)
  variables = _init(model, dim, seed=2, scale=scale)
  probs = np.exp(np.asarray(model.apply(variables, jnp.asarray(_all_binary(dim), jnp.float32),
                                        method=model.log_prob), np.float64))
  probs /= probs.sum()  # float32 rounding only
  # Spread out (at scale 1.5 PixelCNN put 0.95 on one vector: a sampler that reused one key for
  # every pixel passed), but not uniform (log 64 = 4.16 nats).
  assert 2.0 < -(probs * np.log(probs)).sum() < 4.1
  n = 20000
  samples = np.asarray(jax.jit(lambda key: model.apply(variables, key, n, method=model.sample))(
      jax.random.PRNGKey(7)))
  assert samples.shape == (n, dim) and set(np.unique(samples)) <= {0.0, 1.0}
  assert _chi2_pvalue(samples, probs) > 1e-4
  # Negative control: the same samples against another model's probabilities are rejected.
  other = _init(model, dim, seed=5, scale=scale)
  other_probs = np.exp(np.asarray(model.apply(other, jnp.asarray(_all_binary(dim), jnp.float32),
                                              method=model.log_prob), np.float64))
  assert _chi2_pvalue(samples, other_probs / other_probs.sum()) < 1e-6


def _nade_naive(params, x_BD):
  """The definition: D separate one-hidden-layer networks, network d reading only x_<d."""
  w, c, v, b = params["w"], params["c"], params["v"], params["b"]
  logits = []
  for d in range(x_BD.shape[1]):
    h = jax.nn.sigmoid(c + x_BD[:, :d] @ w[:d])
    logits.append(h @ v[d] + b[d])
  return jnp.stack(logits, axis=1)


@pytest.mark.parametrize("chunk", [1, 4, 9, 16])  # 9 = D, 16 > D; 4 leaves a padded last chunk
def test_nade_fast_equals_naive_in_value_and_gradient(chunk):
  """The chunked running sum and its hand-written reverse-order gradient against autodiff of the
  D-network definition, for the parameters and the inputs."""
  with jax.enable_x64(True):
    model = NADE(9, hidden=4)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _init(model, 9)["params"])
    x = jnp.asarray(np.random.default_rng(3).integers(0, 2, (5, 9)), jnp.float64)
    fast = lambda p, x: nade_logits(x, p["w"], p["c"], p["v"], p["b"], chunk=chunk)
    np.testing.assert_allclose(fast(params, x), _nade_naive(params, x), rtol=1e-12, atol=1e-12)
    loss = lambda f: (lambda p, x: jnp.sum(jnp.sin(f(p, x))))
    g_fast = jax.grad(loss(fast), argnums=(0, 1))(params, x)
    g_naive = jax.grad(loss(_nade_naive), argnums=(0, 1))(params, x)
    for key in params:
      np.testing.assert_allclose(g_fast[0][key], g_naive[0][key], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g_fast[1], g_naive[1], rtol=1e-10, atol=1e-12)
    # and log_prob is the sum of the Bernoulli terms of the naive logits
    ref = jnp.sum(x * _nade_naive(params, x) - jax.nn.softplus(_nade_naive(params, x)), axis=1)
    np.testing.assert_allclose(model.apply({"params": params}, x, method=model.log_prob), ref,
                               rtol=1e-12)


def test_nade_rejects_a_bad_chunk():
  with pytest.raises(ValueError, match="chunk"):
    nade_logits(jnp.zeros((1, 3)), jnp.zeros((3, 2)), jnp.zeros(2), jnp.zeros((3, 2)), jnp.zeros(3),
                chunk=0)


@pytest.mark.parametrize("cls", [PixelCNN, GatedPixelCNN])
def test_pixelcnns_refuse_a_first_kernel_that_sees_nothing(cls):
  """A 1x1 first (type A) layer: PixelCNN's sees no pixel at all, the gated one's horizontal stack
  none of the current row (it trained, silently worse, before)."""
  model = cls((3, 3), channels=2, num_layers=1, first_kernel=1)
  with pytest.raises(ValueError, match="first_kernel must be odd and >= 3"):
    model.init(jax.random.key(0), jnp.zeros((1, 9)))


def test_fvsbn_is_one_logistic_regression_per_dimension():
  model = FVSBN(5)
  variables = _init(model, 5)
  w, b = np.asarray(variables["params"]["weight"]), np.asarray(variables["params"]["bias"])
  x = np.random.default_rng(4).integers(0, 2, (3, 5)).astype(np.float32)
  ref = np.stack([x[:, :d] @ w[:d, d] + b[d] for d in range(5)], axis=1)
  np.testing.assert_allclose(model.apply(variables, x), ref, rtol=1e-5, atol=1e-6)


def test_pixelcnn_residual_convolutions_see_their_own_pixel():
  """The residual blocks' 3x3 convolutions are mask B: after the mask-A first layer a feature at
  pixel i already excludes x_i, so the centre tap is allowed and used. Mask A there kept the model
  autoregressive and normalised (every other test passed) while dropping the centre tap."""
  model = PixelCNN(image_shape=(5, 5), channels=4, num_layers=2, first_kernel=3)
  x = jnp.asarray(np.random.default_rng(0).random((3, 25)) < 0.5, jnp.float32)
  params = nn.unbox(model.init(jax.random.key(0), x)["params"])
  grads = jax.grad(lambda p: model.apply({"params": p}, x, method=model.log_prob).sum())(params)
  residual = [g["kernel"] for name, g in grads.items()
              if name != "Conv_0" and g["kernel"].shape[:2] == (3, 3)]
  assert len(residual) == 2
  for g in residual:
    tap = np.abs(np.asarray(g)).sum(axis=(2, 3))  # [3, 3]
    assert tap[1, 1] > 0 and tap[0].min() > 0 and tap[1, 0] > 0  # mask B: above, left, centre
    assert tap[1, 2] == 0 and (tap[2] == 0).all()  # never right of or below the pixel


def test_made_masks_orders_and_ensemble():
  orders, masks, _ = made_masks(10, (12, 12), 4, seed=1)
  assert (orders[0] == np.arange(10)).all()
  assert len({tuple(o) for o in orders}) == 4  # order-agnostic: distinct orderings
  fixed, _, _ = made_masks(10, (12,), 3, seed=1, order_agnostic=False)
  assert (fixed == np.arange(10)).all()
  # connectivity: distinct hidden masks for the same ordering
  _, conn, _ = made_masks(10, (12,), 3, seed=1, order_agnostic=False)
  assert not np.array_equal(conn[0][0], conn[0][1])
  model = MADE(6, hidden=(7,), num_masks=3)
  variables = _init(model, 6)
  x = jnp.asarray(np.random.default_rng(5).integers(0, 2, (4, 6)), jnp.float32)
  per_mask = np.stack([model.apply(variables, x, k, method=model.log_prob) for k in range(3)])
  ensemble = model.apply(variables, x, method=model.log_prob)
  np.testing.assert_allclose(ensemble, np.log(np.mean(np.exp(per_mask), 0)), rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: FVSBN(4), lambda: NADE(4, 3), lambda: MADE(4, (5,)),
                                  lambda: PixelCNN((2, 2), 2, 1, 3),
                                  lambda: GatedPixelCNN((2, 2), 2, 1, 3)])
def test_bad_input_names_x(make):
  model = make()
  variables = _init(model, 4)
  with pytest.raises(ValueError, match="x has 5 dimensions"):
    model.apply(variables, jnp.zeros((2, 5)), method=model.log_prob)
  with pytest.raises(ValueError, match=r"x must have shape \[batch, dim\]"):
    model.apply(variables, jnp.zeros((4,)), method=model.log_prob)


def test_made_samples_in_chunks_are_the_samples_in_one_pass(monkeypatch):
  """With K > 1 each sample has its own masked kernels, so MADE.sample goes through the samples in
  chunks (of 3 here, with a remainder of 1): the same samples as one pass over all 7."""
  from jaxlab.models import made as made_lib
  model = MADE(6, hidden=(7, 5), num_masks=3, direct=True)
  variables = _init(model, 6, seed=3)
  draw = lambda: np.asarray(model.apply(variables, jax.random.PRNGKey(4), 7, method=model.sample))
  whole = draw()
  weights = 6 * 7 + 7 * 5 + 5 * 6 + 6 * 6  # the kernels and the direct matrix
  monkeypatch.setattr(made_lib, "SAMPLE_CHUNK_WEIGHTS", 3 * weights)
  np.testing.assert_array_equal(draw(), whole)
  assert len({tuple(row) for row in whole}) > 1


@pytest.mark.parametrize("dim,hidden", [(10, (4,)), (784, (500,)), (30, (6, 40)), (8, (20,))])
def test_made_fixed_degrees_let_every_input_reach_an_output(dim, hidden):
  """connectivity_agnostic=False spreads the hidden degrees over {low, ..., D-1}: every input but the
  last in the order reaches some output through the network (with degrees 1..H, as before, a layer
  of 500 under D=784 left inputs 500..782 connected to nothing)."""
  _, masks, _ = made_masks(dim, hidden, 1, connectivity_agnostic=False)
  if dim == 8:  # a layer at least as wide as the range keeps the earlier rule (saved masks match)
    from jaxlab.models.made import made_degrees
    np.testing.assert_array_equal(made_degrees(dim, hidden, 1, connectivity_agnostic=False)[2][0][0],
                                  1 + np.arange(hidden[0]) % (dim - 1))
  reach = masks[0][0]
  for m in masks[1:]:
    reach = (reach @ m[0]) > 0
  orders, _, _ = made_masks(dim, hidden, 1)
  last = orders[0][-1]
  reached = reach.any(axis=1)
  assert reached[np.arange(dim) != last].all(), np.flatnonzero(~reached)
  assert not reached[last]


def test_made_refuses_a_mask_index_that_is_not_a_mask_set():
  model = MADE(6, hidden=(7,), num_masks=3)
  variables = _init(model, 6)
  x = jnp.zeros((2, 6))
  for bad in (3, 5, -1):
    with pytest.raises(ValueError, match=f"mask_index={bad} is not one of the 3 mask sets"):
      model.apply(variables, x, bad, method=model.log_prob)
  with pytest.raises(ValueError, match="mask_index must be an integer scalar"):
    model.apply(variables, x, 1.0)
  fn = jax.jit(lambda k: model.apply(variables, x, k, method=model.log_prob))
  np.testing.assert_allclose(fn(2), model.apply(variables, x, 2, method=model.log_prob), rtol=1e-6)


@pytest.mark.parametrize("make", [lambda: FVSBN(4), lambda: NADE(4, 3), lambda: MADE(4, (5,)),
                                  lambda: PixelCNN((2, 2), 2, 1, 3)])
def test_values_other_than_zero_and_one_are_refused(make):
  """Grey levels or 0/255 pixels would be scored as likelihoods (x * l - softplus(l) is unbounded
  in x): a concrete batch with such values is refused, naming x."""
  model = make()
  variables = _init(model, 4)
  for bad in (np.array([[0.0, 1.0, 255.0, 0.0]]), np.array([[0.5, 1.0, 0.0, 0.0]]),
              np.array([[2, 0, 0, 0]])):
    with pytest.raises(ValueError, match="x must hold only 0 and 1: 1 entries do not"):
      model.apply(variables, bad, method=model.log_prob)
  ok = np.array([[0, 1, 1, 0]], bool)
  assert np.isfinite(model.apply(variables, ok, method=model.log_prob)).all()


@pytest.mark.parametrize("dtype,rtol", [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_lower_precision_compute_dtype(name, dtype, rtol):
  """dtype= computes the matmuls / convolutions in bfloat16 or float16 (checked in the jaxpr) while
  the parameters, logits, log-probabilities and gradients stay float32, and the log-probabilities
  are the float32 model's to within the dtype's precision; samples stay exact 0/1 float32."""
  make, dim = MODELS[name]
  model32 = make()
  model = model32.clone(dtype=dtype)
  params = _init(model32, dim, scale=0.5)
  x = jnp.asarray(_all_binary(dim)[::3], jnp.float32)
  lp32 = model32.apply(params, x, method=model32.log_prob)
  lp = model.apply(params, x, method=model.log_prob)
  assert lp.dtype == jnp.float32 and model.apply(params, x).dtype == jnp.float32
  np.testing.assert_allclose(lp, lp32, rtol=rtol)
  assert not np.array_equal(np.asarray(lp), np.asarray(lp32))  # really computed otherwise
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, x, method=model.log_prob))(params))
  low = jnp.dtype(dtype).name.replace("float", "f")  # bf16 / f16
  ops = [line for line in jaxpr.splitlines() if "dot_general" in line or "conv_general" in line]
  assert ops and all(f":{low}[" in line for line in ops), ops
  grads = jax.grad(lambda p: model.apply(p, x, method=model.log_prob).sum())(params)
  assert all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all()
             for g in jax.tree.leaves(grads))
  samples = model.apply(params, jax.random.PRNGKey(0), 5, method=model.sample)
  assert samples.dtype == jnp.float32 and set(np.unique(np.asarray(samples))) <= {0.0, 1.0}
