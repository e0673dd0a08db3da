"""Image-caption pairs for contrastive learning: 8x8 digits with caption templates, and emoji.

Two TFDS builders (array_record, no TensorFlow needed), each with a "train" and a "test" split whose
examples are {"image": uint8 [H, W, C], "caption": str, "label": int, "group": int}:
- `JaxlabDigitCaptions`: the 1,797 8x8 digits that scikit-learn ships inside the package (no
  download); captions from templates over the digit ("a handwritten seven", "the digit 7", ...);
  label = the digit; image i is in "test" when i % 5 == 0. group = the label (many images share a
  caption, so retrieval counts any image of the caption's digit as a hit).
- `JaxlabEmojiCaptions`: the 3,786 emoji (base + skin-tone variants) of `emoji.json` from the
  emoji-datasource packages, each drawn by two vendors (Twemoji, Noto) from the 32x32 sheets; captions
  "<name>, <category>, <subcategory>[, <skin tone>]" (accents and curly quotes folded to ASCII; the
  short name where two emoji share a Unicode name); label = category; group = the emoji, so the two
  vendor images of an emoji are two views of one caption. Split by base emoji (crc32 of its code
  points % 10 == 0 is "test", skin variants follow their base; base emoji drawn byte-identically by
  a vendor are split by the smallest of them, `split_keys`), so test captions and images are unseen.

`load_pairs(data_cfg)` builds (once) and reads a split into a `PairSet` of arrays; `CharTokenizer`
turns captions into fixed-length ids ending in an end token (where the text encoder pools).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import unicodedata
import zlib

import numpy as np
import tensorflow_datasets as tfds

from jaxlab.data.local_info import SHARED_DATA, LocalDatasetInfo
from jaxlab.data.text_builders import default_data_dir, prepare

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten {name}", "the digit {digit}", "an 8x8 scan of the number {name}",
                   "{name}", "a small picture of a {name}", "number {digit}, written by hand")
# Prompts in wording no digit caption uses (every DIGIT_TEMPLATES caption occurs in training, so
# prompts made from those are training captions): zero-shot accuracy with new wording.
DIGIT_UNSEEN_TEMPLATES = ("a drawing of a {name}", "the numeral {digit}", "a {name}, handwritten")
EMOJI_TEMPLATES = ("{name}", "an emoji of {name}")
SKIN_TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone",
              "1F3FD": "medium skin tone", "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}
EMOJI_VENDORS = ("twitter", "google")
EMOJI_FILES = ("emoji.json", "sheet_twitter_32_indexed256.png", "sheet_google_32_indexed256.png")
SPLITS = ("train", "test")


# ----------------------------------------------------------------------------- tokenizer


class CharTokenizer:
  """Lower-cased characters -> ids: 0 pad, 1 end, 2 unknown, then a fixed printable alphabet.

  `encode(texts, length)` gives int32 [N, length]: up to length - 1 characters, then the end token,
  then padding. The end token's position is where the text encoder pools.
  """

  PAD, END, UNK = 0, 1, 2
  ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789&()*,-.:'!?/#+"

  def __init__(self):
    self._ids = {c: i + 3 for i, c in enumerate(self.ALPHABET)}

  @property
  def size(self) -> int:
    return len(self.ALPHABET) + 3

  def encode(self, texts, length: int) -> np.ndarray:
    if length < 2:
      raise ValueError(f"length must be >= 2 (one character and the end token), got {length}")
    out = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
      ids = [self._ids.get(c, self.UNK) for c in text.lower()[:length - 1]]
      out[row, :len(ids)] = ids
      out[row, len(ids)] = self.END
    return out

  def decode(self, ids) -> str:
    chars = []
    for i in np.asarray(ids).tolist():
      if i == self.END:
        break
      chars.append("?" if i == self.UNK else self.ALPHABET[i - 3] if i >= 3 else "")
    return "".join(chars)


# ----------------------------------------------------------------------------- raw sources


def digit_caption(index: int, label: int) -> str:
  """The caption of digit image `index` (template index % len(DIGIT_TEMPLATES))."""
  template = DIGIT_TEMPLATES[index % len(DIGIT_TEMPLATES)]
  return template.format(name=DIGIT_NAMES[label], digit=label)


def digit_examples():
  """(split, example) for the scikit-learn digits; images uint8 [8, 8, 1] in 0..16."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  for i, (image, label) in enumerate(zip(digits.images, digits.target)):
    split = "test" if i % 5 == 0 else "train"
    yield split, {"image": image.astype(np.uint8)[:, :, None], "caption": digit_caption(i, int(label)),
                  "label": int(label), "group": int(label)}


