"""MADE, the masked autoencoder for distribution estimation (Germain, Gregor, Murray & Larochelle, ICML 2015).

A masked MLP x -> logits whose masks remove every path from x_j to output d unless j comes before d in
the ordering (their eq. 12-13): with input degrees m0(d) = position of d in the ordering (1..D),
hidden degrees m_l(k) in {min m_{l-1}, ..., D-1},
    hidden mask  M_l[k', k] = 1[m_l(k) >= m_{l-1}(k')],   output mask  M_V[k, d] = 1[m0(d) > m_L(k)],
and the optional direct input->output connection A[d', d] = 1[m0(d) > m0(d')].
Order-agnostic / connectivity-agnostic training (their Sec. 4.1-4.2): a fixed set of K mask sets
(orderings and/or hidden degrees) is drawn once; each training step uses one of them at random; at test
time log p(x) = log mean_k p_k(x) over all K (an equal mixture of K exact autoregressive models).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.losses.likelihood import (ancestral_sample, at_least_float32, bernoulli_log_prob,
                                      check_binary_batch, in_compute_dtype, log_mean_exp)


SAMPLE_CHUNK_WEIGHTS = 2**26  # MADE.sample with K > 1: masked weights per chunk (256 MiB in float32)


def made_degrees(dim: int, hidden: Sequence[int], num_masks: int, *, seed: int = 0,
                 order_agnostic: bool = True, connectivity_agnostic: bool = True):
  """The fixed set of K mask sets as degrees (integer numpy arrays; masks follow by comparison).

  Returns (orders_KD, input_degrees_KD, hidden_degrees): orders_KD[k] lists the dimensions in
  generation order, input_degrees_KD[k][d] = m0(d) in 1..D, hidden_degrees[l] is [K, hidden[l]].
  Mask set 0 uses the natural order (0..D-1); further ones a random order if `order_agnostic`.
  Hidden degrees are random per mask set if `connectivity_agnostic`, else every degree of
  {low, ..., D-1} in turn (low: the previous layer's smallest degree) when the layer has at least
  that many units, and for a narrower layer degrees spread over the range including both ends (so
  the late inputs still reach the outputs; before 2026-12-04 they took low..low+H-1).
  """
  if dim < 2:
    raise ValueError(f"dim must be >= 2 for MADE, got {dim}")
  if num_masks < 1:
    raise ValueError(f"num_masks must be >= 1, got {num_masks}")
  if any(h < 1 for h in hidden):
    raise ValueError(f"hidden sizes must be positive, got {tuple(hidden)}")
  rng = np.random.default_rng(seed)
  orders, inputs, hiddens = [], [], [[] for _ in hidden]
  for k in range(num_masks):
    order = rng.permutation(dim) if (order_agnostic and k > 0) else np.arange(dim)
    m0 = np.empty(dim, np.int32)
    m0[order] = np.arange(1, dim + 1)
    low = int(m0.min())
    for l, h in enumerate(hidden):
      if connectivity_agnostic:
        deg = rng.integers(low, dim, size=h)  # uniform on {low, ..., D-1}
      else:
        span = dim - low
        deg = (low + np.arange(h) % span if h >= span
               else np.round(np.linspace(low, dim - 1, h)).astype(np.int64))
      hiddens[l].append(deg.astype(np.int32))
      low = int(deg.min())
    orders.append(order)
    inputs.append(m0)
  return np.stack(orders), np.stack(inputs), [np.stack(h) for h in hiddens]


def masks_from_degrees(input_degrees_D, hidden_degrees):
  """One mask set's masks from its degrees (numpy or jax arrays, e.g. under a trace): a bool
  [in_l, out_l] per hidden layer and the output layer (eq. 12-13), and the direct mask [D, D]."""
  masks, prev = [], input_degrees_D
  for deg in hidden_degrees:
    masks.append(deg[None, :] >= prev[:, None])
    prev = deg
  masks.append(input_degrees_D[None, :] > prev[:, None])
  return masks, input_degrees_D[None, :] > input_degrees_D[:, None]


def made_masks(dim: int, hidden: Sequence[int], num_masks: int, *, seed: int = 0,
               order_agnostic: bool = True, connectivity_agnostic: bool = True):
  """The fixed set of K mask sets, as numpy arrays (what MADE builds from `made_degrees`).

  Returns (orders_KD, masks, direct_KDD): orders_KD[k] lists the dimensions in generation order;
  masks[l] is float [K, in_l, out_l] for each hidden layer and the output layer; direct_KDD[k][j, d].
  """
  orders, inputs, hiddens = made_degrees(dim, hidden, num_masks, seed=seed,
                                         order_agnostic=order_agnostic,
                                         connectivity_agnostic=connectivity_agnostic)
  sets = [masks_from_degrees(inputs[k], [h[k] for h in hiddens]) for k in range(num_masks)]
  masks = [np.stack([m[l] for m, _ in sets]).astype(np.float32) for l in range(len(hidden) + 1)]
  return orders, masks, np.stack([d for _, d in sets]).astype(np.float32)


def made_logits(x_BD: jax.Array, kernels, biases, masks, direct_DD: jax.Array | None = None,
                direct_mask_DD: jax.Array | None = None) -> jax.Array:
  """Masked MLP with ReLU hidden layers: [B, D] -> logits [B, D] (one mask set: masks[l] is [in, out])."""
  h = x_BD
  for l, (w, b, m) in enumerate(zip(kernels, biases, masks)):
    h = h @ (w * m) + b
    if l < len(kernels) - 1:
      h = jax.nn.relu(h)
  if direct_DD is not None:
    h = h + x_BD @ (direct_DD * direct_mask_DD)
  return h


class MADE(nn.Module):
  """MADE on D binary dimensions: `hidden` layer sizes, K = `num_masks` fixed mask sets. dtype: the
  compute dtype (None: the parameters'; they stay float32; logits and log-probabilities: float32 at
  least)."""

  dim: int
  hidden: Sequence[int] = (500,)
  num_masks: int = 1
  order_agnostic: bool = True
  connectivity_agnostic: bool = True
  direct: bool = False
  mask_seed: int = 0
  dtype: Any = None

  def setup(self):
    # Degrees, not masks, are the program's constants: K x (D + sum(hidden)) int32 instead of
    # K dense [in, out] masks (at K=32, 8000 hidden units: 9 GiB of constants in the HLO).
    orders, inputs, hiddens = made_degrees(self.dim, tuple(self.hidden), self.num_masks,
                                           seed=self.mask_seed, order_agnostic=self.order_agnostic,
                                           connectivity_agnostic=self.connectivity_agnostic)
    self.orders = jnp.asarray(orders)
    self.input_degrees = jnp.asarray(inputs)
    self.hidden_degrees = [jnp.asarray(h) for h in hiddens]
    sizes = (self.dim, *self.hidden, self.dim)
    # Logical axes: pixels "embed", hidden units "mlp" (a hidden-to-hidden kernel names only its
    # output side, as one mesh axis cannot shard two dimensions of an array).
    axes = ("embed", *(["mlp"] * len(self.hidden)), "embed")
    partitioned = nn.with_logical_partitioning
    self.kernels = [self.param(f"kernel_{l}", partitioned(nn.initializers.lecun_normal(),
                                                          (axes[l] if axes[l] != axes[l + 1] else
                                                           None, axes[l + 1])), (a, b))
                    for l, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    self.biases = [self.param(f"bias_{l}", partitioned(nn.initializers.zeros, (axes[l + 1],)), (b,))
                   for l, b in enumerate(sizes[1:])]
    if self.direct:
      self.direct_kernel = self.param("direct", partitioned(nn.initializers.zeros, ("embed", None)),
                                      (self.dim, self.dim))

  def _logits_fn(self):
    """(x_BD, k) -> logits under mask set k, as a pure closure over the parameters (safe to use under
    jax transforms: every variable is read here, outside them)."""
    cast = lambda p: in_compute_dtype(p, self.dtype)
    kernels, biases = [cast(w) for w in self.kernels], [cast(b) for b in self.biases]
    direct = cast(self.direct_kernel) if self.direct else None
    inputs, hiddens = self.input_degrees, list(self.hidden_degrees)
    dt = kernels[0].dtype

    def logits(x_BD, k):
      masks, direct_mask = masks_from_degrees(inputs[k], [h[k] for h in hiddens])
      masks = [m.astype(dt) for m in masks]
      x_BD = x_BD.astype(dt)
      if direct is None:
        return at_least_float32(made_logits(x_BD, kernels, biases, masks))
      return at_least_float32(made_logits(x_BD, kernels, biases, masks, direct,
                                          direct_mask.astype(dt)))
    return logits

  def _logits(self, x_BD: jax.Array, mask_index) -> jax.Array:
    return self._logits_fn()(x_BD, self._checked_mask_index(mask_index))

  def _checked_mask_index(self, mask_index):
    """A concrete mask index must be one of 0..K-1 (indexing would clamp 5 to K-1 and wrap -1);
    a traced one (the trainer's randint over [0, K)) passes as it is."""
    if isinstance(mask_index, jax.core.Tracer):
      return mask_index
    value = np.asarray(mask_index)
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
      raise ValueError(f"mask_index must be an integer scalar, got {mask_index!r}")
    if not 0 <= int(value) < self.num_masks:
      raise ValueError(f"mask_index={int(value)} is not one of the {self.num_masks} mask sets "
                       f"(0..{self.num_masks - 1})")
    return mask_index

  def __call__(self, x_BD: jax.Array, mask_index=0) -> jax.Array:
    """Conditional logits [B, D] under mask set `mask_index` (an int or int scalar array)."""
    x_BD = check_binary_batch(x_BD, "x", self.dim)
    return self._logits(x_BD, mask_index)

  def log_prob(self, x_BD: jax.Array, mask_index=None) -> jax.Array:
    """log p(x) in nats per example, [B, D] -> [B]: under one mask set, or (None) the log-mean-exp
    over all K mask sets, the paper's test-time ensemble."""
    x_BD = check_binary_batch(x_BD, "x", self.dim)
    if mask_index is not None:
      return bernoulli_log_prob(x_BD, self._logits(x_BD, mask_index))
    logits = self._logits_fn()
    per_mask_KB = jax.lax.map(lambda k: bernoulli_log_prob(x_BD, logits(x_BD, k)),
                              jnp.arange(self.num_masks))
    return log_mean_exp(per_mask_KB, axis=0)

  def sample(self, key: jax.Array, n: int) -> jax.Array:
    """n exact samples of the K-mixture: a mask set uniformly per sample, then its ordering. [n, D]."""
    key_k, key_x = jax.random.split(key)
    k_N = jax.random.randint(key_k, (n,), 0, self.num_masks)
    logits = self._logits_fn()

    if self.num_masks == 1:
      return ancestral_sample(lambda x_ND: logits(x_ND, 0), key_x, self.orders[k_N])
    # Each sample under its own mask set: a masked copy of every kernel per sample, so the samples
    # go through in chunks of about SAMPLE_CHUNK_WEIGHTS masked weights (each copy also holds its
    # mask for a while: peak a small multiple of that).
    weights = sum(int(np.prod(w.shape)) for w in self.kernels) + self.direct * self.dim ** 2
    chunk = int(max(1, min(n, SAMPLE_CHUNK_WEIGHTS // weights)))
    one = lambda x_D_k: logits(x_D_k[0][None], x_D_k[1])[0]
    return ancestral_sample(lambda x_ND: jax.lax.map(one, (x_ND, k_N), batch_size=chunk), key_x,
                            self.orders[k_N])
