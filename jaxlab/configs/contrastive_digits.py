"""Contrastive image-text pre-training on scikit-learn's 8x8 digits with caption templates (embedded).

    jaxlab train contrastive_digits                                  # SigLIP (default)
    jaxlab train contrastive_digits --config.model.loss=clip

Needs no download: the 1,797 digits ship inside scikit-learn; captions come from templates such as
"a handwritten seven" or "the digit 7". The test split (every 5th image) is never trained on; at the end
`jaxlab train` prints zero-shot accuracy (images classified by the text embeddings of the digit prompts)
and retrieval recall@1/5. zero_shot_accuracy is zero-shot in CLIP's form only: the images are held
out, but the prompts are training captions (the 60 captions, 6 templates x 10 digits, all occur in
training); zero_shot_accuracy_unseen_prompts prompts in wording no caption uses ("a drawing of a
seven", "the numeral 7", "a seven, handwritten"). contrastive_emoji's test captions are unseen.
On 2 CPU cores (one XLA device each, so the loss runs sharded as chunked SigLIP) the 600 steps took
34 s with compilation on a quiet 2-core VM (31 ms/step).
Measured (SigLIP, seed 0, experiments/results/default_jobs.md): val loss 3.345, zero-shot accuracy
0.822 (0.542 with the unseen prompts), image->text R@1 0.836, text->image R@1 1.000 on the 360
held-out digits (pairs that share a caption are not each other's negatives; the digits have 60
captions).
"""

import ml_collections

from jaxlab.configs import _sections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "contrastive"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # digits | emoji
  c.data.path = ""  # emoji: the folder with emoji.json and the 32-px sheets ("" = ../shared/data/...)
  c.data.data_dir = ""  # TFDS data_dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.text_len = 40  # caption tokens, end token included (longer captions are cut)
  c.data.batch_size = 64  # global batch: all of it gives each example its negatives

  c.model = ml_collections.ConfigDict()
  c.model.loss = "siglip"  # clip | siglip
  c.model.loss_impl = "sharded"  # sharded (all-gather CLIP / chunked SigLIP over devices) | dense
  c.model.patch = 2
  c.model.image_width = 64
  c.model.image_layers = 2
  c.model.image_heads = 4
  c.model.image_encoder = "vit"  # vit | swin (jaxlab/models/swin.py)
  c.model.image_position = "sincos2d"  # vit: sincos2d | learned | rope2d | none (swin: its bias)
  c.model.image_rope_theta = 100.0  # rope2d: RoPE's base (RoPE-ViT's for images; text uses 10000)
  c.model.image_window = 4  # swin: window side in patches (a map no larger is one window)
  c.model.image_stages = 2  # swin: stages (each later one merges 2x2 patches, twice the width)
  c.model.text_width = 64
  c.model.text_layers = 2
  c.model.text_heads = 4
  c.model.text_position = "learned"  # learned | rope
  c.model.mlp_ratio = 2.0
  c.model.embed_dim = 64
  c.model.dtype = "float32"  # float32 | bfloat16 | float16 compute (params, embeddings, loss: float32)

  c.optim = _sections.optim(lr=1e-3, min_lr=1e-4, warmup_steps=50, b2=0.99, weight_decay=0.05,
                            grad_clip=1.0)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 600
  c.train.log_every = 50
  c.train.eval_every = 300
  c.train.eval_batches = 5
  c.train.eval_seed = 1234
  c.train.checkpoint_every = 300
  c.train.keep_checkpoints = 2
  c.train.keep_best = False  # must stay False: val_loss here is the test split's (no validation split)
  # must stay 1: the contrastive loss couples every pair in the batch
  c.train.microbatches = 1
  c.train.tensorboard = True

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256  # for embedding the test split at the end
  c.eval.recall_at = (1, 5)

  c.mesh = _sections.mesh()
  return c