def _skin_tone(modifiers: str) -> str:
  return ", ".join(SKIN_TONES.get(m, m.lower()) for m in modifiers.split("-"))


def ascii_caption(text: str) -> str:
  """`text` with plain forms from the tokenizer's alphabet where there are some: accents dropped
  (NFKD: "Côte" -> "Cote"), typographic quotes as ' ("WORKER’S" -> "WORKER'S"; the alphabet has
  no "); other characters unchanged (tests check that the emoji captions need no more)."""
  text = text.translate({0x2018: "'", 0x2019: "'", 0x201C: "'", 0x201D: "'"})
  return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _emoji_names(records) -> list[str]:
  """Each record's Unicode name, or its CLDR short name where the Unicode name is not unique
  (U+1F935 keeps the name "MAN IN TUXEDO" that 1F935-200D-2642 also has; its short name is
  person_in_tuxedo), so that no two base emoji share a caption."""
  counts: dict = {}
  for e in records:
    counts[e["name"]] = counts.get(e["name"], 0) + 1
  names = []
  for e in records:
    if counts[e["name"]] == 1:
      names.append(ascii_caption(e["name"]))
    elif isinstance(e.get("short_name"), str) and e["short_name"]:
      names.append(ascii_caption(e["short_name"].replace("_", " ")))
    else:
      raise ValueError(f"emoji {e['unified']} shares the name {e['name']!r} with another emoji and "
                       "has no short_name to tell them apart")
  seen: dict = {}
  for e, name in zip(records, names):
    other = seen.setdefault(name.lower(), e["unified"])
    if other != e["unified"]:
      raise ValueError(f"emoji {other} and {e['unified']} would both be captioned {name.lower()!r}")
  return names


def emoji_entries(root: pathlib.Path) -> list[dict]:
  """One dict per image (base emoji and skin variants): caption, category, sheet cell, base id."""
  path = root / "emoji.json"
  if not path.is_file():
    raise FileNotFoundError(f"emoji_captions: {path} not found (config.data.path should name the "
                            "folder with emoji.json and the 32-px sheets)")
  try:
    records = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"emoji_captions: {path} is not emoji-datasource's JSON ({e})") from None
  if not isinstance(records, list) or not records:
    raise ValueError(f"emoji_captions: {path} must hold a non-empty JSON list of emoji records, got "
                     f"{json.dumps(records)[:40] if not records else type(records).__name__}")
  entries = []
  try:
    records = sorted(records, key=lambda e: e["unified"])
    for e, name in zip(records, _emoji_names(records)):
      base = (name.lower() + ", " + e["category"].lower() + ", " + e["subcategory"].lower())
      entries.append({"caption": base, "category": e["category"], "base": e["unified"],
                      "cell": (int(e["sheet_x"]), int(e["sheet_y"]))})
      for modifiers, v in sorted((e.get("skin_variations") or {}).items()):
        entries.append({"caption": base + ", " + _skin_tone(modifiers), "category": e["category"],
                        "base": e["unified"], "cell": (int(v["sheet_x"]), int(v["sheet_y"]))})
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    what = f"has no field {e.args[0]!r}" if isinstance(e, KeyError) else f"has a malformed field ({e})"
    raise ValueError(f"emoji_captions: a record of {path} {what}; expected emoji-datasource's "
                     "emoji.json (unified, name, category, subcategory, sheet_x, sheet_y)") from None
  negative = next((e for e in entries if min(e["cell"]) < 0), None)
  if negative is not None:
    raise ValueError(f"emoji_captions: {path} places {negative['caption']!r} at sheet cell "
                     f"{negative['cell']}; sheet_x and sheet_y must be >= 0")
  return entries


def emoji_categories(entries) -> tuple[str, ...]:
  return tuple(sorted({e["category"] for e in entries}))


