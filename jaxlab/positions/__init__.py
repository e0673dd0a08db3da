"""Position encodings as pure functions."""

from jaxlab.positions.rope import apply_rope, rope_frequencies

__all__ = ["apply_rope", "rope_frequencies"]
