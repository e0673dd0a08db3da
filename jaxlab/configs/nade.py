"""NADE (Larochelle & Murray 2011) with 500 hidden units on binary data (default: 8x8 digits).

    jaxlab train nade --config.data.name=mnist --config.train.steps=50000
"""

from jaxlab.configs._density import base_config


def get_config():
  c = base_config("nade")
  c.model.hidden = (500,)
  c.optim.lr = 5e-3
  c.optim.min_lr = 5e-4
  return c
