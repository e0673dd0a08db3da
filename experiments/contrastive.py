"""CLIP versus SigLIP across batch sizes under a controlled design; and the per-device memory of chunked
SigLIP versus all-gathered CLIP on 8 (fake CPU) devices.

    python experiments/contrastive.py                # full sweep (~13 min on 2 quiet cores, more when loaded)
    python experiments/contrastive.py --quick        # tiny grid, writes contrastive_quick.* (1-5 min,
                                                     # nearly all of it XLA compiles)
    python experiments/contrastive.py --report-only  # re-render .md/.png from the .json (no training)

Data: the emoji caption pairs of `jaxlab.data.caption_pairs` (Twemoji + Noto, 32x32; captions
"<name>, <category>, <subcategory>[, <skin tone>]"), read with `load_pairs`. Its "test" split (base
emoji with crc32 % 10 == 0 by `split_keys`, 440 captions, 880 images) is never seen in training; of the "train" split,
base emoji with crc32 % 10 == 1 (~10%; byte-identical drawings follow one key, as in the builder's
split) are held out as a validation split that only chooses the
learning rate. A training step samples B distinct captions without replacement and one of each
caption's vendor images, so a batch never holds the same caption twice (no false negatives from
duplicates; the skin-tone variants of one emoji remain as hard negatives).

Metrics, on the held-out captions: image->text R@1/R@5 (880 image queries against the 440 captions, a
hit when the true caption is among the top k) and text->image R@1/R@5 (440 caption queries against 880
images, a hit when either image of the caption is there); zero-shot category classification by the
mean embedding of the `EMOJI_TEMPLATES` prompts (accuracy and balanced accuracy, next to the
majority-class baseline, because "People & Body" is ~2/3 of the images).

Tier A (the main comparison): the unchanged `clip_loss` / `siglip_loss` of `jaxlab.losses.contrastive`
(with their learnable scalars at the papers' inits) on cheap towers over fixed features: images
average-pooled to 16x16x3 and PCA'd (fit on the training split), captions as hashed character
2-4-gram TF-IDF reduced by truncated SVD (fit on the training captions); a 2-layer GELU MLP per side,
L2-normalised. Batches 16..1024, both losses, two protocols: (1) the same number of examples seen by
every batch (so B=1024 still gets >= 100 steps), (2) the same number of steps for every batch. For
each (protocol, loss, B) the learning rate is chosen from a grid on the validation split (seed 0),
then fresh seeds (10 by default, `--seeds`) are trained at the chosen rate and reported as mean +- sd on the test split. One
program is compiled per (protocol, loss, B) and vmapped over the grid / the seeds; steps run in
`lax.scan`; the learning rate is an argument.

Tier B (a check with the real dual encoder, `jaxlab.models.clip.DualEncoder`, ViT patch 4 on 16x16
images + character Transformer, width 64, 2+2 layers): two batch sizes, both losses, one seed, a fixed
number of steps and learning rate (not tuned).

Memory: loss + gradient compiled for a global batch over 8 devices (XLA_FLAGS forces 8 host devices)
for `siglip_loss_chunked` (ring of ppermutes) and `clip_loss_all_gather`, plus dense one-device
losses; XLA's `memory_analysis()` of the SPMD program, i.e. per device. Nothing is executed there.

Writes <out>/contrastive.{md,json,png} (the .md entirely, interpretation included, from the numbers).
"""

from __future__ import annotations

import os

if __name__ == "__main__" or "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):  # 8 fake CPU devices, before JAX starts (an importer's own count stays)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxlab.data import caption_pairs  # noqa: E402
from jaxlab.losses import contrastive  # noqa: E402
from jaxlab.train import optim  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
EMOJI = ROOT.parent / "shared" / "data" / "emoji_captions"
LOSSES = ("clip", "siglip")
METRICS = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "zs_acc", "zs_bal_acc")
METRIC_NAMES = {"i2t_R@1": "I->T R@1", "i2t_R@5": "I->T R@5", "t2i_R@1": "T->I R@1",
                "t2i_R@5": "T->I R@5", "zs_acc": "zero-shot acc", "zs_bal_acc": "zero-shot bal. acc"}


@dataclasses.dataclass
class Settings:
  batches: tuple = (16, 32, 64, 128, 256, 512, 1024)
  examples: int = 102_400  # protocol (1): examples seen by every batch (B=1024: 100 steps)
  steps: int = 300  # protocol (2): steps for every batch
  lrs: tuple = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the grid, run as one vmapped program (3e-2 was
  # its top until 2026-12-05, chosen by CLIP in 8 of 14 cells)
  seeds: int = 10  # fresh seeds at the chosen rate: a multiple of len(lrs) (the same program, in groups)
  image_dim: int = 64  # PCA dims of the pooled images
  text_dim: int = 128  # SVD dims of the char n-gram TF-IDF
  hidden: int = 256
  embed: int = 64
  warmup: float = 0.05  # fraction of the steps
  weight_decay: float = 1e-4
  tier_b_batches: tuple = (32, 256)
  tier_b_steps: int = 200
  tier_b_lr: float = 1e-3
  memory_batches: tuple = (1024, 4096, 16384)


QUICK = Settings(batches=(16, 64), examples=2048, steps=16, lrs=(1e-3, 1e-2), seeds=2, image_dim=32,
                 text_dim=64, hidden=64, embed=32, tier_b_batches=(16,), tier_b_steps=4,
                 memory_batches=(1024,))


def device_description() -> str:
  from jaxlab.train.host_devices import cores, cpu_model
  return f"{cpu_model()}, {cores()} cores usable, jax {jax.__version__} on {jax.devices()[0].platform}"


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Split:
  """Images of one split indexed by caption: image_caption_M[m] is image m's caption id."""

  images_MHWC: np.ndarray
  image_caption_M: np.ndarray
  labels_M: np.ndarray
  captions: list  # distinct captions, index = caption id
  images_of_C: np.ndarray  # [C, V] image indices of each caption (padded by repetition)
  count_C: np.ndarray  # [C] how many images each caption has


def make_split(images, captions, labels) -> Split:
  ids: dict = {}
  image_caption = np.array([ids.setdefault(c, len(ids)) for c in captions], np.int32)
  per = [[] for _ in ids]
  for m, c in enumerate(image_caption):
    per[c].append(m)
  width = max(len(p) for p in per)
  images_of = np.array([p + [p[0]] * (width - len(p)) for p in per], np.int32)
  return Split(images, image_caption, np.asarray(labels, np.int32), list(ids), images_of,
               np.array([len(p) for p in per], np.int32))


def emoji_split_keys(path: str) -> list[str]:
  """Per emoji entry, the base emoji that decides its split (`caption_pairs.split_keys`), so that
  byte-identical drawings are never on both sides of the validation split either."""
  entries = caption_pairs.emoji_entries(pathlib.Path(path))
  images = caption_pairs.emoji_images(pathlib.Path(path), entries)
  return caption_pairs.split_keys([e["base"] for e in entries], images)


def load_emoji(data_dir: str, path: str):
  """(train, val, test) Splits and the zero-shot prompts [[str] per class] and class names."""
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(name="emoji", path=path, data_dir=data_dir))
  train, test = caption_pairs.load_pairs(cfg, "train"), caption_pairs.load_pairs(cfg, "test")
  keys = emoji_split_keys(path)  # group = entry index
  is_val = np.array([zlib.crc32(keys[g].encode()) % 10 == 1 for g in train.groups_N])
  pick = lambda pairs, mask: make_split(pairs.images_NHWC[mask], [c for c, k in zip(pairs.captions, mask)
                                                                  if k], pairs.labels_N[mask])
  everything = np.ones(len(test), bool)
  return (pick(train, ~is_val), pick(train, is_val), pick(test, everything),
          caption_pairs.class_prompts(test), test.class_names)


