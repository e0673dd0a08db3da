"""jaxlab: attention, position encodings and generative models in JAX/Flax, each tested against a reference."""

__version__ = "0.1.0"
