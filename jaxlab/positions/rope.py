"""Rotary position embedding (RoPE) with context-extension scalings, partial and 2-D variants.

References:
  Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", eq. (34): the
    rotation of feature pairs by angle m * theta_i, theta_i = base^(-2i/d), i = 0 .. d/2 - 1.
  Chen et al. 2023, "Extending Context Window of Large Language Models via Positional Interpolation"
    (PI): f'(x, m) = f(x, m L / L'), i.e. positions divided by the factor s = L'/L.
  bloc97 2023, "NTK-Aware Scaled RoPE" (also YaRN paper, sec. 3.1): base' = base * s^(d/(d-2)).
  Dynamic NTK as in Hugging Face transformers `_compute_dynamic_ntk_parameters`:
    base' = base * (s * L / L_train - (s - 1))^(d/(d-2)) for the current length L > L_train.
  Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models": sec. 3.2
    ("NTK-by-parts": r(d) = L/lambda_d, ramp gamma(r), h(theta_d) = (1-gamma) theta_d/s + gamma theta_d)
    and sec. 3.4 (attention temperature sqrt(1/t) = 0.1 ln(s) + 1).
  Heo et al. 2024, "Rotary Position Embedding for Vision Transformer" (axial 2-D RoPE).

Layout: x is [B, T, N, H] (batch, length, heads, head_dim); positions are explicit [B, T] numbers, so
packed segments (positions restarting at 0) and decoding offsets need nothing special.

Pairing convention ("rotate-half", GPT-NeoX / LLaMA-HF): with R rotary dims, feature i is paired with
feature i + R/2 (i < R/2) and that pair is rotated by angle position * inv_freq[i]. This is the
interleaved RoFormer convention (pairs 2i, 2i+1) up to a fixed permutation of the head dims, which
q and k share, so attention logits are identical. Partial rotary (`rotary_fraction` < 1) rotates the
first R = rotary_dim(H, rotary_fraction) dims this way and passes dims R .. H-1 through unchanged (GPT-NeoX).

Numerics: angles and rotations are computed in float32 whatever x's dtype; the result is cast back to
x.dtype. Float32 angles lose absolute precision for very large positions (~1e6), as in every common
implementation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.positions import _checks

SCALING_KINDS = ("linear", "ntk", "dynamic_ntk", "yarn")
_KIND_ALIASES = {"dynamic": "dynamic_ntk", "pi": "linear", "ntk_aware": "ntk"}
_KEY_ALIASES = {"type": "kind", "rope_type": "kind",
                "original_max_position_embeddings": "original_max_len"}
YARN_RAMPS = ("paper", "reference")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How to stretch RoPE beyond the training length (frozen, hashable: usable as a jit static arg).

  Attributes:
    kind: one of
      "linear": Position Interpolation (Chen et al. 2023): angles use positions / factor.
      "ntk": NTK-aware (bloc97 2023): base theta' = theta * factor^(R / (R - 2)), R = rotary dims.
        The highest frequency (i = 0) is unchanged and the lowest is divided by exactly `factor`.
      "dynamic_ntk": NTK-aware with a factor that follows the current length L (Hugging Face
        formula): alpha = max(1, factor * L / original_max_len - (factor - 1)),
        theta' = theta * alpha^(R / (R - 2)). Equal to plain RoPE while L <= original_max_len.
        L is `seq_len` when given to `apply_rope` (per row or per token), else max(positions[b]) + 1
        for each row b. Every token of a row is rotated with the same L, so beyond L_train the
        rotation of position t depends on the total length, not only on t; with a KV cache, keys
        keep the L they were cached with (Hugging Face convention, see
        `jaxlab.layers.MultiHeadAttention`), so cached decoding differs from a full pass there.
      "yarn": YaRN (Peng et al. 2023, sec. 3.2): for pair i, with wavelength
        lambda_i = 2 pi / inv_freq_i and r_i = original_max_len / lambda_i,
        gamma_i = clip((r_i - beta_slow) / (beta_fast - beta_slow), 0, 1) and
        inv_freq'_i = (1 - gamma_i) * inv_freq_i / factor + gamma_i * inv_freq_i.
        High frequencies (r_i >= beta_fast) are left alone, low ones (r_i <= beta_slow) are
        interpolated as in PI. The attention temperature is NOT applied here: multiply q and k
        (or the logits by its square) by `yarn_attention_factor(factor)`.
    factor: the scale s = L_new / L_train >= 1. factor == 1 gives plain RoPE for every kind (except
      "dynamic_ntk" beyond original_max_len, where it gives alpha = L / original_max_len).
    original_max_len: L_train, required by "dynamic_ntk" and "yarn".
    beta_fast, beta_slow: YaRN's beta and alpha (paper defaults 32 and 1, for LLaMA). They and
      yarn_ramp are YaRN's alone: another kind refuses values other than their defaults.
    yarn_ramp: "paper" (default) is the continuous ramp gamma(r) linear in r, as written in the
      paper. "reference" reproduces the released code (jquesnelle/yarn, Hugging Face with
      truncate=True): the ramp is linear in the pair index i between floor(i(beta_fast)) and
      ceil(i(beta_slow)), i(b) = R * ln(L_train / (2 pi b)) / (2 ln theta), clipped to [0, R-1];
      use it to reproduce checkpoints trained with that code.

  A dict is accepted wherever a RopeScaling is, e.g. {"kind": "yarn", "factor": 4, "original_max_len":
  4096}; Hugging Face keys "type"/"rope_type", "original_max_position_embeddings" and kind names
  "dynamic" are understood, and a dict whose kind is given as "type"/"rope_type" (a Hugging Face
  rope_scaling) gets yarn_ramp="reference" unless it says otherwise (HF's YaRN is the released
  code's). Unknown keys raise ValueError.
  """

  kind: str
  factor: float
  original_max_len: Optional[int] = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  yarn_ramp: str = "paper"

  def __post_init__(self):
    if not isinstance(self.kind, str):
      raise ValueError(f"scaling kind must be a string, got {self.kind!r}")
    kind = _KIND_ALIASES.get(self.kind, self.kind)
    if kind not in SCALING_KINDS:
      raise ValueError(f"scaling kind must be one of {SCALING_KINDS}, got {self.kind!r}")
    object.__setattr__(self, "kind", kind)
    try:
      factor = _checks.static_number(self.factor)
    except TypeError as e:
      raise ValueError(f"scaling factor must be a number >= 1, got {self.factor!r}") from e
    if factor is None or not math.isfinite(factor) or factor < 1.0:
      raise ValueError(f"scaling factor must be a finite static number >= 1, got {self.factor!r}")
    object.__setattr__(self, "factor", factor)
    if kind in ("dynamic_ntk", "yarn"):
      if self.original_max_len is None:
        raise ValueError(f"scaling original_max_len (the training length) is required for {kind!r}")
    if self.original_max_len is not None:
      _checks.positive_int(self.original_max_len, "scaling original_max_len")
    for name in ("beta_fast", "beta_slow"):
      _checks.positive_number(getattr(self, name), f"scaling {name}")
    if kind == "yarn" and not float(self.beta_fast) > float(self.beta_slow):
      raise ValueError(f"scaling beta_fast must exceed beta_slow, got {self.beta_fast} <= {self.beta_slow}")
    if self.yarn_ramp not in YARN_RAMPS:
      raise ValueError(f"scaling yarn_ramp must be one of {YARN_RAMPS}, got {self.yarn_ramp!r}")
    if kind != "yarn":  # YaRN's own options would be silently ignored by another kind
      for name in ("beta_fast", "beta_slow", "yarn_ramp"):
        default = next(f.default for f in dataclasses.fields(self) if f.name == name)
        if getattr(self, name) != default:
          raise ValueError(f"scaling {name}={getattr(self, name)!r} applies to kind 'yarn' only; "
                           f"kind {kind!r} would ignore it")