def pool(images_NHWC: np.ndarray, size: int) -> np.ndarray:
  n, h, w, c = images_NHWC.shape
  f = h // size
  return images_NHWC.reshape(n, size, f, size, f, c).mean(axis=(2, 4))


class Features:
  """Fixed features fit on the training split: pooled-image PCA and char n-gram TF-IDF + SVD."""

  def __init__(self, train: Split, image_dim: int, text_dim: int, seed: int = 0):
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
    x = pool(train.images_MHWC, 16).reshape(len(train.images_MHWC), -1)
    self.mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - self.mean, full_matrices=False)
    self.components = vt[:image_dim].T
    self.image_scale = s[0] / math.sqrt(len(x))  # the first component gets unit variance
    self.hasher = HashingVectorizer(analyzer="char_wb", ngram_range=(2, 4), n_features=2**15,
                                    alternate_sign=False, norm=None)
    self.tfidf = TfidfTransformer(sublinear_tf=True).fit(self.hasher.transform(train.captions))
    self.svd = TruncatedSVD(text_dim, random_state=seed).fit(self._tfidf(train.captions))
    t = self.svd.transform(self._tfidf(train.captions))
    self.text_scale = float(t[:, 0].std()) or 1.0

  def _tfidf(self, texts):
    return self.tfidf.transform(self.hasher.transform(texts))

  def images(self, images_MHWC) -> np.ndarray:
    x = pool(images_MHWC, 16).reshape(len(images_MHWC), -1)
    return ((x - self.mean) @ self.components / self.image_scale).astype(np.float32)

  def texts(self, texts) -> np.ndarray:
    return (self.svd.transform(self._tfidf(texts)) / self.text_scale).astype(np.float32)


# ----------------------------------------------------------------------------- metrics


def retrieval_metrics(image_ME, caption_CE, image_caption_M, class_KE, labels_M) -> dict:
  """Recall@1/5 both ways (hit = the true caption / an image of the caption) and zero-shot accuracy."""
  image_ME, caption_CE = np.asarray(image_ME, np.float64), np.asarray(caption_CE, np.float64)
  if not (np.all(np.isfinite(image_ME)) and np.all(np.isfinite(caption_CE))):
    return {k: float("nan") for k in METRICS}
  s_MC = image_ME @ caption_CE.T
  out = {}
  order_i2t = np.argsort(-s_MC, axis=1, kind="stable")
  rank_i2t = np.argmax(order_i2t == image_caption_M[:, None], axis=1)  # rank of the true caption
  # text -> image: best rank of any of the caption's images among the M images
  order_t2i = np.argsort(-s_MC.T, axis=1, kind="stable")  # [C, M]
  is_own = image_caption_M[order_t2i] == np.arange(len(caption_CE))[:, None]
  rank_t2i = np.argmax(is_own, axis=1)
  for k in (1, 5):
    out[f"i2t_R@{k}"] = float(np.mean(rank_i2t < k))
    out[f"t2i_R@{k}"] = float(np.mean(rank_t2i < k))
  predicted = np.argmax(image_ME @ np.asarray(class_KE, np.float64).T, axis=1)
  out["zs_acc"] = float(np.mean(predicted == labels_M))
  present = np.unique(labels_M)
  out["zs_bal_acc"] = float(np.mean([np.mean(predicted[labels_M == c] == c) for c in present]))
  return out


def majority_baseline(labels_M) -> dict:
  counts = np.bincount(labels_M)
  return {"zs_acc": float(counts.max() / counts.sum()),
          "zs_bal_acc": float(1.0 / np.count_nonzero(counts)),
          "chance_i2t_R@1": None, "majority_class": int(np.argmax(counts))}


# ----------------------------------------------------------------------------- tier A: MLP towers


def init_mlp(key, d_in, hidden, embed):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (d_in, hidden)) / math.sqrt(d_in), "b1": jnp.zeros(hidden),
          "w2": jax.random.normal(k2, (hidden, embed)) / math.sqrt(hidden)}


def mlp(p, x):
  return contrastive.l2_normalize(jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"])


def loss_scalars(loss: str) -> dict:
  if loss == "clip":
    return {"log_scale": jnp.float32(contrastive.CLIP_INIT_LOG_SCALE)}
  return {"log_temperature": jnp.float32(contrastive.SIGLIP_INIT_LOG_TEMPERATURE),
          "bias": jnp.float32(contrastive.SIGLIP_INIT_BIAS)}


def pair_loss(loss: str, scalars: dict, image_BE, text_BE):
  if loss == "clip":
    return contrastive.clip_loss(image_BE, text_BE, scalars["log_scale"])
  return contrastive.siglip_loss(image_BE, text_BE, scalars["log_temperature"], scalars["bias"])


def schedule(step, steps: int, warmup: float):
  """Linear warmup over `warmup` of the steps, then cosine from 1 to 0.1 (a multiplier of the lr)."""
  w = max(int(round(warmup * steps)), 1)
  progress = jnp.clip((step - w) / max(steps - w, 1), 0.0, 1.0)
  return jnp.where(step < w, (step + 1) / w, 0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * progress)))


def sample_batch(key, images_of_CV, count_C, batch: int):
  """B distinct caption ids and, for each, one of its images (uniformly)."""
  k1, k2 = jax.random.split(key)
  _, caption_B = jax.lax.top_k(jax.random.uniform(k1, count_C.shape), batch)  # distinct, uniform
  which_B = jax.random.randint(k2, (batch,), 0, count_C[caption_B])
  return caption_B, images_of_CV[caption_B, which_B]


def make_optimizer(weight_decay: float, decay_mask=None):
  """Adam (b2 0.98) with decoupled weight decay on the leaves of `decay_mask` (default: every leaf of
  rank >= 2, i.e. tier A's w1 and w2, not b1 or the loss scalars: the library's rule for these towers)."""
  decay_mask = decay_mask or (lambda params: jax.tree_util.tree_map(lambda x: x.ndim >= 2, params))
  return optax.chain(optax.scale_by_adam(b2=0.98), optax.add_decayed_weights(weight_decay, decay_mask))


@functools.partial(jax.jit, static_argnames=("loss", "batch", "steps", "hidden", "embed", "warmup",
                                             "weight_decay"))
