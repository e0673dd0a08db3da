"""PixelCNN (van den Oord et al. 2016) on binary images (default: 8x8 digits, small net); gated
version with --config.model.name=gated_pixelcnn.

    jaxlab train pixelcnn                               # digits
    jaxlab train pixelcnn --config.data.name=mnist --config.model.channels=64 --config.model.num_layers=7

Measured 2026-12-05 on 2 shared CPU cores (digits): 2000 steps in 94 s wall (26 ms/step); the
lowest validation NLL, 18.20, is at step 1000 (the net overfits the 1,347 training digits after
that; train.keep_best keeps those parameters), test NLL 18.31 nats. MNIST results:
experiments/results/binary_density.md.
"""

from jaxlab.configs._density import base_config


def get_config():
  c = base_config("pixelcnn")
  c.model.channels = 32
  c.model.num_layers = 4
  c.model.first_kernel = 5
  c.train.steps = 2000
  return c