ScalingLike = Union[None, RopeScaling, Mapping[str, Any]]


def as_rope_scaling(scaling: ScalingLike) -> Optional[RopeScaling]:
  """None, a RopeScaling, or a dict (see RopeScaling) -> Optional[RopeScaling]; ValueError otherwise."""
  if scaling is None or isinstance(scaling, RopeScaling):
    return scaling
  if isinstance(scaling, Mapping):
    kwargs = {}
    for key, value in scaling.items():
      key = _KEY_ALIASES.get(key, key)
      if key not in {f.name for f in dataclasses.fields(RopeScaling)}:
        raise ValueError(f"scaling has an unknown key {key!r}; known keys: "
                         f"{[f.name for f in dataclasses.fields(RopeScaling)]}")
      kwargs[key] = value
    if "kind" not in kwargs or "factor" not in kwargs:
      raise ValueError(f"scaling needs at least 'kind' and 'factor', got {dict(scaling)}")
    if ({"type", "rope_type"} & set(scaling) and "yarn_ramp" not in kwargs
        and _KIND_ALIASES.get(kwargs["kind"], kwargs["kind"]) == "yarn"):
      kwargs["yarn_ramp"] = "reference"  # a Hugging Face config: its checkpoints used HF's ramp
    return RopeScaling(**kwargs)
  raise ValueError(f"scaling must be None, a RopeScaling or a dict, got {type(scaling).__name__}")


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
  """Inverse frequencies theta^(-2i/d), i = 0 .. d/2-1, shape [head_dim // 2] (RoFormer sec. 3.2.2)."""
  _checks.positive_int(head_dim, "head_dim", minimum=2)
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  _checks.positive_number(theta, "theta")  # (0 or a negative theta gave NaN or an empty table)
  t = _checks.static_number(theta)
  if t is None:  # traced theta
    return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  # Static theta: computed in float64 and rounded once, so the table is the same bits in every
  # context (eager, jitted, constant-folded) and for every scaling that leaves it unchanged.
  return jnp.asarray(t ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim), jnp.float32)


