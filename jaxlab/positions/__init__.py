"""Position encodings as pure functions (plus two small Linen modules that own tables).

Layout [batch, length, heads, head_dim]; positions are explicit [batch, length] arrays.
  sinusoidal  sinusoidal_embedding                       Vaswani et al. 2017
  learned     LearnedPositionEmbedding                   (Linen)
  rope        apply_rope (+ RopeScaling: linear/PI, ntk, dynamic_ntk, yarn; rotary_fraction),
              apply_rope_complex, apply_rope_2d, rope_frequencies, rope_angles, yarn_attention_factor
  alibi       alibi_slopes, alibi_bias, alibi_bias_from_positions   Press et al. 2022
  t5          t5_relative_bucket, T5RelativeBias (Linen)            Raffel et al. 2020
  xpos        apply_xpos, xpos_scale                                Sun et al. 2022
  logn        logn_scale                                            Chiang & Cholak 2022
  rerope      rerope_logits                                         Su 2023
"""

from jaxlab.positions.alibi import alibi_bias, alibi_bias_from_positions, alibi_slopes
from jaxlab.positions.learned import LearnedPositionEmbedding
from jaxlab.positions.logn import logn_scale
from jaxlab.positions.rerope import rerope_attention, rerope_logits
from jaxlab.positions.rope import (RopeScaling, apply_rope, apply_rope_2d, apply_rope_complex,
                                   as_rope_scaling, rope_angles, rope_frequencies, yarn_attention_factor,
                                   yarn_ramp)
from jaxlab.positions.sinusoidal import sinusoidal_embedding
from jaxlab.positions.t5 import T5RelativeBias, t5_relative_bucket
from jaxlab.positions.xpos import apply_xpos, xpos_scale

__all__ = [
    "LearnedPositionEmbedding",
    "RopeScaling",
    "T5RelativeBias",
    "alibi_bias",
    "alibi_bias_from_positions",
    "alibi_slopes",
    "apply_rope",
    "apply_rope_2d",
    "apply_rope_complex",
    "apply_xpos",
    "as_rope_scaling",
    "logn_scale",
    "rerope_attention",
    "rerope_logits",
    "rope_angles",
    "rope_frequencies",
    "sinusoidal_embedding",
    "t5_relative_bucket",
    "xpos_scale",
    "yarn_attention_factor",
    "yarn_ramp",
]
