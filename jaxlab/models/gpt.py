"""Decoder-only Transformer language model (GPT; Radford et al. 2018/2019) with pre-norm blocks.

tokens_BT -> logits_BTV. Attention goes through `jaxlab.attention.dot_product_attention`; the position
encoding is a config string: absolute ("learned", "sinusoidal") added to the embeddings, relative
("rope", "xpos", "alibi", "t5") in every attention layer, or "none" (NoPE).

Extra heads that predict further ahead (`all_heads=True` -> logits_BTJV, head j predicts token t+1+j;
head 0 is the ordinary next-token head, unchanged by the extra ones):
  * multi-token prediction (Gloeckle et al. 2024, "Better & Faster Large Language Models via
    Multi-token Prediction", fig. 1): `mtp_heads` extra transformer blocks branch off the trunk
    (blocks 0..L-2) beside the last block, which is head 0's; each has its own final norm and all
    share the unembedding.
  * Medusa (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple
    Decoding Heads", sec. 2.1.1): `medusa_heads` residual blocks h + SiLU(W1 h + b1) on the final
    (normed) hidden state h, W1 initialised to zero; the paper's per-head output layer starts as a
    copy of the LM head, here the heads share it (so every head starts as head 0).
`heads_stop_gradient` trains the extra heads on a detached trunk and a constant unembedding (Medusa-1):
no gradient of theirs reaches the next-token model, which with the trainer's separate gradient clipping
(`LMTask.clip_groups`) trains exactly as without them. `jaxlab.decoding.speculative` uses the heads as
drafters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.layers import MLP, FlashLayer, GatedAttentionUnit, MultiHeadAttention
from jaxlab.layers.dense import Dense
from jaxlab.layers.attention import FAMILY_OPTIONS, foreign_family_option
from jaxlab.layers.token_ids import check_token_ids

from jaxlab import positions as positions_lib
from jaxlab.positions.learned import lookup_positions

# The multi-token-prediction blocks are mtp_block_1 .. mtp_block_{mtp_heads}.
MTP_BLOCK_PREFIX = "mtp_block_"

POSITIONS = ("learned", "sinusoidal", "rope", "xpos", "alibi", "t5", "none")
# Families whose blocks are two gated attention units (no MLP; Hua et al. 2022).
GAU_FAMILIES = ("gau", "flash")


def _norm(use_bias: bool, dtype, param_dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=1e-5, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Hyperparameters of the GPT (hashable, so modules and jit can hold it).

  vocab_size, num_layers, width (D), num_heads (N), num_kv_heads (K; N % K == 0), max_len (size of a
  learned position table; xPos's scales are centred on max_len // 2), mlp_ratio, dropout; position:
  one of POSITIONS, with rope_theta, rope_scaling (RoPE context extension), rotary_fraction and
  logn_train_len (> 0: log-n query scaling) and rerope_window / rerope_leaky_k ((leaky) ReRoPE) as
  in `MultiHeadAttention`; tie_embeddings: the output projection is the transposed token embedding;
  attention: the family ("softmax" | "local" | "linear" | "performer" | "block_sparse" |
  "gau" | "flash") with attention_window (local), feature_map (linear), num_features and feature_seed
  (performer), sparse_layout / sparse_block_size / sparse_local_blocks / sparse_stride /
  sparse_num_global / sparse_num_random / sparse_seed (block_sparse, see `causal_block_layout`),
  gau_qk_dim / gau_kind / gau_offset_init ("gau": each block is two gated attention units, "flash":
  two FLASH layers, with flash_chunk; "gau" with gau_kind="relu2" scales its logits by
  1/gau_train_len (0 = max_len), the paper's 1/T at the training length, fixed so that cached
  decoding equals the full pass; with gau_kind="softmax" it takes logn_train_len);
  qk_norm; logit_soft_cap (softmax); attention_impl: passed to `dot_product_attention`;
  mtp_heads / medusa_heads (at most one > 0) and heads_stop_gradient: the extra heads (module docstring).
  """

  vocab_size: int
  num_layers: int
  width: int
  num_heads: int
  num_kv_heads: int
  max_len: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  position: str = "learned"
  rope_theta: float = 10000.0
  rope_scaling: Optional[positions_lib.RopeScaling] = None
  rotary_fraction: float = 1.0
  logn_train_len: int = 0
  tie_embeddings: bool = True
  attention: str = "softmax"
  qk_norm: bool = False
  logit_soft_cap: Optional[float] = None
  rerope_window: int = 0
  rerope_leaky_k: Optional[float] = None
  attention_window: int = 0
  feature_map: str = "elu+1"
  num_features: int = 64
  feature_seed: int = 0
  sparse_layout: str = "window"
  sparse_block_size: int = 16
  sparse_local_blocks: int = 2
  sparse_stride: int = 4
  sparse_num_global: int = 1
  sparse_num_random: int = 1
  sparse_seed: int = 0
  gau_qk_dim: int = 64
  flash_chunk: int = 64
  gau_kind: str = "relu2"
  gau_offset_init: float = 0.0
  gau_train_len: int = 0
  attention_impl: Optional[str] = None
  activation: str = "gelu"
  use_bias: bool = False
  mtp_heads: int = 0
  medusa_heads: int = 0
  heads_stop_gradient: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def extra_heads(self) -> int:
    """Heads beyond the next-token head (J = 1 + extra_heads)."""
    return self.mtp_heads + self.medusa_heads

  def __post_init__(self):
    for name in ("num_layers", "num_heads", "num_kv_heads", "width", "vocab_size", "max_len"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(self.gau_train_len, bool) or not isinstance(self.gau_train_len, (int, np.integer)) \
        or self.gau_train_len < 0:
      raise ValueError(f"gau_train_len must be an int >= 0 (0 = max_len), got {self.gau_train_len!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
    if self.attention not in GAU_FAMILIES and int(self.mlp_ratio * self.width) < 1:
      raise ValueError(f"mlp_ratio * width must give an MLP at least 1 wide, got mlp_ratio="
                       f"{self.mlp_ratio!r}, width={self.width}")
    for name in ("mtp_heads", "medusa_heads"):  # 2.5 failed later in range(), True counted as 1
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if min(self.mtp_heads, self.medusa_heads) < 0 or (self.mtp_heads and self.medusa_heads):
      raise ValueError(f"need mtp_heads >= 0 and medusa_heads >= 0, not both > 0; got "
                       f"mtp_heads={self.mtp_heads}, medusa_heads={self.medusa_heads}")
    if self.position not in POSITIONS:
      raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
    if self.attention in GAU_FAMILIES:  # GAU/FLASH layers take RoPE's theta, and GAU softmax log-n
      logn_default = self.logn_train_len if (self.attention, self.gau_kind) == ("gau",
                                                                               "softmax") else 0
      ignored = [f"{name}={value!r}" for name, value, default in (
          ("rope_scaling", self.rope_scaling, None), ("rotary_fraction", self.rotary_fraction, 1.0),
          ("logn_train_len", self.logn_train_len, logn_default),
          ("rerope_window", self.rerope_window, 0),
          ("qk_norm", self.qk_norm, False), ("logit_soft_cap", self.logit_soft_cap, None))
          if value != default]
      if self.position not in ("rope", "learned", "sinusoidal", "none") or ignored:
        raise ValueError(f"attention={self.attention!r} takes position 'rope', 'learned', "
                         "'sinusoidal' or 'none' and no other position or attention setting "
                         "(but logn_train_len with attention='gau', gau_kind='softmax'); got "
                         f"position={self.position!r}" + "".join(f", {x}" for x in ignored))
    found = foreign_family_option(self, self.attention, _gpt_option)  # it would be dropped
    if found is not None:
      name, value, family = found
      raise ValueError(f"{name}={value!r} applies to attention={family!r}, not {self.attention!r}")
    if self.width % self.num_heads or self.num_heads % self.num_kv_heads:
      raise ValueError(f"need num_heads | width and num_kv_heads | num_heads, got width={self.width}, "
                       f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}")


def _gpt_option(layer_option: str) -> str:
  """GPTConfig's name for a MultiHeadAttention family option."""
  return {"window": "attention_window", "implementation": "attention_impl"}.get(layer_option,
                                                                                layer_option)


class Block(nn.Module):
  """Pre-norm residual block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  config: GPTConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT=None, *, train: bool = False,
               decode: bool = False, prefill: bool = False, append_mask_TT=None):
    c = self.config
    out_std = 0.02 / math.sqrt(2 * c.num_layers)  # GPT-2's scaled residual init
    if c.attention in GAU_FAMILIES:
      if append_mask_TT is not None:
        raise ValueError(f"append_mask_TT (a tree of drafts) needs the softmax family, not "
                         f"{c.attention!r}")
      return self._gau_block(x_BTD, positions_BT, segment_ids_BT, train, decode, out_std)
    h_BTD = _norm(c.use_bias, c.dtype, c.param_dtype, "ln_attn")(x_BTD)
    h_BTD = MultiHeadAttention(
        num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.width // c.num_heads,
        causal=True, position=c.position, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
        rotary_fraction=c.rotary_fraction, logn_train_len=c.logn_train_len,
        xpos_center=c.max_len // 2, family=c.attention,
        **{name: getattr(c, _gpt_option(name)) for name in FAMILY_OPTIONS.get(c.attention, ())},
        qk_norm=c.qk_norm, logit_soft_cap=c.logit_soft_cap, rerope_window=c.rerope_window,
        rerope_leaky_k=c.rerope_leaky_k, use_bias=c.use_bias,
        out_init_std=out_std,
        dtype=c.dtype, param_dtype=c.param_dtype, name="attn")(
            h_BTD, positions_BT, segment_ids_BT=segment_ids_BT, decode=decode, prefill=prefill,
            append_mask_TT=append_mask_TT)
    x_BTD = x_BTD + nn.Dropout(c.dropout, deterministic=not train)(h_BTD)
    h_BTD = _norm(c.use_bias, c.dtype, c.param_dtype, "ln_mlp")(x_BTD)
    h_BTD = MLP(int(c.mlp_ratio * c.width), activation=c.activation, use_bias=c.use_bias,
                out_init_std=out_std, dtype=c.dtype, param_dtype=c.param_dtype, name="mlp")(h_BTD)
    x_BTD = x_BTD + nn.Dropout(c.dropout, deterministic=not train)(h_BTD)
    return nn.with_logical_constraint(x_BTD, ("act_batch", "act_length", "act_embed"))

  def _gau_block(self, x_BTD, positions_BT, segment_ids_BT, train, decode, out_std):
    """GAU / FLASH (Hua et al. 2022): two pre-norm residual gated attention units (expansion
    2 * width; FLASH's with mixed chunk attention) replace attention + MLP, about the same
    parameters (the paper's comparison, sec. 2)."""
    c = self.config
    if segment_ids_BT is not None:
      raise ValueError(f"attention={c.attention!r} does not support segment ids (packed sequences)")
    common = dict(qk_dim=c.gau_qk_dim, causal=True, kind=c.gau_kind,
                  position="rope" if c.position == "rope" else "none", rope_theta=c.rope_theta,
                  offset_init=c.gau_offset_init, use_bias=c.use_bias, out_init_std=out_std,
                  dtype=c.dtype, param_dtype=c.param_dtype)
    for i in range(2):
      h_BTD = _norm(c.use_bias, c.dtype, c.param_dtype, f"ln_{c.attention}_{i}")(x_BTD)
      if c.attention == "flash":
        layer = FlashLayer(2 * c.width, chunk_size=c.flash_chunk, relative_bias=True,
                           name=f"flash_{i}", **common)
      else:
        relu2_scale = 1.0 / (c.gau_train_len or c.max_len)  # the paper's 1/T, T fixed
        layer = GatedAttentionUnit(2 * c.width, scale=relu2_scale if c.gau_kind == "relu2"
                                   else None, logn_train_len=c.logn_train_len, name=f"gau_{i}",
                                   **common)
      h_BTD = layer(h_BTD, positions_BT, decode=decode)
      x_BTD = x_BTD + nn.Dropout(c.dropout, deterministic=not train)(h_BTD)
    return nn.with_logical_constraint(x_BTD, ("act_batch", "act_length", "act_embed"))


class MedusaHead(nn.Module):
  """h_BTD -> h + SiLU(h W1 + b1) (Cai et al. 2024, sec. 2.1.1); W1 and b1 start at zero."""

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_BTD: jax.Array) -> jax.Array:
    w = Dense((h_BTD.shape[-1],), ("embed", "mlp"), use_bias=True, init_std=0.0, dtype=self.dtype,
              param_dtype=self.param_dtype, name="res")
    return h_BTD + jax.nn.silu(w(h_BTD))


class GPT(nn.Module):
  """tokens_BT (int) -> logits_BTV (float32), with hyperparameters `config` (a GPTConfig).

  positions_BT (default 0..T-1; required when decoding after a prefill) are explicit so that packed
  sequences restart and decoding continues;
  segment_ids_BT restrict attention to a segment; decode=True uses the KV cache ("cache" collection),
  and prefill=True (only on an empty cache, else NaN) says the tokens are a prompt, attended as a
  full pass.
  append_mask_TT (bool [T, T], decode only): which of the T appended tokens each one sees (default
  causal; a tree of drafts passes ancestors-or-self, see `jaxlab.decoding.speculative`).
  all_heads=True returns logits_BTJV from every head (J = 1 + config.extra_heads; head j predicts
  token t+1+j), with logits_BTJV[:, :, 0] the logits_BTV of all_heads=False.
  """

  config: GPTConfig

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, positions_BT: Optional[jax.Array] = None,
               segment_ids_BT: Optional[jax.Array] = None, *, train: bool = False,
               decode: bool = False, prefill: bool = False, all_heads: bool = False,
               append_mask_TT: Optional[jax.Array] = None) -> jax.Array:
    c = self.config
    if tokens_BT.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens_BT.shape}")
    check_token_ids(tokens_BT, c.vocab_size, "tokens_BT")
    b, t = tokens_BT.shape
    if positions_BT is None:
      if decode and not prefill and not self.is_initializing():
        raise ValueError("decode=True needs positions_BT (the positions of the tokens after those in "
                         "the cache; 0..T-1 would restart them); only a prefill may leave them out")
      positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if jnp.shape(positions_BT) != (b, t):  # "none" ignored them, "learned" failed to broadcast
      raise ValueError(f"positions_BT must have the shape of tokens_BT {(b, t)}, got "
                       f"{jnp.shape(positions_BT)}")
    embed = nn.Embed(
        c.vocab_size, c.width, dtype=c.dtype, param_dtype=c.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "embed")), name="embed")
    x_BTD = embed(tokens_BT)
    if c.position == "learned":
      table = self.param("pos_embed",
                         nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                      (None, "embed")),
                         (c.max_len, c.width), c.param_dtype)
      # Positions outside the table: ValueError when concrete, NaN rows under jit (never a wrap).
      x_BTD = x_BTD + lookup_positions(table, positions_BT).astype(c.dtype)
    elif c.position == "sinusoidal":
      # Vaswani et al. 2017 sec. 3.4: token embeddings times sqrt(D) before the (unit-amplitude)
      # sinusoids are added; without it the fixed position signal swamps 0.02-scale embeddings.
      x_BTD = x_BTD * math.sqrt(c.width) + positions_lib.sinusoidal_embedding(
          positions_BT, c.width).astype(c.dtype)
    x_BTD = nn.Dropout(c.dropout, deterministic=not train)(x_BTD)
    for i in range(c.num_layers - 1):
      x_BTD = Block(c, name=f"block_{i}")(x_BTD, positions_BT, segment_ids_BT, train=train,
                                          decode=decode, prefill=prefill,
                                          append_mask_TT=append_mask_TT)
    trunk_BTD = x_BTD
    x_BTD = Block(c, name=f"block_{c.num_layers - 1}")(trunk_BTD, positions_BT, segment_ids_BT,
                                                         train=train, decode=decode, prefill=prefill,
                                                         append_mask_TT=append_mask_TT)
    h_BTD = _norm(c.use_bias, c.dtype, c.param_dtype, "ln_final")(x_BTD)
    if c.tie_embeddings:
      logits_BTV = embed.attend(h_BTD).astype(jnp.float32)
    else:
      logits_BTV = nn.Dense(
          c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                   ("embed", "vocab")), name="head")(h_BTD)
      logits_BTV = logits_BTV.astype(jnp.float32)
    if not all_heads and not (c.extra_heads and self.is_initializing()):
      return logits_BTV  # (init creates every head's parameters)
    detach = jax.lax.stop_gradient if c.heads_stop_gradient else (lambda a: a)
    # The extra heads share the unembedding; detached, they read it as a constant.
    table_DV = detach(nn.meta.unbox(self.variables["params"]["embed"]["embedding"]).T
                      if c.tie_embeddings else
                      nn.meta.unbox(self.variables["params"]["head"]["kernel"]))
    unembed_extra = lambda h_BTD: jnp.dot(h_BTD.astype(c.dtype),
                                          table_DV.astype(c.dtype)).astype(jnp.float32)
    heads = [logits_BTV]
    for j in range(1, c.mtp_heads + 1):
      mtp_block = Block(c, name=f"{MTP_BLOCK_PREFIX}{j}")
      y_BTD = mtp_block(detach(trunk_BTD), positions_BT, segment_ids_BT, train=train, decode=decode,
                        prefill=prefill, append_mask_TT=append_mask_TT)
      heads.append(unembed_extra(_norm(c.use_bias, c.dtype, c.param_dtype, f"ln_mtp_{j}")(y_BTD)))
    for j in range(1, c.medusa_heads + 1):
      heads.append(unembed_extra(MedusaHead(c.dtype, c.param_dtype, name=f"medusa_{j}")(
          detach(h_BTD))))
    logits_BTJV = jnp.stack(heads, axis=2)
    return logits_BTJV if all_heads else logits_BTV