def _sheet_cells(sheet_path: pathlib.Path, cells, background: int = 255) -> np.ndarray:
  """uint8 [N, 32, 32, 3]: each 32x32 emoji (1-px border in 34-px cells) on a flat background."""
  from PIL import Image
  try:
    with Image.open(sheet_path) as im:
      rgba = np.asarray(im.convert("RGBA"), np.float32)
  except FileNotFoundError:
    raise FileNotFoundError(f"emoji_captions: {sheet_path} not found (config.data.path should name "
                            "the folder with emoji.json and the 32-px sheets)") from None
  except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError (an OSError), ...
    raise ValueError(f"emoji_captions: {sheet_path} is not a readable image ({e})") from None
  far_x, far_y = max(x for x, _ in cells), max(y for _, y in cells)
  if rgba.shape[0] < far_y * 34 + 33 or rgba.shape[1] < far_x * 34 + 33:
    raise ValueError(f"emoji_captions: {sheet_path} is {rgba.shape[1]}x{rgba.shape[0]} px, too small "
                     f"for emoji.json's cells (up to sheet_x={far_x}, sheet_y={far_y}: 34-px cells, "
                     f"{far_x * 34 + 33}x{far_y * 34 + 33} px)")
  out = np.empty((len(cells), 32, 32, 3), np.uint8)
  for n, (x, y) in enumerate(cells):
    patch = rgba[y * 34 + 1:y * 34 + 33, x * 34 + 1:x * 34 + 33]
    alpha = patch[:, :, 3:] / 255.0
    out[n] = np.round(patch[:, :, :3] * alpha + background * (1 - alpha)).astype(np.uint8)
  return out


def emoji_images(root: pathlib.Path, entries) -> list[np.ndarray]:
  """Per vendor of EMOJI_VENDORS, uint8 [N, 32, 32, 3]: the drawing of each of the N entries."""
  cells = [e["cell"] for e in entries]
  return [_sheet_cells(root / f"sheet_{vendor}_32_indexed256.png", cells) for vendor in EMOJI_VENDORS]


def is_test_emoji(base_unified: str) -> bool:
  return zlib.crc32(base_unified.encode()) % 10 == 0


def split_keys(bases, images_by_vendor) -> list[str]:
  """For entry n, the smallest base emoji linked to bases[n] by byte-identical images (in any vendor's
  images_by_vendor[v][n], through any chain): split by it, identical drawings never straddle a split
  (Twemoji draws France, St. Martin and Clipperton one flag, and every family alike)."""
  parent = {b: b for b in bases}

  def root(b):
    while parent[b] != b:
      parent[b] = parent[parent[b]]
      b = parent[b]
    return b

  for images in images_by_vendor:
    first: dict = {}
    for b, image in zip(bases, images, strict=True):
      other = first.setdefault(np.asarray(image).tobytes(), b)
      ra, rb = root(b), root(other)
      parent[max(ra, rb)] = min(ra, rb)
  return [root(b) for b in bases]


def emoji_examples(root: pathlib.Path):
  """(split, example) for every emoji image of both vendors; label = category index."""
  entries = emoji_entries(root)
  categories = emoji_categories(entries)
  images = emoji_images(root, entries)
  keys = split_keys([e["base"] for e in entries], images)
  for vendor_images in images:
    for g, (e, image, key) in enumerate(zip(entries, vendor_images, keys)):
      split = "test" if is_test_emoji(key) else "train"
      yield split, {"image": image, "caption": e["caption"], "label": categories.index(e["category"]),
                    "group": g}


# ----------------------------------------------------------------------------- TFDS builders


def _pair_info(builder, description: str, shape) -> tfds.core.DatasetInfo:
  return LocalDatasetInfo(
      builder=builder, description=description,
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
          "caption": tfds.features.Text(),
          "label": tfds.features.Scalar(dtype=np.int64),
          "group": tfds.features.Scalar(dtype=np.int64)}),
      metadata=tfds.core.MetadataDict(), disable_shuffling=True)


def _split_dict(builder, examples):
  by_split = {s: [] for s in SPLITS}
  for split, ex in examples:
    by_split[split].append(ex)
  return {s: builder._generate_examples(exs) for s, exs in by_split.items()}


class JaxlabDigitCaptions(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits with template captions (embedded; nothing to download). VERSION
  names what the build holds (tests/data/test_builder_versions.py pins it): a change to the examples
  or metadata must raise it, so that builds prepared by an earlier jaxlab are not reused."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images, template captions, labels and groups; the class names."}

  def _info(self) -> tfds.core.DatasetInfo:
    return _pair_info(self, "sklearn 8x8 digits with caption templates", (8, 8, 1))

  def _split_generators(self, dl_manager):
    self.info.metadata["class_names"] = list(DIGIT_NAMES)
    return _split_dict(self, digit_examples())

  def _generate_examples(self, examples):
    for i, ex in enumerate(examples):
      yield i, ex


@dataclasses.dataclass
class EmojiConfig(tfds.core.BuilderConfig):
  root: str = ""


