"""Multi-head (grouped-query) self-attention as a thin Linen wrapper over `jaxlab.attention`.

The module owns the projections, the KV cache and any learned position table (T5); the maths is
`attention.dot_product_attention` and `jaxlab.positions`. Parameters carry logical axis names
("embed", "kv_heads", "kv"); `jaxlab.train.sharding` maps them to a mesh.

Attention families (`family`): "softmax" (`dot_product_attention`, any implementation), "local"
(banded sliding window, `attention.local_attention`), "linear" (`attention.linear_attention`, causal
chunked form; decoding keeps its recurrent state instead of K/V), "performer" (FAVOR+ with
`num_features` fixed orthogonal random features drawn from `feature_seed` and the module's name, so
each layer has its own; decoding keeps the running-max recurrent state), "block_sparse" (causal only:
`attention.block_sparse_attention` over a static block layout, `attention.causal_block_layout`;
Child et al. 2019, Zaheer et al. 2020; decoding attends to the cache with the layout's key mask for
the query's position, so it equals the full pass).

Dynamic NTK ("dynamic_ntk" rope scaling) follows the current length L. In a full pass L is the row's
max position + 1, or with segment ids each packed segment's own max position + 1 (so packed rows equal
separate runs). Decoding follows the Hugging Face convention: a prefill rotates its tokens with the
full pass's L (P for positions 0..P-1), each later token is rotated with L = its position + 1
(passed as `seq_len`; Hugging Face uses the cache index + 1, the same when positions are cache
slots), and cached keys keep the rotation they were cached with. So cached decoding equals the full pass while the length stays within
the training length, and beyond it equals a full pass in which token s is rotated with its own
L_s = max(P, s + 1), NOT the full pass with L = T for every token (exact equality with that is
impossible with a cache by design: in a full pass beyond the training length every hidden state
depends on the total length T).

Position encodings handled here (the model adds absolute ones to the embeddings):
  "rope" / "xpos" rotate (and for xPos scale) q and k; "rope2d" rotates them by axial 2-D RoPE
  (`positions.apply_rope_2d`) with positions [B, T, 2] (row, col) of image patches (no decoding);
  "alibi" / "t5" add a bias to the logits
  (softmax family only). "rope" with rerope_window > 0 is (leaky) ReRoPE (Su 2023): q and k stay
  unrotated and the logits come from `positions.rerope_attention` (materialised, by construction; the
  KV cache then holds unrotated keys).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import attention, positions as positions_lib
from jaxlab.attention import linear as linear_lib
from jaxlab.attention import local as local_lib
from jaxlab.layers.dense import Dense

FAMILIES = ("softmax", "local", "linear", "performer", "block_sparse")
# "rope", "rope2d", "xpos", "alibi", "t5" act inside the layer; the absolute ones are the model's.
LAYER_POSITIONS = ("rope", "rope2d", "xpos", "alibi", "t5", "learned", "sinusoidal", "none")
SPARSE_LAYOUTS = local_lib.CAUSAL_LAYOUTS
causal_block_layout = local_lib.causal_block_layout
KV_CACHE_FAMILIES = ("softmax", "local", "block_sparse")
RECURRENT_FAMILIES = ("linear", "performer")  # decode with a recurrent state instead of a KV cache
# The options that only some families read; another family refuses them unless left at the default.
# `implementation` picks dot_product_attention's kernel: softmax's, and the KV-cache families'
# cached decoding (local and block-sparse decode through it).
FAMILY_OPTIONS = {
    "softmax": ("implementation",), "local": ("window", "implementation"),
    "linear": ("feature_map",), "performer": ("num_features", "feature_seed"),
    "block_sparse": ("sparse_layout", "sparse_block_size", "sparse_local_blocks", "sparse_stride",
                     "sparse_num_global", "sparse_num_random", "sparse_seed", "implementation")}


def cache_exists(module: nn.Module, name: str) -> bool:
  """Whether `module` decodes against an existing "cache" variable `name`: False in `init` (which
  creates the cache), True in `apply` when the cache holds it. A decoding `apply` without it raises:
  Flax would create a fresh, empty cache as long as the call itself, and the layer would decode with
  no history (e.g. a cache from `init_cache(all_heads=False)` read with all_heads=True)."""
  if module.is_initializing():
    return False
  if not module.has_variable("cache", name):
    where = "/".join(module.scope.path) if module.scope is not None else type(module).__name__
    raise ValueError(f"{where}: decode=True needs this layer's KV cache "
                     f"(cache variable {name!r}), and the cache passed has none: build it with "
                     "jaxlab.decoding.init_cache (all_heads=True to decode the extra heads too)")
  return True


def foreign_family_option(options, family: str, rename: Callable[[str], str] = lambda name: name
                          ) -> Optional[tuple[str, Any, str]]:
  """The first FAMILY_OPTIONS entry of another family than `family` that the dataclass `options`
  (the layer, or a config naming the options by `rename`) sets away from its default, as (name,
  value, that family); None when there is none."""
  fields = type(options).__dataclass_fields__
  own = set(FAMILY_OPTIONS.get(family, ()))
  for other, names in FAMILY_OPTIONS.items():
    for key in (rename(name) for name in names if name not in own):
      if getattr(options, key) != fields[key].default:
        return key, getattr(options, key), other
  return None
# Families whose decoding state does not grow with the sequence: a recurrent state, or the local
# family's ring of window + APPEND_LIMIT cached keys. After the prefill, a decoding call appends at
# most APPEND_LIMIT tokens (a chain of drafts + 1) to them.
BOUNDED_STATE_FAMILIES = RECURRENT_FAMILIES + ("local",)
APPEND_LIMIT = 16
# The cache entries a recurrent layer keeps only to be rewound (see MultiHeadAttention._recurrent).
REWIND_VARIABLES = ("state_before_append", "appended_keys", "appended_values", "append_start",
                    "append_length")


class MultiHeadAttention(nn.Module):
  """Self-attention x_BTD -> y_BTD with N query heads and K key/value heads (N % K == 0).

  Attributes:
    num_heads, num_kv_heads, head_dim: N, K, H.
    causal: causal self-attention.
    position: "rope"/"xpos" rotate q and k ("rope2d": axial 2-D RoPE over positions [B, T, 2]),
      "alibi"/"t5" add a logit bias; "learned"/"sinusoidal"/"none": handled by the model (nothing
      here); any other name is refused.
    rope_theta, rope_scaling, rotary_fraction: RoPE base, context extension (PI/NTK/YaRN...) and
      the fraction of head_dim rotated. YaRN's attention temperature is applied to q and k here;
      dynamic NTK's length is per row, per packed segment, or from the decoded positions (module
      docstring).
    family: one of FAMILIES, with window ("local"), feature_map ("linear"), num_features and
      feature_seed ("performer"), sparse_* ("block_sparse": layout kind, block size b and the
      arguments of `causal_block_layout`).
    implementation: passed to `attention.dot_product_attention` (softmax, and the cached decoding
      of local and block_sparse; refused with another family, which would ignore it).
    use_bias: biases in the projections.
    out_init_std: init std of the output projection (GPT-2 scales it by 1/sqrt(2 * layers)).
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  causal: bool = True
  position: str = "learned"
  rope_theta: float = 10000.0
  rope_scaling: Optional[positions_lib.RopeScaling] = None
  rotary_fraction: float = 1.0
  # position="xpos": the position whose scale is 1 (`positions.apply_xpos`'s `center`; it cancels in
  # the logits). float32 holds the scales for |position - xpos_center| up to ~36k, so a model whose
  # positions run to L does best with L // 2 (the GPT's choice: max_len // 2).
  xpos_center: int = 0
  # > 0: scale queries by max(1, log n / log train_len), n = position + 1 (log-n scaling, causal only;
  # with a local window too, n is the position as in Qwen's logn_attn, not the visible key count)
  logn_train_len: int = 0
  qk_norm: bool = False  # RMS-normalise q and k per head (learned scale) before positions
  logit_soft_cap: Optional[float] = None  # softmax family: logits -> c * tanh(logits / c)
  rerope_window: int = 0  # > 0 with position="rope": (leaky) ReRoPE with this window
  rerope_leaky_k: Optional[float] = None  # leaky ReRoPE's k (>= 1; 1 = plain RoPE); None = ReRoPE
  family: str = "softmax"
  window: int = 0  # "local": each query sees itself and the `window` tokens before it
  feature_map: str = "elu+1"  # "linear": feature map
  num_features: int = 64  # "performer": random features M
  feature_seed: int = 0  # "performer": seed of the features (a new seed = a redraw)
  sparse_layout: str = "window"  # "block_sparse": one of SPARSE_LAYOUTS
  sparse_block_size: int = 16  # "block_sparse": block size b
  sparse_local_blocks: int = 2  # "block_sparse": own block + the local_blocks - 1 before it
  sparse_stride: int = 4  # "block_sparse", "strided": every stride-th block is a summary block
  sparse_num_global: int = 1  # "block_sparse", "bigbird": leading blocks every block sees
  sparse_num_random: int = 1  # "block_sparse", "bigbird": random earlier blocks per block row
  sparse_seed: int = 0  # "block_sparse", "bigbird": seed of the random blocks
  implementation: Optional[str] = None
  use_bias: bool = False
  init_std: float = 0.02
  out_init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, *,
               segment_ids_BT: Optional[jax.Array] = None, decode: bool = False,
               prefill: bool = False, append_mask_TT: Optional[jax.Array] = None) -> jax.Array:
    """x_BTD -> y_BTD. decode=True: against the KV cache (see _cached_attention); prefill=True (only
    on an empty cache; on one that holds tokens the outputs are NaN) computes the prompt's attention
    as a full pass, in the family's own O(T^2) way, instead of each query against the cache (the
    same numbers; except with dynamic NTK in the recurrent families, where a first call without
    prefill is an append, each token rotated with L = position + 1, and a prefill uses L = T as the
    full pass does). append_mask_TT (bool [T, T],
    decode only, softmax family): which of the appended tokens each appended token sees (default:
    itself and those before it; a tree of drafts passes ancestors-or-self)."""
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads})")
    self._check_positions()
    b, t, _ = x_BTD.shape
    if (self.position == "rope2d") != (jnp.ndim(positions_BT) == 3):
      raise ValueError(f"positions_BT must be [B, T, 2] (row, col) for position='rope2d' and [B, T] "
                       f"otherwise; got shape {jnp.shape(positions_BT)} for "
                       f"position={self.position!r}")
    if self.position == "rope2d" and (decode or self.rope_scaling is not None
                                      or self.logn_train_len or self.rerope_window):
      raise ValueError("position='rope2d' is for image patches: no decoding, rope_scaling, "
                       "logn scaling or ReRoPE")
    k_heads, group = self.num_kv_heads, self.num_heads // self.num_kv_heads
    # One fused projection; per kv head: its `group` query heads, then its key, then its value, so
    # that sharding the kv-head axis keeps every group (and its K/V) on one device.
    qkv_BTKGH = Dense((k_heads, group + 2, self.head_dim), ("embed", "kv_heads", None, "kv"),
                      use_bias=self.use_bias, init_std=self.init_std, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="qkv")(x_BTD)
    q_BTNH = qkv_BTKGH[:, :, :, :group].reshape(b, t, self.num_heads, self.head_dim)
    k_BTKH = qkv_BTKGH[:, :, :, group]
    v_BTKH = qkv_BTKGH[:, :, :, group + 1]
    if self.qk_norm:
      # QK-norm (Dehghani et al. 2023; Wortsman et al. 2023): bounded logits for stable training.
      norm = lambda name: nn.RMSNorm(
          epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
          scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("kv",)))
      q_BTNH, k_BTKH = norm("q_norm")(q_BTNH), norm("k_norm")(k_BTKH)
    if self.family not in FAMILIES:
      raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
    self._check_family_options()
    if decode and not self.causal:
      raise ValueError("decode=True needs causal=True: a KV cache (or recurrent state) holds only "
                       "the tokens before each query, while a causal=False layer attends both ways")
    # Dynamic NTK with a KV cache: q and k are rotated in _cached_attention (L from the positions).
    rotate_in_cache = (decode and self._dynamic_ntk() and self.family in KV_CACHE_FAMILIES
                   and not self.rerope_window)
    if not rotate_in_cache:
      seq_len = self._seq_len(positions_BT, segment_ids_BT)
      if decode and not prefill and self.family in RECURRENT_FAMILIES:
        seq_len = positions_BT + 1  # each appended token as if decoded alone (see above)
      q_BTNH, k_BTKH = self._rotate(q_BTNH, k_BTKH, positions_BT, seq_len)
    if self.logn_train_len:  # a per-query scalar: commutes with the rotation
      q_BTNH = q_BTNH * positions_lib.logn_scale(positions_BT, self.logn_train_len)[
          :, :, None, None].astype(q_BTNH.dtype)
    if self.family == "block_sparse":
      self._check_block_sparse()
    if self.family != "softmax" and self.logit_soft_cap is not None:
      raise ValueError(f"logit_soft_cap applies to the softmax family, not {self.family!r}")
    if self.rerope_window and (self.position != "rope" or self.family != "softmax"
                               or self.logit_soft_cap is not None or self.rotary_fraction != 1.0
                               or self.rope_scaling is not None):
      raise ValueError("rerope_window needs position='rope' with full rotary and no rope_scaling, "
                       f"the softmax family and no logit_soft_cap; got position={self.position!r}, "
                       f"family={self.family!r}")
    if self.family != "softmax" and self.position in ("alibi", "t5"):
      raise ValueError(f"position={self.position!r} adds a logit bias, which the {self.family!r} "
                       "family does not take")
    if append_mask_TT is not None and (not decode or prefill or self.family != "softmax"
                                       or self.rerope_window):
      raise ValueError("append_mask_TT applies to appends to a KV cache (decode=True, no prefill) "
                       f"in the softmax family without ReRoPE; got decode={decode}, "
                       f"prefill={prefill}, family={self.family!r}, "
                       f"rerope_window={self.rerope_window}")
    if decode and segment_ids_BT is not None:
      raise ValueError("segment_ids_BT do not apply with decode=True (the KV cache holds one "
                       "sequence per batch row); decode each segment as its own row")
    if decode and self.family in RECURRENT_FAMILIES:
      out_BTNH = self._recurrent(q_BTNH, k_BTKH, v_BTKH, prefill=prefill)
    elif decode:
      out_BTNH = self._cached_attention(q_BTNH, k_BTKH, v_BTKH, positions_BT,
                                        rotate_in_cache=rotate_in_cache, prefill=prefill,
                                        append_mask_TT=append_mask_TT)
    else:
      out_BTNH = self._attend(q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT)

    return Dense((x_BTD.shape[-1],), ("heads", "kv", "embed"), in_dims=2, use_bias=self.use_bias,
                 init_std=self.out_init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="out")(out_BTNH)

  def _check_family_options(self) -> None:
    """Refuses an option of another family than `family` set away from its default (it would be
    ignored: window=2 with the softmax family is full attention)."""
    found = foreign_family_option(self, self.family)
    if found is not None:
      name, value, family = found
      raise ValueError(f"{name}={value!r} applies to the {family!r} family, not {self.family!r}")

  def _attend(self, q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT=None):
    """Full-sequence attention of the configured family (training, and the prefill of decoding)."""
    if self.family == "local":
      return attention.local_attention(q_BTNH, k_BTKH, v_BTKH, window=self._window(),
                                       causal=self.causal, q_segment_ids=segment_ids_BT,
                                       kv_segment_ids=segment_ids_BT)
    if self.family == "block_sparse":
      if segment_ids_BT is not None:
        raise ValueError("the 'block_sparse' family does not support segment ids")
      b = self.sparse_block_size
      return attention.block_sparse_attention(
          q_BTNH, k_BTKH, v_BTKH, layout=self._sparse_layout(-(-q_BTNH.shape[1] // b)),
          block_size=b, causal=True)
    if self.rerope_window:
      return self._rerope(q_BTNH, k_BTKH, v_BTKH, positions_BT, positions_BT,
                          segment_ids_BT=segment_ids_BT)
    if self.family == "linear":
      if segment_ids_BT is not None:
        raise ValueError("the 'linear' family does not support segment ids")
      return attention.linear_attention(q_BTNH, k_BTKH, v_BTKH, causal=self.causal,
                                        feature_map=self.feature_map)
    if self.family == "performer":
      if segment_ids_BT is not None:
        raise ValueError("the 'performer' family does not support segment ids")
      return attention.performer_attention(q_BTNH, k_BTKH, v_BTKH, key=None,
                                           projection=self._performer_projection(),
                                           causal=self.causal)
    return attention.dot_product_attention(
        q_BTNH, k_BTKH, v_BTKH, causal=self.causal, q_segment_ids=segment_ids_BT,
        kv_segment_ids=segment_ids_BT, bias=self._bias(positions_BT, positions_BT),
        logit_soft_cap=self.logit_soft_cap, implementation=self.implementation)

  def _rerope(self, q_BTNH, k_BTKH, v_BTKH, q_positions_BT, kv_positions_BT, *,
              segment_ids_BT=None, kv_lengths_B=None):
    return positions_lib.rerope_attention(
        q_BTNH, k_BTKH, v_BTKH, q_positions_BT, kv_positions_BT, window=self.rerope_window,
        leaky_k=self.rerope_leaky_k, theta=self.rope_theta, causal=self.causal,
        q_segment_ids=segment_ids_BT, kv_segment_ids=segment_ids_BT, kv_lengths=kv_lengths_B)

  def _performer_projection(self) -> jax.Array:
    """[M, H] FAVOR+ projection, fixed by feature_seed and this module's name (a constant, not a
    parameter: it is neither trained nor decayed)."""
    import zlib
    key = jax.random.fold_in(jax.random.key(self.feature_seed),
                             zlib.crc32("/".join(self.scope.path).encode()) & 0x7FFFFFFF)
    return attention.orthogonal_gaussian_features(key, self.num_features, self.head_dim)

  def _window(self):
    if self.window < 1:
      raise ValueError(f"the 'local' family needs window >= 1, got {self.window}")
    return (self.window, 0 if self.causal else self.window)

  def _check_block_sparse(self):
    if not self.causal:
      raise ValueError("the 'block_sparse' family is causal only (causal=True)")
    if isinstance(self.sparse_block_size, bool) or not isinstance(self.sparse_block_size, int) \
        or self.sparse_block_size < 1:
      raise ValueError(f"sparse_block_size must be an int >= 1, got {self.sparse_block_size!r}")
    self._sparse_layout(1)  # validates the layout arguments

  def _sparse_layout(self, num_blocks: int) -> np.ndarray:
    return causal_block_layout(self.sparse_layout, num_blocks, local_blocks=self.sparse_local_blocks,
                               stride=self.sparse_stride, num_global=self.sparse_num_global,
                               num_random=self.sparse_num_random, seed=self.sparse_seed)

  def _check_positions(self) -> None:
    """ValueError for an unknown position or a setting that the chosen position would ignore."""
    if self.position not in LAYER_POSITIONS:
      raise ValueError(f"position must be one of {LAYER_POSITIONS}, got {self.position!r}")
    if self.rope_scaling is not None and self.position != "rope":
      raise ValueError(f"rope_scaling applies to position='rope', not {self.position!r}")
    if self.rotary_fraction != 1.0 and self.position not in ("rope", "rope2d"):
      raise ValueError(f"rotary_fraction={self.rotary_fraction} applies to position='rope' or "
                       f"'rope2d', not {self.position!r}")
    if self.rerope_leaky_k is not None and not self.rerope_window:
      raise ValueError(f"rerope_leaky_k={self.rerope_leaky_k} needs rerope_window > 0")
    if self.logn_train_len and not self.causal:
      raise ValueError("logn_train_len scales query t by log(t + 1) / log(train_len), the keys a "
                       "causal query sees; it needs causal=True")

  def _scaling(self) -> Optional[positions_lib.RopeScaling]:
    """rope_scaling as a RopeScaling (Flax holds a dict given here as a FrozenDict)."""
    return positions_lib.as_rope_scaling(self.rope_scaling)

  def _dynamic_ntk(self) -> bool:
    scaling = self._scaling()
    return self.position == "rope" and scaling is not None and scaling.kind == "dynamic_ntk"

  def _seq_len(self, positions_BT, segment_ids_BT) -> Optional[jax.Array]:
    """Dynamic NTK's length L for a full pass: None (the row's max position + 1) or, with segment
    ids, [B, T] with 1 + the max position of each token's segment (a run of equal ids)."""
    if not self._dynamic_ntk() or segment_ids_BT is None or self.rerope_window:
      return None
    b, t = positions_BT.shape
    starts = jnp.concatenate([jnp.ones((b, 1), bool),
                              segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    run_BT = jnp.cumsum(starts, axis=1) - 1  # run index in [0, T)
    run_max = jax.vmap(lambda p, r: jax.ops.segment_max(p, r, num_segments=t,
                                                        indices_are_sorted=True))(positions_BT, run_BT)
    return jnp.take_along_axis(run_max, run_BT, axis=1) + 1

  def _rope(self, x, positions_BT, seq_len=None):
    return positions_lib.apply_rope(x, positions_BT, theta=self.rope_theta,
                                    scaling=self.rope_scaling, rotary_fraction=self.rotary_fraction,
                                    seq_len=seq_len if self._dynamic_ntk() else None)

  def _rotate(self, q_BTNH, k_BTKH, positions_BT, seq_len=None):
    """Rotates (xPos: and scales) q and k; seq_len: dynamic NTK's L ([B] or [B, T]), else unused."""
    if self.position == "rope" and self.rerope_window:
      return q_BTNH, k_BTKH  # ReRoPE rotates inside its logits
    if self.position == "rope":
      q_BTNH = self._rope(q_BTNH, positions_BT, seq_len)
      k_BTKH = self._rope(k_BTKH, positions_BT, seq_len)
      scaling = self._scaling()
      if scaling is not None and scaling.kind == "yarn":
        # YaRN sec. 3.4: logits scaled by 1/t with sqrt(1/t) = 0.1 ln(s) + 1, on q and k: every
        # dim, so the whole logit (as the paper). Hugging Face scales cos/sin, i.e. only the rotated
        # dims: the same with full rotary, not with rotary_fraction < 1.
        temperature = positions_lib.yarn_attention_factor(scaling.factor)
        q_BTNH, k_BTKH = q_BTNH * temperature, k_BTKH * temperature
    elif self.position == "rope2d":
      rotate = functools.partial(positions_lib.apply_rope_2d, positions=positions_BT,
                                 theta=self.rope_theta, rotary_fraction=self.rotary_fraction)
      q_BTNH, k_BTKH = rotate(q_BTNH), rotate(k_BTKH)
    elif self.position == "xpos":
      q_BTNH, k_BTKH = positions_lib.apply_xpos(q_BTNH, k_BTKH, positions_BT, positions_BT,
                                                theta=self.rope_theta, center=self.xpos_center)
    return q_BTNH, k_BTKH

  def _bias(self, q_positions_BT, kv_positions_BT) -> Optional[jax.Array]:
    """ALiBi or T5 logit bias [B, N, Tq, Tk] from explicit positions; None for other encodings."""
    if self.position == "alibi":
      return positions_lib.alibi_bias_from_positions(self.num_heads, q_positions_BT,
                                                     kv_positions_BT, causal=self.causal)
    if self.position == "t5":
      return positions_lib.T5RelativeBias(self.num_heads, bidirectional=not self.causal,
                                          name="relative_bias")(
          q_positions_BT.shape[1], kv_positions_BT.shape[1], q_positions=q_positions_BT,
          kv_positions=kv_positions_BT)
    return None

  def _cached_attention(self, q_BTNH, k_BTKH, v_BTKH, positions_BT, *, rotate_in_cache=False,
                        prefill=False, append_mask_TT=None):
    """Attention against a KV cache in the "cache" collection.

    The cache is created by `init` with the full decoding length as T (call `model.init(..., decode=True)`
    with an input of shape [B, max_len]). Afterwards each call appends its T tokens at the cache index
    (slot j holds position j, except for the candidates of a draft tree until their accepted path is
    moved into place) and each of them attends to the cache up to and including its own slot:
    T > 1 on an empty cache is the prefill of a prompt (with `prefill`, computed as a full pass), T == 1
    one decoding step, and T > 1 on a non-empty cache appends several tokens at once (the verification
    pass of speculative decoding). The cache keeps each key's position (for ALiBi, T5 and ReRoPE).
    Setting a layer's "cache_index" back (see `jaxlab.decoding.speculative`) drops the tokens after it:
    they are masked by length and overwritten by the next call.
    The local family keeps a ring of min(T, window + APPEND_LIMIT) slots instead (Mistral's rolling
    buffer cache, Jiang et al. 2023 sec. 2): token j goes to slot j mod slots, and no query still
    needs a key once it is overwritten, so decoding memory and time stay O(window) however long the
    sequence. A prefill longer than the ring keeps its last tokens; a call on a ring made for a
    longer sequence appends at most APPEND_LIMIT tokens (more give NaN once the ring wraps), and a
    rewind may go back at most APPEND_LIMIT tokens from the furthest token written (further, the
    ring has overwritten keys the queries need: NaN).
    rotate_in_cache (dynamic NTK): q and k arrive unrotated and are rotated here with L = the max
    position + 1 for a prefill and L = position + 1 for each appended token (module docstring).
    append_mask_TT (bool [T, T]): appended token i sees the cache before the append and the appended
    tokens j with append_mask_TT[i, j] (j <= i); for a tree of drafts (Medusa's tree attention, Cai et
    al. 2024 sec. 2.1.2) its ancestors and itself, whose positions (not slots) then give the rotation
    and dynamic NTK's L = position + 1.
    """
    is_initialized = cache_exists(self, "cached_key")
    b, t, kh, h = k_BTKH.shape
    if append_mask_TT is not None:
      append_mask_TT = jnp.asarray(append_mask_TT, bool)
      if append_mask_TT.shape != (t, t):
        raise ValueError(f"append_mask_TT must be [T, T] = [{t}, {t}] for the {t} appended tokens, "
                         f"got shape {append_mask_TT.shape}")
    ring = self.family == "local"
    slots = min(t, self.window + APPEND_LIMIT) if ring else t  # (read at initialisation only)
    cached_k = self.variable("cache", "cached_key", jnp.zeros, (b, slots, kh, h), k_BTKH.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, (b, slots, kh, h), v_BTKH.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    # The position each cached key was written with (ALiBi, T5 and ReRoPE read them).
    cached_pos = self.variable("cache", "cached_positions", jnp.zeros, (b, slots),
                               positions_BT.dtype)
    if ring:  # one past the furthest token written: a rewind leaves later tokens in the ring
      written = self.variable("cache", "ring_written", lambda: jnp.array(0, jnp.int32))
    if not is_initialized:
      # Initialisation pass: shapes only.
      if rotate_in_cache:
        q_BTNH, k_BTKH = self._rotate(q_BTNH, k_BTKH, positions_BT)
      return self._attend(q_BTNH, k_BTKH, v_BTKH, positions_BT)
    i = index.value
    slots_T = i + jnp.arange(t, dtype=jnp.int32)
    if rotate_in_cache:  # L from positions, as in the full pass (module docstring)
      prefill_L_B1 = jnp.max(positions_BT, axis=1, keepdims=True) + 1
      lengths_BT = jnp.where(i == 0, jnp.broadcast_to(prefill_L_B1, (b, t)), positions_BT + 1)
      q_BTNH, k_BTKH = self._rotate(q_BTNH, k_BTKH, positions_BT, lengths_BT)
    max_len = cached_k.value.shape[1]  # the cache's slots
    if ring:  # token j in slot j mod max_len; of more tokens than slots, the last ones
      kept = min(t, max_len)
      ring_slots = jnp.mod(i + t - kept + jnp.arange(kept, dtype=jnp.int32), max_len)
      write = lambda cache, x: cache.at[:, ring_slots].set(x[:, t - kept:].astype(cache.dtype))
    else:
      write = lambda cache, x: jax.lax.dynamic_update_slice_in_dim(cache, x.astype(cache.dtype), i,
                                                                   axis=1)
    cached_k.value = write(cached_k.value, k_BTKH)
    cached_v.value = write(cached_v.value, v_BTKH)
    cached_pos.value = write(cached_pos.value, positions_BT)
    index.value = i + t
    if ring:
      furthest = written.value  # before this call
      written.value = jnp.maximum(furthest, i + t)
    if prefill:
      # A prompt on an empty cache: its tokens attend to each other as in a full pass (the family's
      # own attention, O(T^2)). On a non-empty cache that pass would not see the cached tokens: the
      # outputs are NaN rather than silently wrong (the index is traced, so this cannot raise).
      return jnp.where(i == 0, self._attend(q_BTNH, k_BTKH, v_BTKH, positions_BT), jnp.nan)
    keys_BSKH, values_BSKH, kv_positions_BS = cached_k.value, cached_v.value, cached_pos.value
    if ring:  # the token in each slot: the newest j <= i + t - 1 with j = slot mod max_len (< 0: none)
      last = i + t - 1
      slots_S = last - jnp.mod(last - jnp.arange(max_len, dtype=jnp.int32), max_len)
    else:  # slot j holds token j
      slots_S = jnp.arange(max_len, dtype=jnp.int32)
    bias_BNTS = None if self.rerope_window else self._bias(positions_BT, kv_positions_BS)

    def one_query(q_BNH, slot, position_B, bias_BNS, append_row_T=None):
      """The query of token `slot` against the cache (tokens 0..slot; the local family's ring: the
      query's window of them) and its family's mask (append_row_T: which appended tokens it sees)
      -> [B, N, H]."""
      q_B1NH = q_BNH[:, None]
      lengths_B = jnp.full((b,), max_len if ring else slot + 1, jnp.int32)
      visible_S = None
      if append_row_T is not None:
        offset_S = slots_S - i  # slot - the append's first slot
        visible_S = (offset_S < 0) | append_row_T[jnp.clip(offset_S, 0, t - 1)]
      if ring:
        # The query's window, tokens slot - window .. slot, is a segment: its keys are segment 1,
        # the ring's other slots (older tokens, later appended ones, slots not written yet) 0.
        visible_S = (slots_S >= jnp.maximum(slot - self.window, 0)) & (slots_S <= slot)
      elif self.family == "block_sparse":
        # The layout row of the query's block, spread over the keys (the layout of the cache length
        # starts with the layout of any shorter one; see causal_block_layout).
        bs = self.sparse_block_size
        layout = jnp.asarray(self._sparse_layout(-(-max_len // bs)))
        visible_S = jax.lax.dynamic_index_in_dim(layout, slot // bs, keepdims=False)[slots_S // bs]
      if self.rerope_window:
        return self._rerope(q_B1NH, keys_BSKH, values_BSKH, position_B[:, None], kv_positions_BS,
                            kv_lengths_B=lengths_B)[:, 0]
      # Visible keys are segment 1, the others 0; the query is segment 1.
      out = attention.dot_product_attention(
          q_B1NH, keys_BSKH, values_BSKH, kv_lengths=lengths_B,
          q_segment_ids=None if visible_S is None else jnp.ones((b, 1), jnp.int32),
          kv_segment_ids=None if visible_S is None else jnp.broadcast_to(
              visible_S.astype(jnp.int32), (b, slots_S.shape[0])),
          bias=None if bias_BNS is None else bias_BNS[:, :, None],
          logit_soft_cap=self.logit_soft_cap, implementation=self.implementation)
      return out[:, 0]

    if t == 1:
      bias_BNS = None if bias_BNTS is None else bias_BNTS[:, :, 0]
      out = one_query(q_BTNH[:, 0], i, positions_BT[:, 0], bias_BNS)[:, None]
    else:  # several tokens: each query against the cache up to its own slot, vectorised over them
      over_queries = jax.vmap(one_query, in_axes=(1, 0, 1, None if bias_BNTS is None else 2,
                                                  None if append_mask_TT is None else 0),
                              out_axes=1)
      out = over_queries(q_BTNH, slots_T, positions_BT, bias_BNTS, append_mask_TT)
    # Writing past the cache's end: dynamic_update_slice clamps its start, so the last slots would be
    # overwritten and the keys garbled; the outputs are NaN rather than silently wrong (the index is
    # traced, so this cannot raise). A ring wraps instead, which needs window + T slots (one made
    # for a sequence shorter than that cannot wrap).
    overflow = i + t > max_len
    if ring:
      overflow &= max_len < self.window + t
      # After a rewind the slots of tokens past this call's last still hold them, where the mapping
      # above expects the token max_len earlier; wrong once that one is in a query's window.
      overflow |= furthest - 1 - max_len >= jnp.maximum(i - self.window, 0)
    return jnp.where(overflow, jnp.nan, out)

  def _recurrent(self, q_BTNH, k_BTKH, v_BTKH, *, prefill: bool):
    """Causal linear attention or FAVOR+ while decoding: the cache holds the recurrent state (the
    prefix sums S and z of `attention.linear` / `attention.performer`, Katharopoulos et al. 2020,
    eq. 18-20) instead of keys and values. prefill: the prompt on an empty state, as a full causal
    pass. Otherwise the T tokens (1 <= T <= APPEND_LIMIT) are appended one step at a time,
    each seeing the state and the tokens before it.

    Rewinding (speculative decoding's rejected drafts): a cache that holds REWIND_VARIABLES (`init`
    creates them; `jaxlab.decoding.sampling.init_cache(..., rewindable=False)` leaves them out, and
    ordinary decoding then skips their bookkeeping) also keeps the state before the last append and the
    appended keys and values. Setting "cache_index" back to i within the last append (start <= i <=
    start + T) makes the next call start from the state after token i - 1: the state before the
    append advanced by the kept tokens. The state cannot go back further: a cache_index outside the
    last append makes every output NaN rather than silently wrong."""
    b, t, kh, h = k_BTKH.shape
    if self.family == "linear":
      empty = linear_lib.linear_attention_init_state(b, kh, h)
      step = functools.partial(linear_lib.linear_attention_step, feature_map=self.feature_map)
      whole = functools.partial(linear_lib.linear_attention_prefill, feature_map=self.feature_map)
    else:
      from jaxlab.attention import performer as performer_lib
      projection = self._performer_projection()
      empty = performer_lib.performer_init_state(b, kh, h, self.num_features)
      step = functools.partial(performer_lib.performer_attention_step, projection=projection)
      whole = functools.partial(performer_lib.performer_prefill, projection=projection)
    is_initialized = cache_exists(self, "state")
    rewindable = not is_initialized or self.has_variable("cache", "state_before_append")
    state = self.variable("cache", "state", lambda: empty)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    limit = APPEND_LIMIT
    if rewindable:
      before = self.variable("cache", "state_before_append", lambda: empty)
      keys = self.variable("cache", "appended_keys", jnp.zeros, (b, limit, kh, h), k_BTKH.dtype)
      values = self.variable("cache", "appended_values", jnp.zeros, (b, limit, kh, h),
                             v_BTKH.dtype)
      start = self.variable("cache", "append_start", lambda: jnp.array(0, jnp.int32))
      length = self.variable("cache", "append_length", lambda: jnp.array(0, jnp.int32))
    if not is_initialized:  # initialisation pass: shapes only
      return self._attend(q_BTNH, k_BTKH, v_BTKH, None)
    i = index.value
    if prefill:  # on an empty state only: one that holds tokens gives NaN (see _cached_attention)
      out, state.value = whole(q_BTNH, k_BTKH, v_BTKH)
      out = jnp.where(i == 0, out, jnp.nan)
      index.value = i + t
      if rewindable:  # nothing to rewind into: the prefill is not an append
        before.value, start.value, length.value = state.value, i + t, jnp.zeros((), jnp.int32)
      return out
    if t > limit:
      raise ValueError(f"a recurrent ({self.family}) decoding state takes at most {limit} tokens "
                       f"per call, got {t}; a prompt is a prefill (prefill=True)")
    # A zero-filled cache (`init_cache`) at index 0 is the empty state (Performer's running max starts
    # at -inf, not 0).
    at_start = lambda state_: jax.tree.map(lambda a, e: jnp.where(i == 0, e, a), state_, empty)
    if rewindable:
      one_query_BKH = jnp.zeros((b, 1, kh, h), q_BTNH.dtype)  # folding needs no output

      def refold():  # the state before the append, advanced by its first i - start tokens
        kept = i - start.value

        def body(state_, xs):
          j, k_BKH, v_BKH = xs
          advanced = step(one_query_BKH, k_BKH[:, None], v_BKH[:, None], state_)[1]
          return jax.tree.map(functools.partial(jnp.where, j < kept), advanced, state_), None

        xs = (jnp.arange(limit), jnp.moveaxis(keys.value, 1, 0), jnp.moveaxis(values.value, 1, 0))
        folded = jax.lax.scan(body, before.value, xs)[0]
        outside = (kept < 0) | (kept > length.value)  # not a rewind into the last append
        return at_start(jax.tree.map(lambda a: jnp.where(outside, jnp.nan, a), folded))

      current = jax.lax.cond((i == start.value + length.value) & (i > 0), lambda: state.value,
                             refold)
    else:
      current = at_start(state.value)

    def body(state_, xs):
      q_BNH, k_BKH, v_BKH = xs
      out_B1NH, state_ = step(q_BNH[:, None], k_BKH[:, None], v_BKH[:, None], state_)
      return state_, out_B1NH[:, 0]

    state.value, out_TBNH = jax.lax.scan(body, current, tuple(jnp.moveaxis(x, 1, 0)
                                                              for x in (q_BTNH, k_BTKH, v_BTKH)))
    index.value = i + t
    if rewindable:
      before.value = current
      keys.value = jax.lax.dynamic_update_slice_in_dim(keys.value, k_BTKH, 0, axis=1)
      values.value = jax.lax.dynamic_update_slice_in_dim(values.value, v_BTKH, 0, axis=1)
      start.value, length.value = i, jnp.asarray(t, jnp.int32)
    return jnp.moveaxis(out_TBNH, 0, 1)
