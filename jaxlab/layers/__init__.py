"""Linen modules that own parameters around the pure functions in jaxlab.attention and jaxlab.positions."""

from jaxlab.layers.attention import MultiHeadAttention
from jaxlab.layers.gau import FlashLayer, GatedAttentionUnit
from jaxlab.layers.mlp import MLP

__all__ = ["MultiHeadAttention", "MLP", "FlashLayer", "GatedAttentionUnit"]