def yarn_attention_factor(factor: float) -> float:
  """YaRN's sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023, sec. 3.4, eq. for the temperature t).

  Multiply both q and k by it (so the logits are multiplied by 1/t). Returns 1.0 for factor <= 1 (as
  the Hugging Face implementation does; no extension, no temperature). factor: a static number > 0.
  """
  s = _checks.positive_number(factor, "factor")
  s = float(s)
  return 1.0 if s <= 1.0 else 0.1 * math.log(s) + 1.0


def yarn_ramp(rotary_dim: int, *, theta: float, original_max_len: int, beta_fast: float = 32.0,
              beta_slow: float = 1.0, kind: str = "paper") -> np.ndarray:
  """YaRN's gamma_i in [0, 1] for each rotary pair i, shape [rotary_dim // 2] (float64 NumPy).

  gamma = 1 keeps the original frequency (extrapolation), gamma = 0 divides it by the factor
  (interpolation). `kind` is "paper" or "reference" (see RopeScaling.yarn_ramp).
  """
  r = _checks.positive_int(rotary_dim, "rotary_dim", minimum=2)
  _checks.positive_number(theta, "theta", minimum_exclusive=1.0)
  _checks.positive_int(original_max_len, "original_max_len")
  _checks.positive_number(beta_slow, "beta_slow")
  _checks.positive_number(beta_fast, "beta_fast", minimum_exclusive=float(beta_slow))
  i = np.arange(r // 2, dtype=np.float64)
  if kind == "paper":
    wavelength = 2.0 * math.pi * float(theta) ** (2.0 * i / r)
    ratio = original_max_len / wavelength
    return np.clip((ratio - beta_slow) / (beta_fast - beta_slow), 0.0, 1.0)
  if kind == "reference":
    def correction_dim(num_rotations):
      return (r * math.log(original_max_len / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))
    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), r - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((i - low) / (high - low), 0.0, 1.0)
    return 1.0 - ramp
  raise ValueError(f"kind must be one of {YARN_RAMPS}, got {kind!r}")


