"""Contrastive Predictive Coding (van den Oord et al. 2018) for the generic trainer: the CPC model of
`jaxlab.models.cpc` on scikit-learn's 8x8 digits read as sequences of 8 rows of 8 grey levels (the
paper's image experiment predicts rows of patches below from those above; here a row is a step).

Training and validation loss: CPC's InfoNCE (`jaxlab.losses.cpc.cpc_loss`), negatives from the whole
global batch; the validation split's last batch is filled up with digits from its start that only
serve as negatives, so every validation batch scores against as many negatives as a training batch
(with zero padding, the last batch's loss had fewer and was lower). `finish` (printed at the end of
`jaxlab train`) measures the representation as the paper does, by a linear classifier of the digit
on frozen features (the mean context over the rows), against the same classifier on the raw pixels
and on the untrained CPC the run started from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.data import binary_images
from jaxlab.models.cpc import CPC
from jaxlab.train import sharding

ROWS = COLUMNS = 8  # the digits: 8 steps of 8 features
SPLIT = (1347, 225)  # train, validation; the remaining 225 are test (binary_images' digit sizes)
POSITIVE_INTS = ("model.latent_dim", "model.context_dim", "model.steps", "eval.batch_size")


def load_digit_sequences(split_seed: int) -> dict:
  """{"train", "valid", "test": float32 [N, 8, 8] grey levels / 16; "*_labels": int [N]}: a seeded
  split of scikit-learn's 1,797 digits (shipped in its wheel, no download)."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  order = np.random.default_rng(split_seed).permutation(len(digits.target))
  x = (digits.data / 16.0).astype(np.float32).reshape(-1, ROWS, COLUMNS)[order]
  y = digits.target.astype(np.int32)[order]
  bounds = np.cumsum(SPLIT)
  parts = {"train": slice(0, bounds[0]), "valid": slice(bounds[0], bounds[1]),
           "test": slice(bounds[1], None)}
  return {**{k: x[s] for k, s in parts.items()}, **{f"{k}_labels": y[s] for k, s in parts.items()}}


def validate(config, require) -> None:
  """The CPC task's config checks (see jaxlab/train/tasks.py)."""
  from jaxlab.configs.validate import require_choice, require_positive_ints, train_microbatches
  require_choice(config, "data.name", ("digits",))
  require_positive_ints(config, POSITIVE_INTS)
  m, d = config.model, config.data
  require(isinstance(m.encoder_hidden, int) and not isinstance(m.encoder_hidden, bool)
          and m.encoder_hidden >= 0, f"config.model.encoder_hidden={m.encoder_hidden!r} must be "
                                     "an int >= 0 (0: a linear encoder)")
  require(m.steps < ROWS, f"config.model.steps={m.steps} must be < the {ROWS} rows of a digit: step "
                          "k predicts row t + k from rows up to t")
  for key in ("latent_dim", "context_dim", "encoder_hidden"):
    require(m[key] <= 65536, f"config.model.{key}={m[key]} must be <= 65536")
  require(train_microbatches(config) == 1,
          f"config.train.microbatches={train_microbatches(config)} must be 1 for the CPC task: its "
          "loss takes its negatives from the whole batch")
  require(d.batch_size >= 2, f"config.data.batch_size={d.batch_size} must be >= 2 (one sequence "
                             "alone has only its own rows as negatives)")
  require(d.batch_size <= SPLIT[0], f"config.data.batch_size={d.batch_size} exceeds the {SPLIT[0]} "
                                    "training digits")


def tensor_units(config) -> None:
  return None  # data (and fsdp) parallel only


def build(config) -> "CPCTask":
  return CPCTask(config)


