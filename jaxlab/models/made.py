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

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.losses.likelihood import (ancestral_sample, bernoulli_log_prob, check_binary_batch,
                                      log_mean_exp)


def made_masks(dim: int, hidden: Sequence[int], num_masks: int, *, seed: int = 0,
               order_agnostic: bool = True, connectivity_agnostic: bool = True):
  """The fixed set of K mask sets, as numpy arrays.

  Returns (orders_KD, masks, direct_KDD): orders_KD[k] lists the dimensions in generation order;
  masks[l] is float [K, in_l, out_l] for each hidden layer and the output layer; direct_KDD[k][j, d].
  Mask set 0 uses the natural order (0..D-1); further ones a random order if `order_agnostic`.
  Hidden degrees are random per mask set if `connectivity_agnostic`, else evenly spread.
  """
  if dim < 2:
    raise ValueError(f"dim must be >= 2 for MADE, got {dim}")
  if num_masks < 1:
    raise ValueError(f"num_masks must be >= 1, got {num_masks}")
  if any(h < 1 for h in hidden):
    raise ValueError(f"hidden sizes must be positive, got {tuple(hidden)}")
  rng = np.random.default_rng(seed)
  orders, layer_masks, directs = [], [[] for _ in range(len(hidden) + 1)], []
  for k in range(num_masks):
    order = rng.permutation(dim) if (order_agnostic and k > 0) else np.arange(dim)
    m0 = np.empty(dim, np.int64)
    m0[order] = np.arange(1, dim + 1)
    prev = m0
    for l, h in enumerate(hidden):
      low = int(prev.min())
      if connectivity_agnostic:
        deg = rng.integers(low, dim, size=h)  # uniform on {low, ..., D-1}
      else:
        deg = low + np.arange(h) % (dim - low)
      layer_masks[l].append((deg[None, :] >= prev[:, None]).astype(np.float32))
      prev = deg
    layer_masks[-1].append((m0[None, :] > prev[:, None]).astype(np.float32))
    directs.append((m0[None, :] > m0[:, None]).astype(np.float32))
    orders.append(order)
  return (np.stack(orders), [np.stack(m) for m in layer_masks], np.stack(directs))


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
  """MADE on D binary dimensions: `hidden` layer sizes, K = `num_masks` fixed mask sets."""

  dim: int
  hidden: Sequence[int] = (500,)
  num_masks: int = 1
  order_agnostic: bool = True
  connectivity_agnostic: bool = True
  direct: bool = False
  mask_seed: int = 0

  def setup(self):
    orders, masks, direct = made_masks(self.dim, tuple(self.hidden), self.num_masks,
                                       seed=self.mask_seed, order_agnostic=self.order_agnostic,
                                       connectivity_agnostic=self.connectivity_agnostic)
    self.orders = jnp.asarray(orders)
    self.masks = [jnp.asarray(m) for m in masks]
    self.direct_masks = jnp.asarray(direct)
    sizes = (self.dim, *self.hidden, self.dim)
    self.kernels = [self.param(f"kernel_{l}", nn.initializers.lecun_normal(), (a, b))
                    for l, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    self.biases = [self.param(f"bias_{l}", nn.initializers.zeros, (b,))
                   for l, b in enumerate(sizes[1:])]
    if self.direct:
      self.direct_kernel = self.param("direct", nn.initializers.zeros, (self.dim, self.dim))

  def _logits_fn(self):
    """(x_BD, k) -> logits under mask set k, as a pure closure over the parameters (safe to use under
    jax transforms: every variable is read here, outside them)."""
    kernels, biases, masks = list(self.kernels), list(self.biases), list(self.masks)
    direct = self.direct_kernel if self.direct else None
    direct_masks = self.direct_masks

    def logits(x_BD, k):
      mk = [m[k] for m in masks]
      if direct is None:
        return made_logits(x_BD, kernels, biases, mk)
      return made_logits(x_BD, kernels, biases, mk, direct, direct_masks[k])
    return logits

  def _logits(self, x_BD: jax.Array, mask_index) -> jax.Array:
    return self._logits_fn()(x_BD, mask_index)

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
    one = lambda x_D, k: logits(x_D[None], k)[0]
    return ancestral_sample(lambda x_ND: jax.vmap(one)(x_ND, k_N), key_x, self.orders[k_N])
