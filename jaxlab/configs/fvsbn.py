"""FVSBN (fully visible sigmoid belief net) on binary data (default: 8x8 digits).

    jaxlab train fvsbn --config.data.name=dna
"""

from jaxlab.configs._density import base_config


def get_config():
  c = base_config("fvsbn")
  c.optim.lr = 3e-3
  c.optim.min_lr = 3e-4
  return c