def emoji_config(root: str) -> EmojiConfig:
  """A builder config named by a hash of the files' bytes (sheets included: an edit that kept a
  sheet's size reused the old build), so changed files get their own build."""
  base = pathlib.Path(root).expanduser().resolve()
  digest = hashlib.sha256()
  for name in EMOJI_FILES:
    f = base / name
    if not f.is_file():
      raise FileNotFoundError(f"emoji_captions: {f} not found (config.data.path should name the "
                              "folder with emoji.json and the 32-px sheets)")
    digest.update(f"{name}:{f.stat().st_size}:".encode())
    digest.update(f.read_bytes())
  return EmojiConfig(name=f"emoji_{digest.hexdigest()[:12]}", root=str(base),
                     version=JaxlabEmojiCaptions.VERSION)


class JaxlabEmojiCaptions(tfds.core.GeneratorBasedBuilder):
  """Twemoji and Noto emoji (32x32) with Unicode-name captions, split by base emoji (VERSION: as
  JaxlabDigitCaptions's)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Images, Unicode-name captions, categories and base-emoji groups.",
                   "1.1.0": "Captions in ASCII (11 characters were unknown tokens), U+1F935 named "
                            "'person in tuxedo' (it shared 'man in tuxedo'), and base emoji with "
                            "byte-identical drawings on one side of the split (9 groups straddled it)."}
  BUILDER_CONFIGS = []

  def _info(self) -> tfds.core.DatasetInfo:
    return _pair_info(self, "emoji-datasource 32-px sheets, twitter + google, with names",
                      (32, 32, 3))

  def _split_generators(self, dl_manager):
    root = pathlib.Path(self.builder_config.root)
    self.info.metadata["class_names"] = list(emoji_categories(emoji_entries(root)))
    return _split_dict(self, emoji_examples(root))

  def _generate_examples(self, examples):
    for i, ex in enumerate(examples):
      yield i, ex


# ----------------------------------------------------------------------------- arrays


@dataclasses.dataclass
class PairSet:
  """One split as arrays: images float32 [N, H, W, C] in [-1, 1], captions, labels [N], groups [N]."""

  images_NHWC: np.ndarray
  captions: list
  labels_N: np.ndarray
  groups_N: np.ndarray
  class_names: tuple
  templates: tuple  # zero-shot prompt templates with "{name}" (digits: also "{digit}")
  unseen_templates: tuple = ()  # digits: templates no caption uses (DIGIT_UNSEEN_TEMPLATES)

  def __len__(self) -> int:
    return len(self.captions)


IMAGE_MAX = {"digits": 16.0, "emoji": 255.0}


def builder_for(data_cfg) -> tfds.core.DatasetBuilder:
  data_dir = default_data_dir(data_cfg.data_dir)
  if data_cfg.name == "digits":
    return JaxlabDigitCaptions(data_dir=data_dir, file_format="array_record")
  if data_cfg.name == "emoji":
    root = data_cfg.path or str(SHARED_DATA / "emoji_captions")
    return JaxlabEmojiCaptions(config=emoji_config(root), data_dir=data_dir,
                               file_format="array_record")
  raise ValueError(f"data name must be 'digits' or 'emoji', got {data_cfg.name!r}")


def load_pairs(data_cfg, split: str) -> PairSet:
  """Builds the dataset of `data_cfg.name` once under data_cfg.data_dir and reads `split` as arrays."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  builder = prepare(builder_for(data_cfg), data_cfg.data_dir)
  source = builder.as_data_source(split=split)
  rows = [source[i] for i in range(len(source))]
  images = np.stack([r["image"] for r in rows]).astype(np.float32)
  images = images / IMAGE_MAX[data_cfg.name] * 2.0 - 1.0
  captions = [r["caption"].decode() if isinstance(r["caption"], bytes) else str(r["caption"])
              for r in rows]
  digits = data_cfg.name == "digits"
  return PairSet(images, captions, np.array([r["label"] for r in rows], np.int32),
                 np.array([r["group"] for r in rows], np.int64),
                 tuple(builder.info.metadata["class_names"]),
                 DIGIT_TEMPLATES if digits else EMOJI_TEMPLATES,
                 DIGIT_UNSEEN_TEMPLATES if digits else ())


def class_prompts(pairs: PairSet, templates: tuple | None = None) -> list[list[str]]:
  """For each class, its prompts: every template (default: pairs.templates) filled with the class
  name (and digit)."""
  prompts = []
  for c, name in enumerate(pairs.class_names):
    label = name.lower()
    prompts.append([t.format(name=label, digit=c)
                    for t in (pairs.templates if templates is None else templates)])
  return prompts
