"""Shared defaults of the binary density configs (made, nade, fvsbn, pixelcnn); not a config itself."""

import ml_collections

from jaxlab.configs import _sections


def base_config(model: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "density"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # digits | mnist | binarized_mnist | caltech | dna | mushrooms | nips
  c.data.path = ""  # local file/folder; "" = ../shared/data/<name> (mnist: else TFDS mnist)
  c.data.data_dir = ""  # TFDS data_dir for mnist / binarized_mnist (never downloads)
  c.data.binarize_seed = 0  # mnist: the fixed binarisation of valid/test
  c.data.static_binarization = False  # mnist: binarise the training images once too (the published
  # protocol) instead of fresh Bernoulli draws per batch
  c.data.split_seed = 0  # digits, caltech: the seeded split
  c.data.batch_size = 100

  c.model = ml_collections.ConfigDict()
  c.model.name = model  # fvsbn | nade | made | pixelcnn | gated_pixelcnn
  c.model.hidden = (500,)  # NADE: (H,); MADE: one entry per hidden layer
  c.model.num_masks = 1  # MADE: K fixed mask sets (one drawn per step, per microbatch with
  # train.microbatches > 1; all K averaged at test)
  c.model.order_agnostic = True  # MADE: mask sets 1..K-1 use random orderings
  c.model.connectivity_agnostic = True  # MADE: random hidden degrees per mask set
  c.model.direct = False  # MADE: direct (masked) input->output connection
  c.model.mask_seed = 0
  c.model.channels = 32  # PixelCNN
  c.model.num_layers = 5
  c.model.first_kernel = 7
  c.model.dtype = "float32"  # float32 | bfloat16 | float16 compute (params, log-probabilities: float32)

  c.optim = _sections.optim(lr=1e-3, min_lr=1e-4, warmup_steps=100, b2=0.999, weight_decay=0.0,
                            grad_clip=0.0)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 3000
  c.train.log_every = 100
  c.train.eval_every = 1000
  c.train.eval_batches = 1000  # at most this many batches of the validation split (all, here)
  c.train.eval_seed = 0
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 2
  c.train.keep_best = True  # also keep the lowest-val-loss params in WORKDIR/best (model selection)
  # gradient accumulation: each device's rows in this many sequential slices (same maths, less
  # memory; on CPU a smaller working set can also be faster). Randomness (MADE's mask-set draw) is drawn per
  # slice, so a stochastic loss's gradient equals the whole batch's in expectation only.
  c.train.microbatches = 1
  c.train.tensorboard = False

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 500  # test-set evaluation in finish()

  c.mesh = _sections.mesh()

  c.sample = ml_collections.ConfigDict()
  c.sample.num = 16
  c.sample.seed = 0
  c.sample.grid_path = ""  # PNG of samples written at the end of training ("" = none)
  return c
