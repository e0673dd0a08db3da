"""Helpers shared by the attention tests: random inputs, segment ids, jaxpr inspection and a plain
feature-kernel reference."""

import jax.numpy as jnp
import numpy as np


def qkv_inputs(seed, b, tq, tk, n, kh, h, dtype=jnp.float32):
  """q [B, Tq, N, H], k and v [B, Tk, K, H] and an output cotangent [B, Tq, N, H]: standard normals
  drawn in float32 from numpy's generator `seed`, then cast to dtype."""
  rng = np.random.default_rng(seed)
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
  return normal((b, tq, n, h)), normal((b, tk, kh, h)), normal((b, tk, kh, h)), normal((b, tq, n, h))


def segment_ids(b, t, cuts, offset=0):
  """int32 [B, T]: row r starts at `offset` and its id goes up by one at each position of cuts[r]."""
  ids = np.full((b, t), offset, np.int32)
  for row in range(b):
    for c in cuts[row]:
      ids[row, c:] += 1
  return jnp.asarray(ids)


def max_intermediate_size(jaxpr) -> int:
  """Largest number of elements of any equation output, recursing into sub-jaxprs (scan, while, ...)."""
  biggest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          biggest = max(biggest, max_intermediate_size(sub))
  return biggest


def naive_feature_attention(fq, fk, v, causal, eps):
  """NumPy float64 loop over batch and heads: row-normalised fq fk^T (lower-triangular if causal)
  times v; fq [B, T, N, M], fk [B, T, K, M], v [B, T, K, H] (GQA by grouping query heads)."""
  v = np.asarray(v, np.float64)
  b, t, n, _ = fq.shape
  kh, h = v.shape[2], v.shape[3]
  out = np.zeros((b, t, n, h))
  for bi in range(b):
    for ni in range(n):
      ki = ni // (n // kh)
      a = fq[bi, :, ni] @ fk[bi, :, ki].T
      if causal:
        a = np.tril(a)
      out[bi, :, ni] = (a @ v[bi, :, ki]) / (a.sum(-1, keepdims=True) + eps)
  return out