def rotary_dim(head_dim: int, rotary_fraction: Any) -> int:
  """R, the number of rotated dims: int(head_dim * rotary_fraction) as Hugging Face, except that an
  odd result a hair below an even number is that number (100 * 0.58 = 57.999...: 58, not 57).
  ValueError unless R is even and >= 2."""
  try:
    frac = _checks.static_number(rotary_fraction)
  except TypeError as e:
    raise ValueError(f"rotary_fraction must be a number in (0, 1], got {rotary_fraction!r}") from e
  if frac is None or not 0.0 < frac <= 1.0:
    raise ValueError(f"rotary_fraction must be a static number in (0, 1], got {rotary_fraction!r}")
  dims = head_dim * frac
  r = int(dims)
  if r % 2 and abs(dims - round(dims)) < 1e-9:
    r = round(dims)
  if r < 2 or r % 2:
    raise ValueError(f"rotary_fraction * head_dim must give an even number of rotary dims >= 2, got "
                     f"{head_dim} * {frac} -> {r}")
  return r


def _ntk_exponent(rotary_dim: int, kind: str) -> float:
  if rotary_dim <= 2:
    raise ValueError(f"{kind!r} scaling needs more than 2 rotary dims (exponent d/(d-2)), got {rotary_dim}")
  return rotary_dim / (rotary_dim - 2)


def _static_theta(theta: Any) -> Optional[float]:
  """theta as a Python float (checked > 0), or None when traced."""
  _checks.positive_number(theta, "theta")
  v = _checks.static_number(theta)
  return None if v is None else float(v)


def _validate_angles_args(rotary_dim, theta, scaling, seq_len):
  r = _checks.positive_int(rotary_dim, "rotary_dim", minimum=2)
  if r % 2:
    raise ValueError(f"rotary_dim must be even, got {r}")
  theta_static = _static_theta(theta)
  scaling = as_rope_scaling(scaling)
  if seq_len is not None and (scaling is None or scaling.kind != "dynamic_ntk"):
    raise ValueError("seq_len is only used by 'dynamic_ntk' scaling; leave it None otherwise")
  if scaling is not None:
    if scaling.kind in ("ntk", "dynamic_ntk"):
      _ntk_exponent(r, scaling.kind)
    if scaling.kind == "yarn" and (theta_static is None or theta_static <= 1.0):
      raise ValueError(f"theta must be a static number > 1 for 'yarn' scaling, got {theta!r}")
  return r, theta_static, scaling


def _check_seq_len(seq_len: Any, batch: int, length: int) -> Optional[jax.Array]:
  if seq_len is None:
    return None
  arr = _checks.real_array(seq_len, "seq_len")
  if arr.shape not in ((), (batch,), (batch, length)):
    raise ValueError(f"seq_len must be a scalar or have shape ({batch},) or ({batch}, {length}), got "
                     f"{tuple(arr.shape)}")
  return arr


def _angles(pos: jax.Array, seq_len: Optional[jax.Array], theta: Any, r: int,
            scaling: Optional[RopeScaling]) -> jax.Array:
  """Unchecked core of rope_angles: pos [B, T] -> float32 [B, T, r/2]."""
  pos = pos.astype(jnp.float32)
  if scaling is None:
    return pos[:, :, None] * rope_frequencies(r, theta)
  s = scaling.factor
  if scaling.kind == "linear":
    return (pos / s)[:, :, None] * rope_frequencies(r, theta)
  if scaling.kind == "ntk":
    return pos[:, :, None] * rope_frequencies(r, theta * s ** _ntk_exponent(r, "ntk"))
  if scaling.kind == "yarn":
    gamma = yarn_ramp(r, theta=float(theta), original_max_len=scaling.original_max_len,
                      beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow, kind=scaling.yarn_ramp)
    inv = float(theta) ** (-np.arange(0, r, 2, dtype=np.float64) / r)
    inv = (1.0 - gamma) * (inv / s) + gamma * inv  # float64; gamma == 1 gives inv exactly
    return pos[:, :, None] * jnp.asarray(inv, jnp.float32)
  # dynamic_ntk: the length L of each row ([B, 1]) or token ([B, T]), then alpha and the base.
  if seq_len is not None:
    seq_len = jnp.asarray(seq_len, jnp.float32)
    seq_len = seq_len.reshape(seq_len.shape + (1,) * (2 - seq_len.ndim))  # () -> [1, 1], [B] -> [B, 1]
    seq_len = jnp.broadcast_to(seq_len, (pos.shape[0], seq_len.shape[1]))
  else:
    if pos.shape[1]:
      seq_len = jnp.max(pos, axis=1, keepdims=True) + 1.0
    else:
      seq_len = jnp.zeros((pos.shape[0], 1), jnp.float32)
  alpha = jnp.maximum(1.0, s * seq_len / scaling.original_max_len - (s - 1.0))  # [B, 1|T]
  base = theta * alpha ** _ntk_exponent(r, "dynamic_ntk")
  inv = base[..., None] ** (-jnp.arange(0, r, 2, dtype=jnp.float32) / r)  # [B, 1|T, R/2]
  # Lengths within the training length get exactly the plain frequencies (not a re-rounded power).
  # (Compared on L, not alpha: XLA may turn / L_train into * (1 / L_train), making alpha 1 + 1 ulp.)
  inv = jnp.where(seq_len[..., None] <= scaling.original_max_len, rope_frequencies(r, theta), inv)
  return pos[:, :, None] * inv


