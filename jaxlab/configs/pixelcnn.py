"""PixelCNN (van den Oord et al. 2016) on binary images (default: 8x8 digits, small net); gated
version with --config.model.name=gated_pixelcnn.

    jaxlab train pixelcnn --config.data.name=mnist --config.model.channels=64 --config.model.num_layers=7
"""

from jaxlab.configs._density import base_config


def get_config():
  c = base_config("pixelcnn")
  c.model.channels = 32
  c.model.num_layers = 4
  c.model.first_kernel = 5
  c.train.steps = 2000
  return c
