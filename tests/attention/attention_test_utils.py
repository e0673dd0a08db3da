"""Helpers shared by the attention tests: jaxpr inspection and a plain feature-kernel reference."""

import numpy as np


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
