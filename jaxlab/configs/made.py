"""MADE (Germain et al. 2015) on binary data; the default runs on scikit-learn's 8x8 digits (no download).

    jaxlab train made                                   # digits, 1 hidden layer of 500, one mask
    jaxlab train made --config.model.num_masks=8        # order/connectivity-agnostic, 8 mask sets
    jaxlab train made --config.data.name=mnist --config.train.steps=50000

Prints the validation NLL during training and the test NLL (nats per example) at the end; on 2 CPU
cores the default takes about a minute (measured results: experiments/results/binary_density.md).
"""

from jaxlab.configs._density import base_config


def get_config():
  c = base_config("made")
  c.model.hidden = (500,)
  c.model.num_masks = 1
  return c
