"""The contrastive image-text task (CLIP or SigLIP) for the generic trainer, and its zero-shot evaluation.

Data: `jaxlab.data.caption_pairs` (config.data.name = "digits" | "emoji"); model: the dual encoder of
`jaxlab.models.clip`; loss: `jaxlab.losses.contrastive`. With config.model.loss_impl = "sharded" and a
mesh whose batch axes (data, fsdp) span more than one device, the loss runs under `shard_map`:
all-gathered CLIP or chunked (ring) SigLIP, so the negatives are always the whole global batch.

The trainer's evaluation is the mean contrastive loss over fixed test batches; `finish` (printed at the
end of `jaxlab train`) adds zero-shot classification of the held-out images by class prompts and
retrieval recall@1/5 in both directions (`zero_shot_report`).
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.configs import MAX_LAYERS, MAX_WIDTH, ConfigError
from jaxlab.data import caption_pairs, pipeline
from jaxlab.losses import contrastive
from jaxlab.models.clip import IMAGE_ENCODERS, DualEncoder, DualEncoderConfig
from jaxlab.models.swin import check_swin_geometry
from jaxlab.models.vit import VIT_POSITIONS
from jaxlab.train import sharding

BATCH_AXES = ("data", "fsdp")
CHOICES = {
    "data.name": ("digits", "emoji"),
    "model.loss": ("clip", "siglip"),
    "model.loss_impl": ("sharded", "dense"),
    "model.image_encoder": IMAGE_ENCODERS,
    "model.image_position": VIT_POSITIONS,
    "model.text_position": ("learned", "rope"),
    "model.dtype": ("float32", "bfloat16", "float16"),
}
MAX_TEXT_LEN = 4096  # caption tokens; the longest caption of digits / emoji is < 200 characters
POSITIVE_INTS = ("data.text_len", "model.patch", "model.image_width", "model.image_layers",
                 "model.image_heads", "model.image_window", "model.image_stages", "model.text_width",
                 "model.text_layers", "model.text_heads", "model.embed_dim", "eval.batch_size")
IMAGE_SIZE = {"digits": 8, "emoji": 32}


# Image-tower options read by one encoder (or position) only: a new run keeps the others at their
# defaults (contrastive_digits', which contrastive_emoji shares), see validate_new_run.
ENCODER_KEYS = {"vit": ("image_position", "image_rope_theta"), "swin": ("image_window",
                                                                        "image_stages")}


def validate_new_run(config, require) -> None:
  """Checks for a config about to start a run (a saved workdir may hold what an older jaxlab
  allowed): the image options of the other encoder, and image_rope_theta without rope2d, were
  ignored without a word."""
  from jaxlab.configs.contrastive_digits import get_config as defaults_config
  from jaxlab.configs.validate import require_unread_at_default
  m, defaults = config.model, defaults_config().model
  for encoder, keys in ENCODER_KEYS.items():
    for key in keys:
      if m.image_encoder != encoder:
        require_unread_at_default(config, f"model.{key}", defaults[key],
                                  f"config.model.image_encoder={encoder!r}", m.image_encoder,
                                  f" (or choose config.model.image_encoder={encoder!r})")
  if m.image_position != "rope2d":
    require_unread_at_default(config, "model.image_rope_theta", defaults.image_rope_theta,
                              "config.model.image_position='rope2d'", m.image_position)
  require(config.data.name == "emoji" or not config.data.path,
          f"config.data.path={config.data.path!r} applies to config.data.name='emoji', not "
          f"{config.data.name!r} (the digits are scikit-learn's own; it would be ignored)")


def validate(config, require) -> None:
  """The contrastive task's config checks (see jaxlab/train/tasks.py)."""
  from jaxlab.configs.validate import require_choice, require_positive_ints, train_microbatches
  for key, choices in CHOICES.items():
    require_choice(config, key, choices)
  require_positive_ints(config, POSITIVE_INTS)
  require(train_microbatches(config) == 1,
          f"config.train.microbatches={train_microbatches(config)} must be 1 for the contrastive "
          "task: its loss couples every image with every caption of the batch")
  d, m = config.data, config.model
  require(d.batch_size >= 2, f"config.data.batch_size={d.batch_size} must be >= 2: a contrastive "
                             "batch of one pair has no negatives (the loss would be 0)")
  require(d.text_len >= 2, f"config.data.text_len={d.text_len} must be >= 2 (text + end token)")
  for key in ("image_layers", "text_layers"):
    require(m[key] <= MAX_LAYERS, f"config.model.{key}={m[key]} must be <= {MAX_LAYERS}")
  require(d.text_len <= MAX_TEXT_LEN,
          f"config.data.text_len={d.text_len} must be <= {MAX_TEXT_LEN}: the captions of these "
          "datasets are a few dozen characters, so longer only pads (and at 200,000 the padded "
          "captions alone took gigabytes)")
  size = IMAGE_SIZE[d.name]
  require(size % m.patch == 0, f"config.model.patch={m.patch} must divide the {size}-px images of "
                               f"config.data.name={d.name!r}")
  for tower in ("image", "text"):
    width, heads = m[f"{tower}_width"], m[f"{tower}_heads"]
    require(width <= MAX_WIDTH, f"config.model.{tower}_width={width} must be <= {MAX_WIDTH:,}")
    require(width % heads == 0, f"config.model.{tower}_heads={heads} does not divide "
                                f"config.model.{tower}_width={width}")
  if m.image_encoder == "swin":
    problem = check_swin_geometry(size, m.patch, m.image_window, m.image_stages)
    require(problem is None, f"config.model.image_encoder='swin' (config.model.patch={m.patch}, "
                             f"image_window={m.image_window}, image_stages={m.image_stages}) on the "
                             f"{size}-px images of config.data.name={d.name!r}: {problem}")
  elif m.image_position == "sincos2d":
    require(m.image_width % 4 == 0, f"config.model.image_width={m.image_width} must be divisible "
                                    "by 4 for image_position='sincos2d'")
  elif m.image_position == "rope2d":
    require(m.image_rope_theta > 1, f"config.model.image_rope_theta={m.image_rope_theta} must be > 1")
    require((m.image_width // m.image_heads) % 4 == 0,
            f"config.model.image_position='rope2d' needs an image head dim divisible by 4; "
            f"image_width/image_heads = {m.image_width // m.image_heads}")
  if m.text_position == "rope":
    require((m.text_width // m.text_heads) % 2 == 0, "config.model.text_position='rope' needs an "
                                                     "even text head dim")
  require(m.mlp_ratio > 0, f"config.model.mlp_ratio={m.mlp_ratio} must be > 0")
  for tower in ("image", "text"):  # each tower's MLP has int(mlp_ratio * width) hidden units
    width = m[f"{tower}_width"]
    hidden = int(m.mlp_ratio * width) if m.mlp_ratio < float("inf") else 0
    require(hidden >= 1, f"config.model.mlp_ratio={m.mlp_ratio} gives the {tower} tower an MLP "
                         f"hidden size of int(mlp_ratio * config.model.{tower}_width={width}) = "
                         f"{hidden}; it must be >= 1")
  if d.name == "digits":
    # The digits split is fixed (caption_pairs.digit_examples: image i of scikit-learn's 1,797 is in
    # "test" when i % 5 == 0), so its size is known here; evaluation takes whole batches of it.
    test_pairs = -(-1797 // 5)
    require(d.batch_size <= test_pairs,
            f"config.data.batch_size={d.batch_size} is more than the {test_pairs} test pairs of "
            "config.data.name='digits', so evaluation would give no batches")
  require(not config.train.keep_best,
          "config.train.keep_best=True would choose parameters by the loss on the held-out test "
          "pairs (the caption datasets have no validation split; val_loss is measured on test); "
          "give --config.train.keep_best=False (also to eval or sample an older run saved with it)")
  recall_at = config.eval.recall_at
  require(isinstance(recall_at, (tuple, list)) and len(recall_at) > 0
          and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in recall_at)
          and list(recall_at) == sorted(set(recall_at)),
          f"config.eval.recall_at={recall_at!r} must be increasing ints >= 1")


def tensor_units(config) -> None:
  return None  # data (and fsdp) parallel only


def build(config) -> "ContrastiveTask":
  return ContrastiveTask(config)


def model_config(config, vocab_size: int) -> DualEncoderConfig:
  m = config.model
  return DualEncoderConfig(
      vocab_size=vocab_size, text_len=config.data.text_len, patch=m.patch,
      image_width=m.image_width, image_layers=m.image_layers, image_heads=m.image_heads,
      image_position=m.image_position, image_rope_theta=m.image_rope_theta,
      image_encoder=m.image_encoder, image_window=m.image_window,
      image_stages=m.image_stages, text_width=m.text_width, text_layers=m.text_layers,
      text_heads=m.text_heads, text_position=m.text_position, mlp_ratio=m.mlp_ratio,
      embed_dim=m.embed_dim, loss=m.loss, dtype=jnp.dtype(m.dtype))


class _PairSource:
  """grain random-access source over a PairSet: {"images", "tokens", "caption_ids"} per example;
  caption_ids number the distinct token rows, so the loss can tell two pairs of one caption apart
  from a negative."""

  def __init__(self, images, tokens):
    self._images, self._tokens = images, tokens
    _, self._caption_ids = np.unique(tokens, axis=0, return_inverse=True)
    self._caption_ids = self._caption_ids.reshape(-1).astype(np.int32)

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, i: int) -> dict:
    return {"images": self._images[i], "tokens": self._tokens[i],
            "caption_ids": self._caption_ids[i]}


def _stack(examples) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class ContrastiveTask:
  """Image-text pairs, the dual encoder and a CLIP/SigLIP loss (global-batch negatives)."""

  train_stream_version = pipeline.STREAM_VERSION  # saved with the iterator state, checked on resume

  def __init__(self, config):
    self.config = config
    self.tokenizer = caption_pairs.CharTokenizer()
    self.train_pairs = caption_pairs.load_pairs(config.data, "train")
    self.test_pairs = caption_pairs.load_pairs(config.data, "test")
    self.batch_size = config.data.batch_size
    for split, pairs in (("training", self.train_pairs), ("test", self.test_pairs)):
      if len(pairs) < self.batch_size:  # no full batch to train on / to evaluate
        raise ConfigError(f"config.data.batch_size={self.batch_size} exceeds the {len(pairs)} "
                          f"{split} pairs of {config.data.name!r}")
    self.model = DualEncoder(model_config(config, self.tokenizer.size),
                             end_id=self.tokenizer.END)
    self._mesh = None

  def data_fingerprint(self) -> str:
    from jaxlab.train.distributed import fingerprint
    return fingerprint(*(part for pairs in (self.train_pairs, self.test_pairs)
                         for part in (pairs.images_NHWC, "\n".join(pairs.captions), pairs.labels_N,
                                      pairs.groups_N, "\n".join(pairs.class_names))))

  def tokens(self, captions) -> np.ndarray:
    return self.tokenizer.encode(captions, self.config.data.text_len)

  @property
  def tokens_per_batch(self) -> int:
    return self.batch_size  # pairs per step

  def train_iterator(self):
    source = _PairSource(self.train_pairs.images_NHWC, self.tokens(self.train_pairs.captions))
    dataset = (grain.MapDataset.source(source).shuffle(seed=pipeline.epoch_shuffle_seed(
        self.config.seed)).repeat()
               .batch(self.batch_size, drop_remainder=True,
                      batch_fn=pipeline.rows_batch_fn(_stack, self._process_rows())))
    return iter(dataset.to_iter_dataset())

  def eval_iterator(self):
    """Fixed test batches (seeded order), at most config.train.eval_batches of them: the logged
    val_loss is the held-out test split's, for watching training only (nothing is chosen by it).
    Full batches only (a contrastive loss has no padding to weight out), so it is a fixed subset of
    the split: with batch 64 and 5 batches, 320 of the digits' 360 test pairs and 640 of emoji's
    880; the zero-shot accuracy and recall@k at the end score every test pair."""
    source = _PairSource(self.test_pairs.images_NHWC, self.tokens(self.test_pairs.captions))
    dataset = (grain.MapDataset.source(source).shuffle(seed=self.config.train.eval_seed)
               .batch(self.batch_size, drop_remainder=True,
                      batch_fn=pipeline.rows_batch_fn(_stack, self._process_rows())))
    for i in range(min(self.config.train.eval_batches, len(dataset))):
      yield dataset[i]

  def init_params(self, rng: jax.Array):
    size = IMAGE_SIZE[self.config.data.name]
    channels = self.train_pairs.images_NHWC.shape[-1]
    images = jnp.zeros((1, size, size, channels), jnp.float32)
    tokens = jnp.zeros((1, self.config.data.text_len), jnp.int32)
    return self.model.init({"params": rng}, images, tokens)["params"]

  def _process_rows(self):
    return sharding.config_process_rows(self.config.mesh, self.batch_size)

  def mesh(self):
    """The trainer's mesh (same config, same devices), for the shard_map of the sharded losses."""
    if self._mesh is None:
      self._mesh = sharding.config_mesh(self.config.mesh)
    return self._mesh

  def upper_bounds(self) -> dict:
    """CLIP's log logit scale is clipped in place after each step at log 100 (Radford et al. 2021)."""
    return {"log_scale": contrastive.CLIP_MAX_LOG_SCALE} if self.config.model.loss == "clip" else {}

  def contrastive_loss(self, params, image_BE, text_BE, caption_ids_B=None) -> jax.Array:
    """The configured loss on embeddings; sharded over the batch axes when they span > 1 device.
    caption_ids_B: pairs that share a caption are no negatives of each other (see the losses)."""
    c = self.config.model
    mesh = self.mesh() if c.loss_impl == "sharded" else None
    shards = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
    ids = dict(text_ids_B=caption_ids_B)
    if c.loss == "clip":
      if shards > 1:
        return contrastive.clip_loss_all_gather(image_BE, text_BE, params["log_scale"], mesh=mesh,
                                                axis_names=BATCH_AXES, **ids)
      return contrastive.clip_loss(image_BE, text_BE, params["log_scale"], **ids)
    if shards > 1:
      return contrastive.siglip_loss_chunked(image_BE, text_BE, params["log_temperature"],
                                             params["bias"], mesh=mesh, axis_names=BATCH_AXES, **ids)
    return contrastive.siglip_loss(image_BE, text_BE, params["log_temperature"], params["bias"],
                                   **ids)

  def loss(self, params, batch: dict, rng: jax.Array, *, train: bool):
    """Contrastive loss of the batch; (loss, (loss * B, B)) so that eval averages per example.
    Pairs of the batch that share a caption (digits has 60 captions for 1,437 training images; the
    two vendor images of an emoji share theirs) are not each other's negatives."""
    del rng, train  # no dropout
    image_BE, text_BE = self.model.apply({"params": params}, batch["images"], batch["tokens"])
    value = self.contrastive_loss(params, image_BE, text_BE, batch.get("caption_ids"))
    b = batch["images"].shape[0]
    return value, (value * b, jnp.asarray(b, jnp.float32))

  # ---------------------------------------------------------------- zero-shot evaluation

  def embed_images(self, params, images_NHWC: np.ndarray, batch: int | None = None) -> np.ndarray:
    return _in_batches(self._encode_image_fn(), params, images_NHWC,
                       batch or self.config.eval.batch_size)

  def embed_texts(self, params, captions, batch: int | None = None) -> np.ndarray:
    return _in_batches(self._encode_text_fn(), params, self.tokens(captions),
                       batch or self.config.eval.batch_size)

  def _encode_image_fn(self):
    if not hasattr(self, "_enc_img"):
      self._enc_img = jax.jit(lambda p, x: self.model.apply({"params": p}, x,
                                                            method=DualEncoder.encode_image))
    return self._enc_img

  def _encode_text_fn(self):
    if not hasattr(self, "_enc_txt"):
      self._enc_txt = jax.jit(lambda p, x: self.model.apply({"params": p}, x,
                                                            method=DualEncoder.encode_text))
    return self._enc_txt

  def zero_shot_metrics(self, params, pairs: caption_pairs.PairSet | None = None) -> dict:
    """Zero-shot accuracy and recall@k both ways on `pairs` (default: the held-out test split).
    Digits: zero_shot_accuracy prompts with the caption templates (so with training captions) and
    zero_shot_accuracy_unseen_prompts with wording no caption uses."""
    pairs = pairs or self.test_pairs
    image_NE = self.embed_images(params, pairs.images_NHWC)

    def accuracy(templates):
      prompts = caption_pairs.class_prompts(pairs, templates)
      flat = [p for per_class in prompts for p in per_class]
      prompt_PE = self.embed_texts(params, flat).reshape(len(prompts), len(prompts[0]), -1)
      return zero_shot_accuracy(image_NE, prompt_PE, pairs.labels_N)

    captions, caption_groups, image_groups = unique_captions(pairs.captions, pairs.groups_N)
    caption_CE = self.embed_texts(params, captions)
    metrics = {"zero_shot_accuracy": accuracy(pairs.templates)}
    if pairs.unseen_templates:
      metrics["zero_shot_accuracy_unseen_prompts"] = accuracy(pairs.unseen_templates)
    for k in self.config.eval.recall_at:
      metrics[f"image_to_text_R@{k}"] = recall_at_k(image_NE, caption_CE, image_groups,
                                                    caption_groups, k)
      metrics[f"text_to_image_R@{k}"] = recall_at_k(caption_CE, image_NE, caption_groups,
                                                    image_groups, k)
    return metrics

  def finish(self, params) -> str:
    metrics = self.zero_shot_metrics(params)
    n = len(self.test_pairs)
    lines = [f"jaxlab: zero-shot on {n} held-out {self.config.data.name} images "
             f"({len(self.test_pairs.class_names)} classes)"]
    width = max(len(k) for k in metrics)
    lines += [f"  {k:{width}s} {v:.4f}" for k, v in metrics.items()]
    return "\n".join(lines)


def _in_batches(fn, params, x: np.ndarray, batch: int) -> np.ndarray:
  """fn(params, x[i:i+batch]) over x with the last batch padded (so one compiled shape); a batch
  larger than x is cut to len(x) (more rows would be padding only)."""
  batch = max(1, min(batch, len(x)))
  outs = []
  for start in range(0, len(x), batch):
    chunk = x[start:start + batch]
    pad = batch - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    outs.append(np.asarray(fn(params, chunk))[:batch - pad])
  return np.concatenate(outs)


def unique_captions(captions, groups_N) -> tuple[list, np.ndarray, np.ndarray]:
  """(the distinct captions in first-occurrence order, the group of each [C], each row's group [N])
  with groups that share a caption merged into one (the first seen): two emoji of one name are a
  hit for each other's caption, which kept only the first emoji's group before."""
  groups = np.asarray(groups_N).tolist()
  parent: dict = {}

  def root(g):
    while parent.setdefault(g, g) != g:
      g = parent[g]
    return g

  first: dict = {}
  for caption, group in zip(captions, groups):
    a, b = root(first.setdefault(caption, group)), root(group)
    if a != b:
      parent[b] = a
  return (list(first), np.asarray([root(g) for g in first.values()]),
          np.asarray([root(g) for g in groups]))


def zero_shot_accuracy(image_NE: np.ndarray, prompt_CTE: np.ndarray, labels_N: np.ndarray) -> float:
  """CLIP's zero-shot classifier (Radford et al. 2021, sec. 3.1.4 / 3.1.4 prompt ensembling): each
  class is the L2-normalised mean of its T prompt embeddings; an image gets the most similar class."""
  image_NE, prompt_CTE = np.asarray(image_NE, np.float64), np.asarray(prompt_CTE, np.float64)
  if image_NE.ndim != 2 or prompt_CTE.ndim != 3 or image_NE.shape[1] != prompt_CTE.shape[2]:
    raise ValueError(f"image_NE [N, E] and prompt_CTE [C, T, E] disagree: {image_NE.shape}, "
                     f"{prompt_CTE.shape}")
  labels_N = np.asarray(labels_N)
  if labels_N.shape != (image_NE.shape[0],):
    raise ValueError(f"labels_N must hold one class per image, shape ({image_NE.shape[0]},), got "
                     f"{labels_N.shape}")
  class_CE = prompt_CTE.mean(axis=1)
  class_CE /= np.linalg.norm(class_CE, axis=1, keepdims=True)
  predicted = np.argmax(image_NE @ class_CE.T, axis=1)
  return float(np.mean(predicted == labels_N))


def recall_at_k(query_QE: np.ndarray, candidate_CE: np.ndarray, query_groups_Q: np.ndarray,
                candidate_groups_C: np.ndarray, k: int) -> float:
  """Fraction of queries with a candidate of the same group among their k most similar candidates.
  Ties count against the query: its best same-group candidate is ranked behind every other-group
  candidate that scores as high (so two identical embeddings never make a hit by their order)."""
  query_QE, candidate_CE = np.asarray(query_QE), np.asarray(candidate_CE)
  query_groups_Q, candidate_groups_C = np.asarray(query_groups_Q), np.asarray(candidate_groups_C)
  for name, x in (("query_QE", query_QE), ("candidate_CE", candidate_CE)):
    if x.ndim != 2:
      raise ValueError(f"{name} must be [count, dim], got shape {x.shape}")
  if query_QE.shape[1] != candidate_CE.shape[1]:
    raise ValueError(f"query_QE and candidate_CE have different dims: {query_QE.shape[1]} vs "
                     f"{candidate_CE.shape[1]}")
  for name, groups, n in (("query_groups_Q", query_groups_Q, query_QE.shape[0]),
                          ("candidate_groups_C", candidate_groups_C, candidate_CE.shape[0])):
    if groups.shape != (n,):
      raise ValueError(f"{name} must hold one group per row, shape ({n},), got {groups.shape}")
  if not 1 <= k:
    raise ValueError(f"k must be >= 1, got {k}")
  scores_QC = query_QE @ candidate_CE.T
  same_QC = candidate_groups_C[None, :] == query_groups_Q[:, None]
  best_Q = np.max(np.where(same_QC, scores_QC, -np.inf), axis=1)  # -inf: no candidate of its group
  ahead_Q = np.sum(~same_QC & (scores_QC >= best_Q[:, None]), axis=1)
  return float(np.mean(np.isfinite(best_Q) & (ahead_Q < k)))