def train_mlp_towers(keys_R, lrs_R, image_feats_MD, text_feats_CD, images_of_CV, count_C, *, loss,
                     batch, steps, hidden, embed, warmup, weight_decay):
  """R independent runs (vmapped over keys and learning rates); returns params [R, ...], losses [R, S]."""
  tx = make_optimizer(weight_decay)

  def one(key, lr):
    ki, kt, kd = jax.random.split(key, 3)
    params = {"image": init_mlp(ki, image_feats_MD.shape[1], hidden, embed),
              "text": init_mlp(kt, text_feats_CD.shape[1], hidden, embed),
              "scalars": loss_scalars(loss)}
    opt_state = tx.init(params)

    def step(carry, inputs):
      params, opt_state = carry
      i, k = inputs
      caption_B, image_B = sample_batch(k, images_of_CV, count_C, batch)

      def objective(p):
        return pair_loss(loss, p["scalars"], mlp(p["image"], image_feats_MD[image_B]),
                         mlp(p["text"], text_feats_CD[caption_B]))

      value, grads = jax.value_and_grad(objective)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      rate = lr * schedule(i, steps, warmup)
      params = jax.tree_util.tree_map(lambda p, u: p - rate * u, params, updates)
      return (params, opt_state), value

    (params, _), values = jax.lax.scan(step, (params, opt_state),
                                       (jnp.arange(steps), jax.random.split(kd, steps)))
    return params, values

  return jax.vmap(one)(keys_R, lrs_R)


@jax.jit
def embed_mlp_towers(params_R, image_feats_MD, text_feats_CD, prompt_feats_KTD):
  def one(p):
    prompts = mlp(p["text"], prompt_feats_KTD.reshape(-1, prompt_feats_KTD.shape[-1]))
    class_KE = contrastive.l2_normalize(prompts.reshape(*prompt_feats_KTD.shape[:2], -1).mean(1))
    return mlp(p["image"], image_feats_MD), mlp(p["text"], text_feats_CD), class_KE
  return jax.vmap(one)(params_R)


@dataclasses.dataclass
class EvalSet:
  image_feats: np.ndarray
  caption_feats: np.ndarray
  split: Split


def evaluate_runs(params_R, eval_set: EvalSet, prompt_feats) -> list[dict]:
  images, captions, classes = embed_mlp_towers(params_R, eval_set.image_feats,
                                               eval_set.caption_feats, prompt_feats)
  return [retrieval_metrics(images[r], captions[r], eval_set.split.image_caption_M, classes[r],
                            eval_set.split.labels_M) for r in range(images.shape[0])]


def selection_score(m: dict) -> float:
  """Validation criterion for the learning rate: mean of the four recalls (NaN -> -inf)."""
  v = float(np.mean([m["i2t_R@1"], m["i2t_R@5"], m["t2i_R@1"], m["t2i_R@5"]]))
  return v if math.isfinite(v) else -math.inf


def scalar_summary(params_R) -> dict:
  s = params_R["scalars"]
  if "log_scale" in s:
    return {"logit_scale": [float(v) for v in contrastive.clip_logit_scale(s["log_scale"])]}
  return {"temperature": [float(v) for v in jnp.exp(s["log_temperature"])],
          "bias": [float(v) for v in s["bias"]]}