_angles_jit = jax.jit(_angles, static_argnums=(2, 3, 4))


def _rotate_half_f32(x: jax.Array, angles_BTR: jax.Array, r: int) -> jax.Array:
  """Rotates pairs (i, i + r/2) of the first r dims of x [B, T, N, H] by angles [B, T, r/2]; float32."""
  xf = x.astype(jnp.float32)
  x1, x2, rest = xf[..., : r // 2], xf[..., r // 2: r], xf[..., r:]
  cos = jnp.cos(angles_BTR)[:, :, None, :]
  sin = jnp.sin(angles_BTR)[:, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def _rotate_complex_f32(x: jax.Array, angles_BTR: jax.Array, r: int) -> jax.Array:
  xf = x.astype(jnp.float32)
  z = jax.lax.complex(xf[..., : r // 2], xf[..., r // 2: r])
  z = z * jnp.exp(1j * angles_BTR[:, :, None, :].astype(jnp.complex64))
  return jnp.concatenate([jnp.real(z), jnp.imag(z), xf[..., r:]], axis=-1)


def _rope_core(x, pos, seq_len, theta, *, r, scaling, form):
  angles = _angles(pos, seq_len, theta, r, scaling)
  rotate = _rotate_half_f32 if form == "half" else _rotate_complex_f32
  return rotate(x, angles, r).astype(x.dtype)


# One compiled program per (shapes, static config) instead of one per primitive when called eagerly;
# inside an outer jit it is simply inlined.
_rope_core_jit = jax.jit(_rope_core, static_argnames=("theta", "r", "scaling", "form"))


def _rope(x, positions, theta, scaling, rotary_fraction, seq_len, form):
  _checks.bhtd(x, "x")
  pos = _checks.positions_of_shape(positions, x.shape[:2], "positions")
  r = rotary_dim(x.shape[-1], rotary_fraction)
  r, theta_static, scaling = _validate_angles_args(r, theta, scaling, seq_len)
  seq_len = _check_seq_len(seq_len, x.shape[0], x.shape[1])
  if theta_static is None:  # traced theta: run unjitted (still correct, just not cached)
    return _rope_core(x, pos, seq_len, theta, r=r, scaling=scaling, form=form)
  return _rope_core_jit(x, pos, seq_len, theta=theta_static, r=r, scaling=scaling, form=form)


def rope_angles(positions: jax.Array, rotary_dim: int, *, theta: float = 10000.0,
                scaling: ScalingLike = None, seq_len: Any = None) -> jax.Array:
  """Rotation angles [B, T, rotary_dim // 2] (float32) for positions [B, T] under a scaling.

  angles[b, t, i] = positions[b, t] * inv_freq_i with the (possibly scaled) inverse frequencies of
  RopeScaling ("linear" divides the positions instead). seq_len (only used by "dynamic_ntk"): an int,
  a [B] array with the current length L of each row, or a [B, T] array with one L per token (e.g. the
  length of each token's packed segment); None uses max(positions[b]) + 1. With a KV cache, L is the
  total length so far (cache included).
  """
  pos = _checks.real_array(positions, "positions")
  if pos.ndim != 2:
    raise ValueError(f"positions must be [batch, length], got shape {tuple(pos.shape)}")
  r, theta_static, scaling = _validate_angles_args(rotary_dim, theta, scaling, seq_len)
  seq_len = _check_seq_len(seq_len, pos.shape[0], pos.shape[1])
  if theta_static is None:
    return _angles(pos, seq_len, theta, r, scaling)
  return _angles_jit(pos, seq_len, theta_static, r, scaling)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0,
               scaling: ScalingLike = None, rotary_fraction: float = 1.0,
               seq_len: Any = None) -> jax.Array:
  """RoPE (RoFormer eq. 34), rotate-half form: x [B, T, N, H], positions [B, T] -> [B, T, N, H].

  Pair (x[..., i], x[..., i + R/2]), i < R/2, is rotated by angle positions[b, t] * inv_freq_i, with
  R = rotary_dim(H, rotary_fraction) rotary dims and inv_freq_i = theta^(-2i/R) (then scaled by
  `scaling`, see RopeScaling); dims R .. H-1 pass through. seq_len: for "dynamic_ntk" only (see
  rope_angles). Computes in float32 and returns x.dtype. With scaling=None and rotary_fraction=1 this
  is plain RoPE.
  """
  return _rope(x, positions, theta, scaling, rotary_fraction, seq_len, "half")


def apply_rope_complex(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0,
                       scaling: ScalingLike = None, rotary_fraction: float = 1.0,
                       seq_len: Any = None) -> jax.Array:
  """Reference form of `apply_rope` in complex arithmetic (RoFormer sec. 3.2.1: f(x, m) = x e^{i m theta}).

  The pair (x[..., i], x[..., i + R/2]) is read as z_i = x_i + 1j * x_{i+R/2} and multiplied by
  exp(1j * angle_i); same arguments, shapes and result as `apply_rope`. Slower; meant for tests.
  """
  return _rope(x, positions, theta, scaling, rotary_fraction, seq_len, "complex")


def apply_rope_2d(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0,
                  scaling: ScalingLike = None, rotary_fraction: float = 1.0) -> jax.Array:
  """Axial 2-D RoPE (Heo et al. 2024, "RoPE-Axial"): x [B, T, N, H], positions [B, T, 2] (row, col).

  With R = rotary_dim(H, rotary_fraction) rotary dims (R % 4 == 0): dims [0, R/2) get 1-D RoPE of head
  dim R/2 with the row positions[..., 0], dims [R/2, R) get 1-D RoPE of head dim R/2 with the column
  positions[..., 1] (each with inv_freq_i = theta^(-2i/(R/2)) and the same `scaling`; "dynamic_ntk"
  takes each axis's own max + 1 as its length), dims R .. H-1 pass through. So q.k depends only on
  the (row, col) offset. Returns x.dtype.
  """
  _checks.bhtd(x, "x")
  pos = _checks.positions_of_shape(positions, (*x.shape[:2], 2), "positions")
  r = rotary_dim(x.shape[-1], rotary_fraction)
  if r % 4:
    raise ValueError(f"2-D RoPE needs the number of rotary dims divisible by 4, got {r}")
  _, theta_static, scaling = _validate_angles_args(r // 2, theta, scaling, None)
  if theta_static is None:
    return _rope_2d_core(x, pos, theta, r=r, scaling=scaling)
  return _rope_2d_core_jit(x, pos, theta=theta_static, r=r, scaling=scaling)


def _rope_2d_core(x, pos, theta, *, r, scaling):
  h = r // 2
  row = _rotate_half_f32(x[..., :h], _angles(pos[..., 0], None, theta, h, scaling), h)
  col = _rotate_half_f32(x[..., h:r], _angles(pos[..., 1], None, theta, h, scaling), h)
  return jnp.concatenate([row, col, x[..., r:].astype(jnp.float32)], axis=-1).astype(x.dtype)


_rope_2d_core_jit = jax.jit(_rope_2d_core, static_argnames=("theta", "r", "scaling"))