class CPCTask:
  """Digits as row sequences, the CPC model and its InfoNCE loss."""

  def __init__(self, config):
    self.config = config
    self.data = load_digit_sequences(config.data.split_seed)
    self.batch_size = config.data.batch_size
    m = config.model
    self.model = CPC(latent_dim=m.latent_dim, context_dim=m.context_dim, steps=m.steps,
                     encoder_hidden=m.encoder_hidden)

  def data_fingerprint(self) -> str:
    from jaxlab.train.distributed import fingerprint
    return fingerprint(*(self.data[k] for k in sorted(self.data)))

  @property
  def tokens_per_batch(self) -> int:
    return self.batch_size  # sequences per step

  def _rows(self):
    return sharding.config_process_rows(self.config.mesh, self.batch_size)

  def train_iterator(self):
    flat = self.data["train"].reshape(len(self.data["train"]), -1)
    return binary_images.TrainBatches(flat, batch_size=self.batch_size, seed=self.config.seed,
                                      dynamic=False, rows=self._rows())

  def eval_iterator(self):
    """The validation digits in order, in global batches of batch_size rows: "weights" 1 for the
    digits scored, "real" 1 for every row that is a digit. The last batch is filled up with digits
    from the split's start (weight 0, negatives only; none twice in a batch, so zero rows, real 0,
    only where the split holds fewer digits than a batch)."""
    flat = self.data["valid"].reshape(len(self.data["valid"]), -1)
    n, size = len(flat), self.batch_size
    count = -(-n // size)
    if self.config.train.eval_batches:
      count = min(count, self.config.train.eval_batches)
    last = n - (count - 1) * size  # digits scored in the last batch
    fill = min(size - last, (count - 1) * size) if count * size > n else 0
    filled = np.concatenate([flat, flat[:fill]])  # the fill: the split's first digits
    rows = np.arange(size) if self._rows() is None else np.asarray(self._rows())
    # eval_batches pads past the filled split with zero rows of weight 0: those are the non-digits.
    for i, batch in enumerate(binary_images.eval_batches(filled, batch_size=size, max_batches=count,
                                                         rows=self._rows())):
      yield {"x": batch["x"], "weights": (i * size + rows < n).astype(np.float32),
             "real": batch["weights"]}

  def init_params(self, rng: jax.Array):
    return self.model.init({"params": rng}, jnp.zeros((1, ROWS, COLUMNS)))["params"]

  def loss(self, params, batch: dict, rng: jax.Array, *, train: bool):
    """CPC's InfoNCE of the batch; (loss, (loss * n, n)) over its n scored rows (weight 1). Rows
    of weight 0 that are digits ("real", in validation batches) are negatives only; zero rows have
    length 0: neither predicted nor negatives."""
    del rng, train  # no dropout
    x_BTF = batch["x"].reshape(-1, ROWS, COLUMNS)
    weights_B = batch["weights"]
    real_B = batch.get("real", weights_B)
    lengths_B = jnp.where(real_B > 0, ROWS, 0).astype(jnp.int32)
    value = self.model.apply({"params": params}, x_BTF, lengths_B, weights_B > 0, method=CPC.loss)
    count = jnp.sum(weights_B)
    return value, (value * count, count)

  # ---------------------------------------------------------------- linear evaluation

  def initial_params(self):
    """The parameters a run of this config starts from (unboxed): the probe's untrained baseline."""
    from flax import linen as nn
    from jaxlab.train.trainer import init_keys
    return nn.meta.unbox(self.init_params(init_keys(self.config.seed)[0]))

  def features(self, params, x_NTF: np.ndarray) -> np.ndarray:
    """The representation of each digit: its contexts c_t averaged over the rows, [N, C]."""
    fn = jax.jit(lambda p, x: jnp.mean(self.model.apply({"params": p}, x)[1], axis=1))
    size = self.config.eval.batch_size
    return np.concatenate([np.asarray(fn(params, x_NTF[i:i + size]))
                           for i in range(0, len(x_NTF), size)])

  def probe_accuracies(self, params) -> dict:
    """Test accuracy of a logistic-regression classifier of the digit trained on the training
    split's frozen features: CPC's, the untrained CPC's (the parameters the run started from) and
    the raw pixels'."""
    train, test = self.data["train"], self.data["test"]
    untrained = self.initial_params()
    features = {
        "cpc": (self.features(params, train), self.features(params, test)),
        "untrained_cpc": (self.features(untrained, train), self.features(untrained, test)),
        "pixels": (train.reshape(len(train), -1), test.reshape(len(test), -1)),
    }
    return {name: _linear_probe(a, self.data["train_labels"], b, self.data["test_labels"])
            for name, (a, b) in features.items()}

  def finish(self, params) -> str:
    accuracies = self.probe_accuracies(params)
    lines = [f"jaxlab: linear probe of the digit on {len(self.data['test'])} held-out digits "
             "(logistic regression on frozen features, trained on the training digits)"]
    lines += [f"  {name + ' accuracy':24s} {value:.4f}" for name, value in accuracies.items()]
    return "\n".join(lines)


def _linear_probe(train_NF, train_labels, test_NF, test_labels) -> float:
  """Test accuracy of multinomial logistic regression (scikit-learn, L2, features standardised on
  the training split)."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
  probe.fit(train_NF, train_labels)
  return float(probe.score(test_NF, test_labels))