def tier_a(s: Settings, train: Split, val: EvalSet, test: EvalSet, prompt_feats, train_feats,
           log, rows: list) -> list[dict]:
  """Appends one row per (protocol, B, loss) to `rows` (so partial results can be written)."""
  image_feats, text_feats = train_feats
  n_runs = len(s.lrs)
  for protocol in ("examples", "steps"):
    for batch in s.batches:
      if batch > len(train.captions):
        log(f"skip B={batch}: more than the {len(train.captions)} training captions")
        continue
      steps = max(s.examples // batch, 1) if protocol == "examples" else s.steps
      for loss in LOSSES:
        t0 = time.perf_counter()
        run = functools.partial(train_mlp_towers, image_feats_MD=image_feats, text_feats_CD=text_feats,
                                images_of_CV=train.images_of_C, count_C=train.count_C, loss=loss,
                                batch=batch, steps=steps, hidden=s.hidden, embed=s.embed,
                                warmup=s.warmup, weight_decay=s.weight_decay)
        # 1) the learning-rate grid, seed 0, scored on the validation split
        keys = jnp.stack([jax.random.PRNGKey(0)] * n_runs)
        params, _ = run(keys, jnp.asarray(s.lrs, jnp.float32))
        val_metrics = evaluate_runs(params, val, prompt_feats)
        scores = [selection_score(m) for m in val_metrics]
        lr = s.lrs[int(np.argmax(scores))]
        # 2) fresh seeds 1..s.seeds at the chosen rate (the same compiled program, n_runs at a
        # time), scored on test
        test_metrics, final_losses, scalars = [], [], []
        tail = max(steps // 10, 1)
        for first in range(1, s.seeds + 1, n_runs):
          keys = jnp.stack([jax.random.PRNGKey(seed) for seed in range(first, first + n_runs)])
          params, values = run(keys, jnp.full((n_runs,), lr, jnp.float32))
          test_metrics += evaluate_runs(params, test, prompt_feats)
          final_losses += [float(v) for v in np.asarray(values[:, -tail:]).mean(axis=1)]
          scalars.append(scalar_summary(params))
        row = {"protocol": protocol, "loss": loss, "batch": batch, "steps": steps,
               "examples": steps * batch, "lr": lr, "lr_grid": list(s.lrs),
               "val_scores": scores, "seeds": list(range(1, s.seeds + 1)),
               "final_train_loss": final_losses, "per_seed": test_metrics,
               **{k: [v for group in scalars for v in group[k]] for k in scalars[0]},
               "seconds": time.perf_counter() - t0}
        for k in METRICS:
          vals = np.array([m[k] for m in test_metrics])
          row[k] = float(np.mean(vals))
          row[k + "_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        rows.append(row)
        log(f"A {protocol:8s} {loss:6s} B={batch:5d} steps={steps:5d} lr={lr:.0e} "
            f"val={['%.3f' % v for v in scores]} test I->T R@1 {row['i2t_R@1']:.3f}+-"
            f"{row['i2t_R@1_sd']:.3f} T->I R@1 {row['t2i_R@1']:.3f} bal {row['zs_bal_acc']:.3f} "
            f"({row['seconds']:.0f} s)")
  return rows


# ----------------------------------------------------------------------------- tier B: dual encoder


def tier_b(s: Settings, train: Split, test: Split, prompts, log, rows: list) -> list[dict]:
  from jaxlab.models.clip import DualEncoder, DualEncoderConfig
  tok = caption_pairs.CharTokenizer()
  text_len = min(max(len(c) for c in train.captions + test.captions) + 1, 112)
  train_images = jnp.asarray(pool(train.images_MHWC, 16), jnp.float32)
  train_tokens = jnp.asarray(tok.encode(train.captions, text_len))
  test_images = jnp.asarray(pool(test.images_MHWC, 16), jnp.float32)
  test_tokens = jnp.asarray(tok.encode(test.captions, text_len))
  flat = [p for per_class in prompts for p in per_class]
  prompt_tokens = jnp.asarray(tok.encode(flat, text_len))
  for batch in s.tier_b_batches:
    for loss in LOSSES:
      cfg = DualEncoderConfig(vocab_size=tok.size, text_len=text_len, patch=4, image_width=64,
                              image_layers=2, image_heads=4, text_width=64, text_layers=2,
                              text_heads=4, embed_dim=64, loss=loss)
      model = DualEncoder(cfg, end_id=tok.END)
      t0 = time.perf_counter()
      params = model.init(jax.random.PRNGKey(0), train_images[:2], train_tokens[:2])["params"]
      params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params,
                                      is_leaf=lambda x: hasattr(x, "value"))
      # The trainer's rule (jaxlab.train.optim.decay_mask): weight matrices only; no decay of the
      # token, patch-position or text-position tables, norms, biases or the loss's scalars.
      tx = make_optimizer(s.weight_decay, optim.decay_mask)
      steps = s.tier_b_steps

      @jax.jit
      def train_all(params, key):
        opt_state = tx.init(params)

        def step(carry, inputs):
          params, opt_state = carry
          i, k = inputs
          caption_B, image_B = sample_batch(k, jnp.asarray(train.images_of_C),
                                            jnp.asarray(train.count_C), batch)

          def objective(p):
            img, txt = model.apply({"params": p}, train_images[image_B], train_tokens[caption_B])
            scalars = {k: p[k] for k in ("log_scale", "log_temperature", "bias") if k in p}
            return pair_loss(loss, scalars, img, txt)

          value, grads = jax.value_and_grad(objective)(params)
          updates, opt_state = tx.update(grads, opt_state, params)
          rate = s.tier_b_lr * schedule(i, steps, s.warmup)
          return (jax.tree_util.tree_map(lambda p, u: p - rate * u, params, updates), opt_state), value

        (params, _), values = jax.lax.scan(step, (params, opt_state),
                                           (jnp.arange(steps), jax.random.split(key, steps)))
        return params, values

      params, values = train_all(params, jax.random.PRNGKey(1))
      enc_i = jax.jit(lambda p, x: model.apply({"params": p}, x, method=DualEncoder.encode_image))
      enc_t = jax.jit(lambda p, x: model.apply({"params": p}, x, method=DualEncoder.encode_text))
      image_ME = np.asarray(enc_i(params, test_images))
      caption_CE = np.asarray(enc_t(params, test_tokens))
      prompt_E = np.asarray(enc_t(params, prompt_tokens)).reshape(len(prompts), len(prompts[0]), -1)
      class_KE = prompt_E.mean(1)
      class_KE /= np.linalg.norm(class_KE, axis=1, keepdims=True)
      m = retrieval_metrics(image_ME, caption_CE, test.image_caption_M, class_KE, test.labels_M)
      tail = max(steps // 10, 1)
      row = {"loss": loss, "batch": batch, "steps": steps, "lr": s.tier_b_lr, "seed": 1,
             "text_len": text_len, "final_train_loss": float(np.asarray(values[-tail:]).mean()),
             "seconds": time.perf_counter() - t0, **m}
      rows.append(row)
      log(f"B {loss:6s} B={batch:4d} steps={steps}: I->T R@1 {m['i2t_R@1']:.3f} T->I R@1 "
          f"{m['t2i_R@1']:.3f} bal {m['zs_bal_acc']:.3f} ({row['seconds']:.0f} s)")
  return rows


# ----------------------------------------------------------------------------- memory (8 devices)


def compiled_memory(fn, args, shardings) -> dict:
  """XLA's memory_analysis of jit(fn) for these shardings (per device for an SPMD program)."""
  compiled = jax.jit(fn, in_shardings=shardings).lower(*args).compile()
  m = compiled.memory_analysis()
  temp, arg, out = m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes
  return {"temp_bytes": int(temp), "argument_bytes": int(arg), "output_bytes": int(out),
          "peak_bound_bytes": int(temp + arg + out)}


def memory_rows(global_batches, dim: int) -> list[dict]:
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  split, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  rows = []
  for b in global_batches:
    emb = jax.ShapeDtypeStruct((b, dim), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    ids = jax.ShapeDtypeStruct((b,), jnp.int32)  # caption ids (the training task passes them)
    grad = lambda f, n: jax.value_and_grad(f, argnums=tuple(range(n)))
    cases = {
        "SigLIP chunked (ring), 8 devices": (
            grad(lambda i, t, lt, bb: contrastive.siglip_loss_chunked(i, t, lt, bb, mesh=mesh), 4),
            (emb, emb, scalar, scalar), (split, split, repl, repl)),
        "CLIP all-gather, 8 devices": (
            grad(lambda i, t, sc: contrastive.clip_loss_all_gather(i, t, sc, mesh=mesh), 3),
            (emb, emb, scalar), (split, split, repl)),
        "SigLIP chunked (ring) with caption ids, 8 devices": (
            grad(lambda i, t, lt, bb, n: contrastive.siglip_loss_chunked(
                i, t, lt, bb, mesh=mesh, text_ids_B=n), 4),
            (emb, emb, scalar, scalar, ids), (split, split, repl, repl, split)),
        "CLIP all-gather with caption ids, 8 devices": (
            grad(lambda i, t, sc, n: contrastive.clip_loss_all_gather(i, t, sc, mesh=mesh,
                                                                      text_ids_B=n), 3),
            (emb, emb, scalar, ids), (split, split, repl, split)),
        "SigLIP dense, 1 device": (grad(contrastive.siglip_loss, 4), (emb, emb, scalar, scalar),
                                   (single,) * 4),
        "CLIP dense, 1 device": (grad(contrastive.clip_loss, 3), (emb, emb, scalar), (single,) * 3),
    }
    for name, (fn, args, shardings) in cases.items():
      rows.append({"global_batch": b, "dim": dim, "loss": name, **compiled_memory(fn, args, shardings)})
  return rows


# ----------------------------------------------------------------------------- report


def mib(x: float) -> str:
  return f"{x / 2**20:.2f}"


def cell(rows, protocol, loss, batch):
  return next((r for r in rows if r["protocol"] == protocol and r["loss"] == loss
               and r["batch"] == batch), None)


def seed_r1(r) -> np.ndarray:
  """The mean of the two R@1s, per seed."""
  return np.array([(m["i2t_R@1"] + m["t2i_R@1"]) / 2 for m in r["per_seed"]])


def mean_r1(r) -> tuple[float, float]:
  """Mean of the two R@1s per seed -> (mean, sd) over seeds."""
  v = seed_r1(r)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def gaps(rows, protocol) -> list[dict]:
  """SigLIP - CLIP on the mean R@1 per batch, with the standard error of the paired per-seed
  differences (seed k gives both losses the same initialisation and batches)."""
  out = []
  for batch in sorted({r["batch"] for r in rows if r["protocol"] == protocol}):
    c, s = cell(rows, protocol, "clip", batch), cell(rows, protocol, "siglip", batch)
    if c is None or s is None:
      continue
    d = seed_r1(s) - seed_r1(c)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    out.append({"batch": batch, "clip": mean_r1(c)[0], "siglip": mean_r1(s)[0],
                "gap": float(d.mean()), "se": se, "clip_lr_at_top": c["lr"] == max(c["lr_grid"]),
                "seeds": len(d)})
  return out


def _p_beyond_two_se(seeds: int) -> float:
  """P(|t| > 2) for a t distribution with seeds - 1 degrees of freedom (a mean of paired differences
  over that many seeds crossing 2 standard errors by chance)."""
  from scipy import stats
  return float(2 * stats.t.sf(2.0, max(seeds - 1, 1)))


def verdict(g: list[dict]) -> dict:
  """What the SigLIP - CLIP gaps of one protocol show: per-batch labels and the paper's two claims."""
  seeds = min(x["seeds"] for x in g)
  label = lambda x: ("SigLIP ahead" + (", CLIP's rate at the grid's top" if x.get("clip_lr_at_top")
                                       else "") if x["gap"] > 2 * x["se"] else "CLIP ahead"
                     if x["gap"] < -2 * x["se"] else "within 2 s.e.")
  small = [x for x in g if x["batch"] <= 32] or g[:1]
  large = [x for x in g if x["batch"] >= 512] or g[-1:]
  small_gap = float(np.mean([x["gap"] for x in small]))
  large_gap = float(np.mean([x["gap"] for x in large]))
  large_abs = float(np.mean([abs(x["gap"]) for x in large]))
  small_sig = all(x["gap"] > 2 * x["se"] for x in small)
  small_clip = all(x["gap"] < -2 * x["se"] for x in small)
  # A gap that changes sign, with the other loss clearly ahead at large batch, reverses: not convergence.
  n_large_against = sum((x["gap"] < -2 * x["se"]) if small_gap > 0 else (x["gap"] > 2 * x["se"])
                        for x in large)
  reverses = bool(small_gap * large_gap < 0 and n_large_against >= 1)
  converge = large_abs < abs(small_gap) and not reverses
  n_small_sig = sum(x["gap"] > 2 * x["se"] for x in small)
  small_partial = bool(small_gap > 0 and n_small_sig >= 1 and not small_sig)
  partial = bool(small_partial and converge)
  return {"partial": partial, "small_partial": small_partial, "n_small_sig": n_small_sig, "n_small": len(small), "reverses": reverses,
          "large_gap": large_gap, "n_large_against": n_large_against, "n_large": len(large), "parts": ", ".join(f"B={x['batch']}: {x['gap'] * 100:+.1f} +- {x['se'] * 100:.1f} "
                             f"({label(x)})" for x in g),
          "small_gap": small_gap, "large_abs": large_abs, "small_sig": small_sig,
          "small_clip": small_clip, "converge": converge, "holds": bool(small_sig and converge),
          "n_sig": sum(label(x).startswith("SigLIP ahead") for x in g),
          "seeds": seeds, "p_cross": _p_beyond_two_se(seeds),
          "n_clip": sum(label(x) == "CLIP ahead" for x in g), "n": len(g)}


def trend(rows, protocol, loss) -> str:
  rs = sorted((r for r in rows if r["protocol"] == protocol and r["loss"] == loss),
              key=lambda r: r["batch"])
  v = [mean_r1(r)[0] for r in rs]
  best = rs[int(np.argmax(v))]
  return (f"{loss.upper() if loss == 'clip' else 'SigLIP'} {v[0]:.3f} at B={rs[0]['batch']} -> "
          f"{v[-1]:.3f} at B={rs[-1]['batch']} (best {max(v):.3f} at B={best['batch']})")


def interpretation(rows, tier_b_rows, baseline=None) -> list[str]:
  lines, verdicts = [], {}
  for protocol, name in (("examples", "same examples seen"), ("steps", "same number of steps")):
    g = gaps(rows, protocol)
    if not g:
      continue
    v = verdicts[name] = verdict(g)
    small_text = ("SigLIP is clearly ahead" if v["small_sig"] else "CLIP is clearly ahead"
                  if v["small_clip"] else
                  f"SigLIP is ahead, but beyond 2 s.e. in only {v['n_small_sig']} of {v['n_small']} "
                  "batches" if v["small_partial"] else "neither loss is clearly ahead")
    lines.append(
        f"- **Protocol: {name}.** SigLIP minus CLIP, mean of I->T and T->I R@1 in points (+- one "
        f"standard error of the paired per-seed differences): {v['parts']}. At B <= 32 {small_text} (mean gap "
        f"{v['small_gap'] * 100:+.1f}); at B >= 512 the mean gap is {v['large_gap'] * 100:+.1f} "
        f"(mean |gap| {v['large_abs'] * 100:.1f}), "
        + (f"the other sign, with the other loss beyond 2 s.e. in {v['n_large_against']} of "
           f"{v['n_large']} batches: the gap reverses rather than closing. " if v["reverses"] else
           f"{'smaller' if v['converge'] else 'not smaller'} than at small batch. ")
        + f"SigLIP clearly ahead "
        f"in {v['n_sig']} of {v['n']} batches, CLIP clearly ahead in {v['n_clip']} (chance alone "
        f"gives {v['n'] * v['p_cross']:.1f} of {v['n']} with {v['seeds']} seeds: a 2 s.e. crossing "
        f"has probability {v['p_cross']:.2f} under a t distribution with {v['seeds'] - 1} degrees "
        f"of freedom). Mean R@1 vs batch: "
        f"{trend(rows, protocol, 'clip')}; {trend(rows, protocol, 'siglip')}. The paper's pattern "
        f"(sigmoid clearly ahead at small batch, converging as the batch grows) "
        f"**{'holds' if v['holds'] else 'holds only weakly (in direction, within a few s.e.)' if v['partial'] else 'does not hold'}** in this protocol.")
  zs = []
  for protocol, name in (("examples", "same examples"), ("steps", "same steps")):
    pr = [r for r in rows if r["protocol"] == protocol]
    d = {b: cell(rows, protocol, "siglip", b)["zs_bal_acc"] - cell(rows, protocol, "clip", b)["zs_bal_acc"]
         for b in sorted({r["batch"] for r in pr})
         if cell(rows, protocol, "clip", b) and cell(rows, protocol, "siglip", b)}
    if d:
      zs.append(f"{name}: SigLIP - CLIP balanced accuracy {np.mean([v for b, v in d.items() if b <= 32]) * 100:+.1f} "
                f"points at B <= 32 and {np.mean([v for b, v in d.items() if b >= 128] or [float('nan')]) * 100:+.1f} "
                f"at B >= 128")
  if zs and baseline:
    lo = min(r["zs_acc"] for r in rows)
    hi = max(r["zs_acc"] for r in rows)
    blo, bhi = min(r["zs_bal_acc"] for r in rows), max(r["zs_bal_acc"] for r in rows)
    lines.append(f"- **Zero-shot categories** (not what the rate was chosen for): balanced accuracy "
                 f"{blo:.3f}-{bhi:.3f} against {baseline['zs_bal_acc']:.3f} for the majority class, but "
                 f"plain accuracy {lo:.3f}-{hi:.3f}, {'below' if hi < baseline['zs_acc'] else 'against'} "
                 f"the majority-class {baseline['zs_acc']:.3f} (one category, People & Body with its skin-tone "
                 f"variants, holds that share of the test images). " + "; ".join(zs) +
                 f" (per-cell sd over seeds of balanced accuracy: "
                 f"{min(r['zs_bal_acc_sd'] for r in rows) * 100:.1f}-"
                 f"{max(r['zs_bal_acc_sd'] for r in rows) * 100:.1f} points).")
  if tier_b_rows:
    parts = []
    for batch in sorted({r["batch"] for r in tier_b_rows}):
      get = {r["loss"]: r for r in tier_b_rows if r["batch"] == batch}
      if len(get) == 2:
        m = lambda r: (r["i2t_R@1"] + r["t2i_R@1"]) / 2
        parts.append(f"B={batch}: CLIP {m(get['clip']):.3f}, SigLIP {m(get['siglip']):.3f} "
                     f"(bal. acc {get['clip']['zs_bal_acc']:.3f} vs {get['siglip']['zs_bal_acc']:.3f})")
    lines.append("- **Tier B (real dual encoder, one seed, untuned lr):** mean R@1 " + "; ".join(parts) +
                 ". One seed, one rate and few steps: a check that the code path works with the real "
                 "towers and of the direction only, not evidence about the size of any gap.")
  edge = [f"{r['protocol']}/{r['loss']}/B={r['batch']}" for r in rows
          if r["lr"] in (min(r["lr_grid"]), max(r["lr_grid"]))]
  lines.append(f"- **Learning-rate grid:** {len(edge)} of {len(rows)} cells chose a rate at the edge of "
               f"the grid{' (' + ', '.join(edge) + ')' if edge else ''}"
               f"{'; there the optimum may lie outside it' if edge else ''}." +
               "".join(f" {loss.upper() if loss == 'clip' else 'SigLIP'} chose the top rate in "
                       f"{sum(r['lr'] == max(r['lr_grid']) for r in rows if r['loss'] == loss)} and "
                       f"the bottom rate in "
                       f"{sum(r['lr'] == min(r['lr_grid']) for r in rows if r['loss'] == loss)} of its "
                       f"{sum(r['loss'] == loss for r in rows)} cells." for loss in LOSSES) +
               (" CLIP hit the top of the grid more often, so if anything CLIP is the under-tuned "
                "loss, which would inflate a SigLIP lead: a SigLIP lead in a cell where CLIP chose "
                "the top rate is the weakest evidence."
                if sum(r["lr"] == max(r["lr_grid"]) for r in rows if r["loss"] == "clip") >
                sum(r["lr"] == max(r["lr_grid"]) for r in rows if r["loss"] == "siglip") else ""))
  sig = [r for r in rows if r["loss"] == "siglip" and "bias" in r]
  if sig:
    biases = [b for r in sig for b in r["bias"]]
    temps = [t for r in sig for t in r["temperature"]]
    scales = [c for r in rows if "logit_scale" in r for c in r["logit_scale"]]
    lines.append(f"- **Learned scalars:** SigLIP's bias ended in [{min(biases):.1f}, {max(biases):.1f}] "
                 f"(init -10) and its temperature in [{min(temps):.1f}, {max(temps):.1f}] (init 10); "
                 f"CLIP's logit scale in [{min(scales):.1f}, {max(scales):.1f}] (init 14.3, clamp 100).")
  held = [n for n, v in verdicts.items() if v["holds"]]
  if held:
    answer = f"Yes, in the protocol(s) {', '.join(held)} (see above)."
  else:
    why = []
    for n, v in verdicts.items():
      if v["partial"]:
        why.append(f"with {n}, SigLIP leads at B <= 32 by {v['small_gap'] * 100:+.1f} points on average "
                   f"(beyond 2 s.e. in {v['n_small_sig']} of {v['n_small']} batches) and the gap "
                   "shrinks at large batch: the paper's direction, but a small and fragile effect")
      elif v["reverses"]:
        why.append(f"with {n}, the gap changes sign: {v['small_gap'] * 100:+.1f} points at B <= 32 "
                   f"and {v['large_gap'] * 100:+.1f} at B >= 512, the other loss beyond 2 s.e. in "
                   f"{v['n_large_against']} of {v['n_large']} large batches")
      elif v["small_sig"]:
        why.append(f"with {n}, SigLIP is ahead at small batch but the gap does not shrink at large batch")
      elif v["small_clip"]:
        why.append(f"with {n}, CLIP, not SigLIP, is ahead at small batch")
      else:
        why.append(f"with {n}, the small-batch gap is within noise")
    partial = [n for n, v in verdicts.items() if v["partial"]]
    answer = ("Only weakly, not as a clear effect: " if partial else
              "No, not under this controlled design: ") + "; ".join(why) + "."
  lines.append(
      "- **Does the SigLIP paper's finding reproduce?** " + answer +
      " What bounds the comparison (these are properties of the setup, not measured effects): the "
      "paper trained ViT/text-Transformer towers from scratch on billions of web pairs, each seen about "
      "once, where small batches are far from convergence; here small MLP towers over fixed features "
      "see ~3,000 training captions for many epochs (the final train losses in the tables show how far "
      "they fit them), so the numbers measure generalisation to unseen captions more than "
      "optimisation. B=1024 is a third of the training captions, far below the paper's 32k-1M range, "
      "and the skin-tone variants of one emoji stay in a batch as near-duplicate negatives.")
  return lines


def _saved_settings(saved: dict) -> Settings:
  """The Settings a saved .json was made with (JSON turned its tuples into lists)."""
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["settings"].items()}
  fields.setdefault("seeds", len(fields["lrs"]))  # saved before 2026-12-05: one seed per grid rate
  return Settings(**fields)


def rerender(out: pathlib.Path, stem: str) -> dict:
  """Writes the .md and .png again from the .json of a finished run (its device, command, time)."""
  saved = json.loads((out / f"{stem}.json").read_text())
  write_results(out, stem, _saved_settings(saved),
                saved["tier_a"], saved["tier_b"], saved["memory"], saved["majority_baseline"],
                saved["counts"], None, saved["wall_seconds"], saved["complete"],
                device=saved["device"], cmd=saved["command"], rerendered=True)
  return saved


def write_results(out: pathlib.Path, stem: str, s: Settings, rows, tier_b_rows, memory, baseline,
                  counts, argv, wall: float, complete: bool, device: str | None = None,
                  cmd: str | None = None, rerendered: bool = False) -> None:
  out.mkdir(parents=True, exist_ok=True)
  device = device or device_description()
  cmd = cmd or "python experiments/contrastive.py" + ("" if not argv else " " + " ".join(argv))
  lines = ["# CLIP vs SigLIP across batch sizes (controlled); memory of chunked SigLIP vs all-gathered CLIP",
           "", "Generated entirely by `experiments/contrastive.py`; do not edit by hand.", "",
           f"Device: {device}. Command: `{cmd}`. Total wall time {wall / 60:.1f} min"
           f"{'' if complete else ' (PARTIAL: the run was still going when this was written)'}."
           + (f" Text and plot re-rendered from {stem}.json by `--report-only`." if rerendered else ""),
           "", "## Design", "",
           f"Emoji caption pairs (`load_pairs`, Twemoji + Noto 32x32): {counts['train']} training "
           f"captions ({counts['train_images']} images), {counts['val']} validation captions "
           f"(base emoji with crc32 % 10 == 1, only for choosing the learning rate), {counts['test']} "
           f"held-out test captions ({counts['test_images']} images, base emoji never seen). Each step "
           "samples B distinct captions and one vendor image of each, so no caption appears twice in a "
           "batch. Metrics on test: I->T R@k (each image against all test captions), T->I R@k (each "
           "caption against all test images; either vendor image counts), zero-shot category accuracy "
           "and balanced accuracy with the mean embedding of the prompts "
           f"{list(caption_pairs.EMOJI_TEMPLATES)}. Majority-class baseline on test: accuracy "
           f"{baseline['zs_acc']:.3f}, balanced accuracy {baseline['zs_bal_acc']:.3f}; chance R@1 "
           f"I->T {1 / counts['test']:.4f}.", "",
           f"**Tier A** (main): the unchanged `clip_loss` (learnable log-scale, init log 1/0.07, clamp "
           f"100) and `siglip_loss` (t' = log 10, b = -10) on a 2-layer GELU MLP per side "
           f"({s.hidden} hidden, {s.embed}-d L2-normalised output) over fixed features: images "
           f"average-pooled to 16x16x3 and PCA'd to {s.image_dim} dims, captions as hashed char "
           f"2-4-gram TF-IDF reduced by SVD to {s.text_dim} dims (both fit on the training split). "
           f"Adam (b2 = 0.98) with decoupled weight decay {s.weight_decay}, {s.warmup:.0%} linear "
           "warmup then cosine to 0.1x. Protocol (1) 'examples': every batch sees "
           f"{s.examples:,} examples (steps = {s.examples:,} / B); protocol (2) 'steps': every batch "
           f"runs {s.steps} steps. Per (protocol, loss, B): learning rate chosen from "
           f"{list(s.lrs)} by the mean of the four recalls on the validation split (seed 0), then "
           f"{s.seeds} fresh seeds (1..{s.seeds}) at that rate; mean +- sd over seeds on test.",
           "",
           f"**Tier B** (check): `jaxlab.models.clip.DualEncoder` (ViT patch 4 on 16x16 images, char "
           "Transformer, width 64, 2 + 2 layers, embed 64), batches "
           f"{list(s.tier_b_batches)}, {s.tier_b_steps} steps, lr {s.tier_b_lr} (not tuned), seed 1; the "
           "same Adam, weight decay on weight matrices only (`jaxlab.train.optim.decay_mask`).",
           ""]
  for protocol, title in (("examples", "Tier A, protocol (1): same examples seen"),
                          ("steps", "Tier A, protocol (2): same number of steps")):
    prow = [r for r in rows if r["protocol"] == protocol]
    if not prow:
      continue
    lines += [f"## {title}", "",
              "| B | steps | lr CLIP | lr SigLIP | I->T R@1 CLIP | I->T R@1 SigLIP | T->I R@1 CLIP | "
              "T->I R@1 SigLIP | bal. acc CLIP | bal. acc SigLIP | SigLIP - CLIP, mean R@1 |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    g = {x["batch"]: x for x in gaps(rows, protocol)}
    for batch in sorted({r["batch"] for r in prow}):
      c, sg = cell(rows, protocol, "clip", batch), cell(rows, protocol, "siglip", batch)
      if c is None or sg is None:
        continue
      f = lambda r, k: f"{r[k]:.3f} +- {r[k + '_sd']:.3f}"
      x = g[batch]
      lines.append(f"| {batch} | {c['steps']} | {c['lr']:.0e} | {sg['lr']:.0e} | {f(c, 'i2t_R@1')} | "
                   f"{f(sg, 'i2t_R@1')} | {f(c, 't2i_R@1')} | {f(sg, 't2i_R@1')} | "
                   f"{f(c, 'zs_bal_acc')} | {f(sg, 'zs_bal_acc')} | "
                   f"{x['gap'] * 100:+.1f} +- {x['se'] * 100:.1f} |")
    lines += ["", "All metrics (mean over seeds; sd in the .json), learned scalars (seed mean) and "
              "cell time (grid + seeds):", "",
              "| loss | B | steps | lr | I->T R@1 | I->T R@5 | T->I R@1 | T->I R@5 | zero-shot acc | "
              "bal. acc | train loss | scalars | s |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in sorted(prow, key=lambda r: (r["loss"], r["batch"])):
      if "logit_scale" in r:
        sc = f"scale {np.mean(r['logit_scale']):.1f}"
      else:
        sc = f"t {np.mean(r['temperature']):.1f}, b {np.mean(r['bias']):.1f}"
      lines.append(f"| {r['loss']} | {r['batch']} | {r['steps']} | {r['lr']:.0e} | "
                   + " | ".join(f"{r[k]:.3f}" for k in METRICS) +
                   f" | {np.mean(r['final_train_loss']):.3f} | {sc} | {r['seconds']:.0f} |")
    lines.append("")
  if rows:
    lines += [f"![R@1 and balanced zero-shot accuracy vs batch]({stem}.png)", ""]
  if tier_b_rows:
    lines += ["## Tier B: the real dual encoder (one seed, untuned lr)", "",
              "| loss | B | steps | I->T R@1 | I->T R@5 | T->I R@1 | T->I R@5 | zero-shot acc | bal. acc | "
              "train loss | s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in tier_b_rows:
      lines.append(f"| {r['loss']} | {r['batch']} | {r['steps']} | " +
                   " | ".join(f"{r[k]:.3f}" for k in METRICS) +
                   f" | {r['final_train_loss']:.3f} | {r['seconds']:.0f} |")
    lines.append("")
  if rows:
    lines += ["## Reading (generated from the numbers above)", ""] + interpretation(rows, tier_b_rows,
                                                                              baseline)
    lines.append("")
  lines += ["## Peak memory per device: chunked SigLIP vs all-gathered CLIP", "",
            "Loss + gradient (embeddings and scalars) compiled for a global batch split over 8 fake CPU "
            "devices; XLA `compiled.memory_analysis()` of the SPMD program (per device). `temp` is XLA's "
            "scratch; `peak bound` = temp + arguments + outputs. Dense one-device losses for reference.",
            "", "| global batch | dim | loss | temp MiB | peak bound MiB |",
            "| ---: | ---: | --- | ---: | ---: |"]
  for r in memory:
    lines.append(f"| {r['global_batch']} | {r['dim']} | {r['loss']} | {mib(r['temp_bytes'])} | "
                 f"{mib(r['peak_bound_bytes'])} |")
  for with_ids in ("", " with caption ids"):
    ratios = []
    for b in sorted({r["global_batch"] for r in memory}):
      get = lambda name: next((r for r in memory if r["global_batch"] == b and r["loss"] == name),
                              None)
      clip = get(f"CLIP all-gather{with_ids}, 8 devices")
      sig = get(f"SigLIP chunked (ring){with_ids}, 8 devices")
      if clip and sig:  # (a .json from before 2026-12-05 has no rows with ids)
        ratios.append(f"{b}: {clip['peak_bound_bytes'] / sig['peak_bound_bytes']:.1f}x")
    if ratios:
      lines += ["", f"All-gathered CLIP / chunked SigLIP peak bound per device{with_ids}: " +
                ", ".join(ratios)]
  lines.append("")
  from jaxlab import experiment_results
  experiment_results.write(out, stem, "\n".join(lines), {
      "device": device, "command": cmd, "settings": dataclasses.asdict(s), "wall_seconds": wall,
      "complete": complete, "counts": counts, "majority_baseline": baseline, "tier_a": rows,
      "tier_b": tier_b_rows, "memory": memory})
  if rows:
    plot(out / f"{stem}.png", rows)


def plot(path: pathlib.Path, rows) -> None:
  try:
    import matplotlib
  except ImportError:
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = (("i2t_R@1", "image->text R@1"), ("t2i_R@1", "text->image R@1"),
          ("zs_bal_acc", "zero-shot balanced acc"))
  protocols = [p for p in ("examples", "steps") if any(r["protocol"] == p for r in rows)]
  fig, axes = plt.subplots(len(protocols), 3, figsize=(13, 3.4 * len(protocols)), squeeze=False)
  for row_axes, protocol in zip(axes, protocols):
    for ax, (key, title) in zip(row_axes, keys):
      for loss, style in (("clip", "o-"), ("siglip", "s-")):
        rs = sorted((r for r in rows if r["protocol"] == protocol and r["loss"] == loss),
                    key=lambda r: r["batch"])
        ax.errorbar([r["batch"] for r in rs], [r[key] for r in rs], yerr=[r[key + "_sd"] for r in rs],
                    fmt=style, capsize=3, label=loss)
      ax.set_xscale("log", base=2)
      ax.set_xlabel("batch")
      ax.set_title(f"{title} ({'same examples' if protocol == 'examples' else 'same steps'})")
      ax.grid(alpha=0.3)
    row_axes[0].legend()
  fig.suptitle("CLIP vs SigLIP, emoji captions, MLP towers on fixed features (mean +- sd over seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------------------- main


def rerun_tier_b(out: pathlib.Path, stem: str, args, argv, log) -> dict:
  """Tier B again with the settings of <out>/<stem>.json, its tier A and memory rows kept; the command
  and wall time recorded are the original run's plus this one's."""
  saved = json.loads((out / f"{stem}.json").read_text())
  if not saved["complete"]:
    raise SystemExit(f"{out / stem}.json is from an unfinished run; run the whole sweep instead")
  s = _saved_settings(saved)
  t0 = time.perf_counter()
  train, _, test, prompts, _ = load_emoji(args.data_dir, args.emoji)
  tier_b_rows = []
  tier_b(s, train, test, prompts, log, tier_b_rows)
  cmd = (f"{saved['command']}`, then tier B re-run by `python experiments/contrastive.py "
         f"{' '.join(argv)}")
  write_results(out, stem, s, saved["tier_a"], tier_b_rows, saved["memory"], saved["majority_baseline"],
                saved["counts"], None, saved["wall_seconds"] + time.perf_counter() - t0, True,
                device=saved["device"] if saved["device"] == device_description() else
                f"{saved['device']} (tier B re-run on {device_description()})", cmd=cmd)
  log(f"wrote {out / (stem + '.md')}")
  return json.loads((out / f"{stem}.json").read_text())


def main(argv=None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny grid; writes <out>/contrastive_quick.*")
  parser.add_argument("--batches", type=str, default=None, help="comma-separated batches (tier A)")
  parser.add_argument("--examples", type=int, default=None, help="protocol (1): examples per run")
  parser.add_argument("--steps", type=int, default=None, help="protocol (2): steps per run")
  parser.add_argument("--lrs", type=str, default=None, help="comma-separated lr grid")
  parser.add_argument("--seeds", type=int, default=None,
                      help="fresh seeds per cell, a multiple of the grid's size (default 10)")
  parser.add_argument("--tier-b-steps", type=int, default=None, help="0 skips tier B")
  parser.add_argument("--memory-batches", type=str, default=None)
  parser.add_argument("--emoji", type=str, default=str(EMOJI), help="emoji_captions folder")
  parser.add_argument("--data-dir", type=str, default="", help="TFDS data_dir for the built pairs")
  parser.add_argument("--out", type=str, default=str(RESULTS))
  parser.add_argument("--tier-b-only", action="store_true",
                      help="re-run tier B only, keeping tier A and memory from <out>/<stem>.json "
                      "(with that file's settings: the other settings flags are ignored)")
  parser.add_argument("--report-only", action="store_true",
                      help="re-render <out>/<stem>.md and .png from <out>/<stem>.json (no training)")
  args = parser.parse_args(argv)
  s = dataclasses.replace(QUICK) if args.quick else Settings()
  if args.batches:
    s.batches = tuple(int(b) for b in args.batches.split(","))
  if args.examples:
    s.examples = args.examples
  if args.steps:
    s.steps = args.steps
  if args.lrs:
    s.lrs = tuple(float(v) for v in args.lrs.split(","))
  if args.seeds is not None:
    s.seeds = args.seeds
  if s.seeds < 1 or s.seeds % len(s.lrs):
    parser.error(f"--seeds must be a positive multiple of the lr grid's size {len(s.lrs)} (the seeds "
                 f"run {len(s.lrs)} at a time in the grid's program), got {s.seeds}")
  if args.tier_b_steps is not None:
    s.tier_b_steps = args.tier_b_steps
  if args.memory_batches:
    s.memory_batches = tuple(int(b) for b in args.memory_batches.split(","))
  out, stem = pathlib.Path(args.out), "contrastive_quick" if args.quick else "contrastive"
  if args.report_only:
    return rerender(out, stem)
  t_start = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)
  log(f"device: {device_description()}")

  if args.tier_b_only:
    return rerun_tier_b(out, stem, args, argv, log)
  memory = memory_rows(s.memory_batches, 128)
  log("memory measured")
  train, val, test, prompts, _ = load_emoji(args.data_dir, args.emoji)
  counts = {"train": len(train.captions), "train_images": len(train.image_caption_M),
            "val": len(val.captions), "val_images": len(val.image_caption_M),
            "test": len(test.captions), "test_images": len(test.image_caption_M)}
  baseline = majority_baseline(test.labels_M)
  log(f"data {counts}; majority baseline {baseline}")
  feats = Features(train, s.image_dim, s.text_dim)
  train_feats = (jnp.asarray(feats.images(train.images_MHWC)), jnp.asarray(feats.texts(train.captions)))
  val_set = EvalSet(feats.images(val.images_MHWC), feats.texts(val.captions), val)
  test_set = EvalSet(feats.images(test.images_MHWC), feats.texts(test.captions), test)
  flat = [p for per_class in prompts for p in per_class]
  prompt_feats = feats.texts(flat).reshape(len(prompts), len(prompts[0]), -1)
  log("features ready")

  rows, tier_b_rows = [], []
  save = lambda complete: write_results(out, stem, s, rows, tier_b_rows, memory, baseline, counts,
                                        argv, time.perf_counter() - t_start, complete)
  orig_log = log

  def log_and_save(msg):  # partial results survive an interrupted run
    orig_log(msg)
    if msg.startswith("A ") or msg.startswith("B "):
      save(False)

  tier_a(s, train, val_set, test_set, prompt_feats, train_feats, log_and_save, rows)
  if s.tier_b_steps > 0:
    tier_b(s, train, test, prompts, log_and_save, tier_b_rows)
  save(True)
  log(f"wrote {out / (stem + '.md')}")
  return json.loads((out / f"{stem}.json").read_text())


if __name__ == "__main__":
  main()
