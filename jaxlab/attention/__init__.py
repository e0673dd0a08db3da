"""Attention variants as pure functions over [batch, length, heads, head_dim] arrays."""

from jaxlab.attention.masks import AttentionMask, make_mask
from jaxlab.attention.blockwise import blockwise_attention
from jaxlab.attention.flash import flash_attention
from jaxlab.attention.linear import (LinearAttentionState, linear_attention,
                                     linear_attention_init_state, linear_attention_prefill,
                                     linear_attention_step)
from jaxlab.attention.performer import orthogonal_gaussian_features, performer_attention
from jaxlab.attention.local import (bigbird_layout, block_layout_from_window, block_sparse_attention,
                                    causal_block_layout, local_attention, strided_layout)
from jaxlab.attention.softmax import choose_implementation, dot_product_attention, xla_attention
from jaxlab.attention import swin
from jaxlab.attention.gau import (FlashDecodeState, flash_init_state, flash_prefill_state, flash_step,
                                  gau_attention, mixed_chunk_attention, scale_offset)

__all__ = ["AttentionMask", "make_mask", "dot_product_attention", "xla_attention",
           "blockwise_attention", "flash_attention", "choose_implementation", "local_attention",
           "block_sparse_attention", "block_layout_from_window", "strided_layout", "bigbird_layout",
           "causal_block_layout",
           "linear_attention", "linear_attention_init_state", "linear_attention_prefill",
           "linear_attention_step",
           "LinearAttentionState", "performer_attention", "orthogonal_gaussian_features", "swin",
           "gau_attention", "mixed_chunk_attention", "scale_offset", "FlashDecodeState",
           "flash_init_state", "flash_prefill_state", "flash_step"]
