"""Contrastive image-text pre-training on emoji (Twemoji + Noto, 32x32) with their Unicode names.

    jaxlab train contrastive_emoji    # data: ../shared/data/emoji_captions beside the checkout

The emoji of about 10% of the base emoji (with all their skin-tone variants) are held out, so test
captions are unseen; both vendors' drawings of an emoji are two views of its caption. At the end
`jaxlab train` prints zero-shot category accuracy (10 emoji categories as prompts) and recall@1/5.

The full 2000 steps at batch 128 are hours on 2 CPU cores. Measured short run (2 cores, shared and
loaded machine, 683 ms/step, ~7.5 min): `--config.train.steps=600 --config.data.batch_size=64` gave val
loss 4.51, zero-shot category accuracy 0.280, image->text R@1 0.046 / R@5 0.153, text->image R@1
0.021 / R@5 0.155 on the 880 held-out images (440 unseen captions: chance R@1 is 0.002).
"""

from jaxlab.configs import contrastive_digits


def get_config():
  c = contrastive_digits.get_config()
  c.data.name = "emoji"
  c.data.path = ""  # "" = ../shared/data/emoji_captions beside the checkout
  c.data.text_len = 96
  c.data.batch_size = 128
  c.model.patch = 4
  c.model.image_width = 96
  c.model.image_layers = 3
  c.model.text_width = 96
  c.model.text_layers = 2
  c.model.embed_dim = 96
  c.train.steps = 2000
  c.train.eval_every = 500
  c.train.checkpoint_every = 1000
  return c
