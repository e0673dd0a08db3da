"""FVSBN (fully visible sigmoid belief net) on binary data (default: 8x8 digits).

    jaxlab train fvsbn                                  # digits
    jaxlab train fvsbn --config.data.name=dna

Prints the validation NLL during training and the test NLL (nats per example) at the end. Measured
2026-12-05 on 2 shared CPU cores: 3000 steps in 8 s wall (0.7 ms/step), test NLL 18.26 nats on the
225 held-out digits (a fair coin per pixel: 44.36). MNIST/UCI results: experiments/results/
binary_density.md.
"""

from jaxlab.configs._density import base_config


def get_config():
  c = base_config("fvsbn")
  c.optim.lr = 3e-3
  c.optim.min_lr = 3e-4
  return c
