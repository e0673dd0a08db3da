"""Contrastive image-text pre-training on emoji (Twemoji + Noto, 32x32) with their Unicode names.

    jaxlab train contrastive_emoji    # data: ../shared/data/emoji_captions beside the checkout

The emoji of about 10% of the base emoji (with all their skin-tone variants) are held out, so test
captions are unseen; both vendors' drawings of an emoji are two views of its caption. At the end
`jaxlab train` prints zero-shot category accuracy (10 emoji categories as prompts) and recall@1/5.

The full 2000 steps at batch 128 have not been timed here. Measured short run
(by hand, 2026-12-05, emoji captions 1.1.0, a quiet 2-core VM, 201 ms/step, 2 min of training):
`--config.train.steps=600 --config.data.batch_size=64` gave val loss 4.09, zero-shot category
accuracy 0.299, image->text R@1 0.059 / R@5 0.210, text->image R@1 0.059 / R@5 0.216 on the 880
held-out images (440 unseen captions: chance R@1 is 0.002). (Before: 4.51, 0.280, 0.046 / 0.153,
0.021 / 0.155 on a loaded machine with the 1.0.0 captions and before pairs sharing a caption stopped
being each other's negatives.)
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