def gpt_from_config(model_cfg, vocab_size: int, max_len: int, train_len: int = 0) -> GPT:
  """Builds the GPT from `config.model` (see jaxlab/configs/lm_char.py); train_len: the training
  sequence length (config.data.seq_len; 0 = max_len), which fixes relu2 GAU's 1/T scale."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  # The options of the chosen attention family only (the config holds every family's).
  family_options = {_gpt_option(name): model_cfg[_gpt_option(name)]
                    for name in FAMILY_OPTIONS.get(model_cfg.attention, ())}
  if family_options.get("attention_impl") == "auto":
    family_options["attention_impl"] = None  # dot_product_attention's own choice
  return GPT(GPTConfig(
      vocab_size=vocab_size, num_layers=model_cfg.num_layers, width=model_cfg.width,
      num_heads=model_cfg.num_heads, num_kv_heads=model_cfg.num_kv_heads or model_cfg.num_heads,
      max_len=max_len, mlp_ratio=model_cfg.mlp_ratio, dropout=model_cfg.dropout,
      position=model_cfg.position, rope_theta=model_cfg.rope_theta,
      rope_scaling=rope_scaling_from_config(model_cfg, max_len),
      rotary_fraction=model_cfg.rotary_fraction,
      logn_train_len=(model_cfg.rope_train_len or max_len) if model_cfg.logn_scaling else 0,
      tie_embeddings=model_cfg.tie_embeddings, attention=model_cfg.attention,
      qk_norm=model_cfg.qk_norm, logit_soft_cap=model_cfg.logit_soft_cap or None,
      rerope_window=model_cfg.rerope_window, rerope_leaky_k=model_cfg.rerope_leaky_k or None,
      **family_options,
      gau_qk_dim=model_cfg.gau_qk_dim, flash_chunk=model_cfg.flash_chunk,
      gau_kind=model_cfg.gau_kind, gau_offset_init=model_cfg.gau_offset_init,
      gau_train_len=train_len if model_cfg.attention == "gau" else 0,
      activation=model_cfg.activation, use_bias=model_cfg.use_bias,
      mtp_heads=model_cfg.mtp_heads, medusa_heads=model_cfg.medusa_heads,
      heads_stop_gradient=model_cfg.heads_stop_gradient, dtype=dtypes[model_cfg.dtype]))


def rope_scaling_from_config(model_cfg, max_len: int) -> Optional[positions_lib.RopeScaling]:
  """config.model.rope_scaling ("none" | "linear" | "ntk" | "dynamic_ntk" | "yarn") with its factor
  and training length (0 = the model's max_len) -> RopeScaling or None."""
  if model_cfg.rope_scaling == "none":
    return None
  return positions_lib.RopeScaling(kind=model_cfg.rope_scaling,
                                   factor=model_cfg.rope_scaling_factor,
                                   original_max_len=model_cfg.rope_train_len or max_len)
