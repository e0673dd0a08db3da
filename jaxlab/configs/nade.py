"""NADE (Larochelle & Murray 2011) with 500 hidden units on binary data (default: 8x8 digits).

    jaxlab train nade --config.data.name=mnist --config.train.steps=25000 \
        --config.train.eval_every=2500 --config.train.eval_batches=20

Expected (measured 2026-12-02 on 2 CPU cores, 132 ms/step, 65 min): test NLL 84.13 nats on MNIST with
dynamic training binarisation (published, static binarisation: 88.86; experiments/results/
binary_density.md). Add --config.data.static_binarization=True for the published protocol.
"""

from jaxlab.configs._density import base_config


def get_config():
  c = base_config("nade")
  c.model.hidden = (500,)
  c.optim.lr = 5e-3
  c.optim.min_lr = 5e-4
  return c
