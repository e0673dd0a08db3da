"""Binary data for density models: MNIST (IDX files or TFDS), the NADE/MADE UCI splits, Caltech-101
Silhouettes 28x28 and scikit-learn's 8x8 digits, with the binarisation protocol stated in `note`.

Protocols:
- MNIST: train on the first 50,000 training images, binarised again for every batch (dynamic:
  x ~ Bernoulli(grey / 255), fresh each epoch); validation = the last 10,000 training images and test =
  the 10,000 test images, each binarised once with a fixed seed (`binarize_seed`).
- binarized_mnist (a data set of its own name): TFDS's `binarized_mnist`, Larochelle's static
  binarisation with its 50k/10k/10k split, used as is when it is prepared.
- UCI (dna, mushrooms, nips): the fixed train/valid/test splits of Larochelle & Murray (2011).
- Caltech-101 Silhouettes 28x28: the full 8,671-image file, object = 1, split by a seeded permutation
  into 4100/2264/2307 (the sizes of Marlin's split1, which is not the same split).
- digits: scikit-learn's 1,797 8x8 digits (0..16) binarised at 8/16 (x = pixel >= 8), seeded split
  1347/225/225.
Every array is [N, D] in raster order; `image_shape` says how to view it as an image (None for UCI).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
import warnings
import zlib
from typing import Iterator

import numpy as np

from jaxlab.data.local_info import REPO_ROOT, SHARED_DATA

UCI_NAMES = ("dna", "mushrooms", "nips")
IMAGE_NAMES = ("digits", "mnist", "binarized_mnist", "caltech")  # the datasets with an image_shape
NAMES = (*IMAGE_NAMES, *UCI_NAMES)
CALTECH_SPLIT = (4100, 2264, 2307)


@dataclasses.dataclass
class BinaryDataset:
  """train: float32 [N, D], probabilities in [0, 1] when `dynamic` (binarised per batch), else 0/1;
  valid, test: float32 [N, D] in {0, 1} (fixed)."""

  name: str
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  image_shape: tuple[int, int] | None
  dynamic: bool
  note: str

  def __post_init__(self):
    """Refuses data that is not binary (e.g. 0/255 pixels), which the models would score as log p > 0,
    and splits that are not [N, D] with one D (a narrower valid split failed at the first
    evaluation, after training)."""
    shapes = {split: np.shape(getattr(self, split)) for split in ("train", "valid", "test")}
    if any(len(shape) != 2 or 0 in shape for shape in shapes.values()) \
        or len({shape[1] for shape in shapes.values()}) != 1:
      raise ValueError(f"{self.name}: the train/valid/test splits must be non-empty [examples, "
                       f"dimensions] arrays of one width; got shapes "
                       + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    for split in ("train", "valid", "test"):
      x = getattr(self, split)
      if split == "train" and self.dynamic:
        ok, want = bool(((x >= 0) & (x <= 1)).all()), "probabilities in [0, 1]"
      else:
        ok, want = bool(((x == 0) | (x == 1)).all()), "0/1 values"
      if not ok:
        raise ValueError(f"{self.name}: the {split} split must hold {want}; got values in "
                         f"[{x.min()}, {x.max()}]")

  @property
  def dim(self) -> int:
    return self.train.shape[1]


# ---------------------------------------------------------------------------------------------- readers

def read_idx(path: str | pathlib.Path) -> np.ndarray:
  """An IDX file (optionally .gz): uint8 array of the shape its header gives."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"IDX file not found: {path}")
  try:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
  except (EOFError, OSError, zlib.error) as e:  # truncated or not gzip (gzip.BadGzipFile: OSError)
    raise ValueError(f"{path} is not a readable gzip file ({e})") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
  ndim = raw[3]
  if len(raw) < 4 + 4 * ndim:
    raise ValueError(f"{path}: IDX header cut short ({len(raw)} bytes; {ndim} dimensions need "
                     f"{4 + 4 * ndim})")
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says {shape}, file holds {data.size} values")
  return data.reshape(shape)


def _idx_file(root: pathlib.Path, stem: str) -> pathlib.Path | None:
  for name in (stem, stem + ".gz"):
    if (root / name).is_file():
      return root / name
  return None


def mnist_grey(root: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """(train [60000, 28, 28], test [10000, 28, 28]) uint8 grey levels from a folder of IDX files.

  The training images are either one `train-images-idx3-ubyte[.gz]` or its pieces
  `train-images-idx3-ubyte.part0.gz, part1, ...` (each a complete IDX file), joined in order."""
  root = pathlib.Path(root)
  single = _idx_file(root, "train-images-idx3-ubyte")
  if single is not None:
    train = read_idx(single)
  else:
    parts = {}
    for piece in root.glob("train-images-idx3-ubyte.part*"):
      number = piece.name.split(".part")[1].split(".")[0]
      if not number.isdigit():
        raise ValueError(f"{piece}: not a numbered piece (train-images-idx3-ubyte.partN[.gz])")
      parts[int(number)] = piece
    if not parts:
      raise FileNotFoundError(f"no train-images-idx3-ubyte[.gz] or its .partN pieces in {root}")
    missing = sorted(set(range(max(parts) + 1)) - set(parts))
    if missing:
      raise FileNotFoundError(f"train-images-idx3-ubyte.part{missing[0]} is missing in {root} "
                              f"(pieces found: {sorted(parts)})")
    pieces = [read_idx(parts[i]) for i in range(len(parts))]
    for i, piece in enumerate(pieces):
      if piece.ndim != 3 or piece.shape[1:] != pieces[0].shape[1:]:
        raise ValueError(f"{parts[i]}: images of shape {piece.shape[1:]}, but "
                         f"{parts[0].name} has {pieces[0].shape[1:]}")
    train = np.concatenate(pieces)
  test_file = _idx_file(root, "t10k-images-idx3-ubyte")
  if test_file is None:
    raise FileNotFoundError(f"no t10k-images-idx3-ubyte[.gz] in {root}")
  return train, read_idx(test_file)


def _tfds_images(name: str, data_dir: str, splits, *, local_path: bool = False) -> list[np.ndarray]:
  """Images of a prepared TFDS dataset (read with as_data_source; no TensorFlow, no download);
  local_path: the dataset can also be read from files given by config.data.path."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=data_dir or None)
  if not builder.is_prepared():
    raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir} (this "
                            "code never downloads; prepare it with `tfds build "
                            "--file_format=array_record` and give its config.data.data_dir"
                            + (", or give local files by config.data.path" if local_path else "")
                            + ")")
  out = []
  for split in splits:
    try:
      source = builder.as_data_source(split=split)
    except NotImplementedError as e:  # random access needs array_record (or parquet) files
      raise ValueError(f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
                       f"{builder.info.file_format.value if builder.info.file_format else '?'}, "
                       "which has no random access: prepare it with `tfds build "
                       f"{name} --file_format=array_record` (details: {str(e).splitlines()[0]})"
                       ) from None
    out.append(np.stack([np.asarray(source[i]["image"]) for i in range(len(source))]))
  return out


def binarize(p: np.ndarray, seed) -> np.ndarray:
  """x ~ Bernoulli(p) with a numpy generator seeded by `seed`; float32 0/1."""
  return (np.random.default_rng(seed).random(p.shape, np.float32) < p).astype(np.float32)


def _flat(images: np.ndarray) -> np.ndarray:
  return images.reshape(images.shape[0], -1)


def _seeded_split(x: np.ndarray, sizes, seed: int):
  perm = np.random.default_rng(seed).permutation(len(x))
  a, b = sizes[0], sizes[0] + sizes[1]
  return x[perm[:a]], x[perm[a:b]], x[perm[b:]]


# ------------------------------------------------------------------------------------------- datasets

def load_mnist(path: str = "", *, data_dir: str = "", binarize_seed: int = 0,
               static: bool = False) -> BinaryDataset:
  """MNIST from a local IDX folder (path), else TFDS `mnist` prepared in data_dir when one is given,
  else the IDX files in ../shared/data/mnist when present, else TFDS's default data_dir. Training
  images are binarised afresh for every batch (dynamic), or with `static` once (seed binarize_seed),
  like the fixed binarisation the published numbers used."""
  root = pathlib.Path(path) if path else SHARED_DATA / "mnist"
  if path or (not data_dir and root.is_dir()):
    train, test = mnist_grey(root)
    source = f"IDX files in {os.path.relpath(root, REPO_ROOT)}"
    for what, images, want in (("training", train, (60000, 28, 28)), ("test", test, (10000, 28, 28))):
      if images.shape != want:  # e.g. a piece of the training file left out
        raise ValueError(f"the MNIST {what} images in {root} must be {want}, got {images.shape}")
  else:
    train, test = (a[..., 0] for a in _tfds_images("mnist", data_dir, ("train", "test"),
                                                   local_path=True))
    source = "TFDS mnist"
  grey_train = _flat(train).astype(np.float32) / 255.0
  grey_test = _flat(test).astype(np.float32) / 255.0
  fixed = f"binarised once with seed {binarize_seed}"
  if static:
    train_x = binarize(grey_train[:50000], [binarize_seed, 0])
    how = f"trained on 50k images {fixed} (static, like the published protocol)"
  else:
    train_x = grey_train[:50000]
    how = "trained on 50k images binarised dynamically (fresh Bernoulli(grey) draws per batch)"
  order = ("" if source != "TFDS mnist" else
           " (TFDS stores the training images shuffled: another 10k than the IDX files' last 10k)")
  note = (f"MNIST ({source}): {how}; valid = last 10k train images{order}, test = the 10k test "
          f"images, each {fixed} (the published numbers used one fixed binarisation of the whole "
          "data set)")
  return BinaryDataset("mnist", train_x, binarize(grey_train[50000:], [binarize_seed, 1]),
                       binarize(grey_test, [binarize_seed, 2]), (28, 28), not static, note)


def load_binarized_mnist(*, data_dir: str = "") -> BinaryDataset:
  """TFDS `binarized_mnist`: Larochelle's fixed binarisation, 50k/10k/10k."""
  train, valid, test = (_flat(a).astype(np.float32) for a in
                        _tfds_images("binarized_mnist", data_dir, ("train", "validation", "test")))
  return BinaryDataset("binarized_mnist", train, valid, test, (28, 28), False,
                       "binarized MNIST (TFDS, Larochelle's static binarisation 50k/10k/10k)")


def _not_a_data_file(file: pathlib.Path, path: str, kind: str, error: Exception,
                     missing: str) -> ValueError:
  """One line for a data file that could not be read as `kind`: the file, whether config.data.path
  named it, and the reader's first line (after `missing` for a KeyError: an absent array)."""
  first_line = (str(error).splitlines() or [type(error).__name__])[0]
  detail = f"{missing} ({first_line})" if isinstance(error, KeyError) else first_line
  given = "config.data.path" if path else "the default file; set config.data.path"
  return ValueError(f"{file} ({given}) is not {kind}: {detail}")


def load_uci(name: str, path: str = "") -> BinaryDataset:
  """A NADE/MADE UCI benchmark split (npz with train_data/valid_data/test_data)."""
  if name not in UCI_NAMES:
    raise ValueError(f"name={name!r} must be one of {', '.join(UCI_NAMES)}")
  file = pathlib.Path(path) if path else SHARED_DATA / "nade_uci_binary" / f"{name}.npz"
  if not file.is_file():
    raise FileNotFoundError(f"UCI split file not found: {file}")
  try:
    with warnings.catch_warnings(), np.load(file, encoding="latin1") as d:
      warnings.simplefilter("ignore")  # the files were written by Python 2's numpy
      parts = [np.asarray(d[k], np.float32) for k in ("train_data", "valid_data", "test_data")]
    return BinaryDataset(name, *parts, None, False,
                         f"UCI {name}: the fixed NADE/MADE train/valid/test split")
  except Exception as e:  # not a zip/npz (BadZipFile, pickled data), a missing key, bad shapes
    raise _not_a_data_file(file, path, "a NADE/MADE UCI .npz with train_data, valid_data and "
                           "test_data", e, "an array is missing") from None


def load_caltech(path: str = "", *, split_seed: int = 0) -> BinaryDataset:
  """Caltech-101 Silhouettes 28x28 (.mat), object = 1, seeded 4100/2264/2307 split."""
  import scipy.io
  file = pathlib.Path(path) if path else (SHARED_DATA / "caltech101_silhouettes_28" /
                                          "caltech101_silhouettes_28.mat")
  if not file.is_file():
    raise FileNotFoundError(f"Caltech-101 Silhouettes file not found: {file}")
  try:
    x = np.asarray(scipy.io.loadmat(file)["X"])
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != 28 * 28:  # [784, N] (transposed) too
      raise ValueError(f"its X array of shape {x.shape} is not [N, 784] (28x28 images, one per row)")
    if not np.isin(x, (0, 1)).all():
      raise ValueError(f"its X array holds values other than 0 and 1 (range [{x.min()}, {x.max()}])")
  except Exception as e:  # not a .mat file (scipy: "Unknown mat file type ..."), no X, wrong shape
    raise _not_a_data_file(file, path, "a Caltech-101 Silhouettes 28x28 .mat file", e,
                           "no 'X' array") from None
  images = 1.0 - x.reshape(-1, 28, 28, order="F").astype(np.float32)  # upright; object = 1
  train, valid, test = _seeded_split(_flat(images), CALTECH_SPLIT, split_seed)
  return BinaryDataset("caltech", train, valid, test, (28, 28), False,
                       f"Caltech-101 Silhouettes 28x28, full file, object=1, our seeded split "
                       f"(seed {split_seed}) of sizes {CALTECH_SPLIT}; not Marlin's split1")


def load_digits(*, split_seed: int = 0) -> BinaryDataset:
  """scikit-learn's 8x8 digits (shipped inside its wheel, no download) binarised at 8/16."""
  from sklearn.datasets import load_digits as sk_load_digits
  x = (sk_load_digits().data >= 8).astype(np.float32)
  train, valid, test = _seeded_split(x, (1347, 225), split_seed)
  sizes = "/".join(str(len(part)) for part in (train, valid, test))
  return BinaryDataset("digits", train, valid, test, (8, 8), False,
                       f"sklearn 8x8 digits binarised at 8/16, seeded split (seed {split_seed}) "
                       f"{sizes}")


def load(name: str, *, path: str = "", data_dir: str = "", binarize_seed: int = 0,
         split_seed: int = 0, static: bool = False) -> BinaryDataset:
  """The dataset `name` (one of NAMES); `static` (MNIST only): one fixed training binarisation."""
  if static and name != "mnist":
    raise ValueError(f"static binarisation applies to mnist only, not {name!r}")
  if name == "digits":
    return load_digits(split_seed=split_seed)
  if name == "mnist":
    return load_mnist(path, data_dir=data_dir, binarize_seed=binarize_seed, static=static)
  if name == "binarized_mnist":
    return load_binarized_mnist(data_dir=data_dir)
  if name == "caltech":
    return load_caltech(path, split_seed=split_seed)
  if name in UCI_NAMES:
    return load_uci(name, path)
  raise ValueError(f"name={name!r} must be one of {', '.join(NAMES)}")


# -------------------------------------------------------------------------------------------- batches

class TrainBatches:
  """Infinite {"x": float32 [B/processes, D], "weights": ones} batches: a fresh seeded permutation
  per epoch and, if `dynamic`, fresh Bernoulli draws per batch. Deterministic in (seed, epoch, batch),
  so `get_state`/`set_state` resume exactly (saved in checkpoints by the trainer)."""

  def __init__(self, data: np.ndarray, *, batch_size: int, seed: int, dynamic: bool,
               rows: np.ndarray | None = None):
    if len(data) < batch_size:
      raise ValueError(f"batch_size={batch_size} exceeds the {len(data)} training examples")
    self._data, self._batch, self._seed, self._dynamic = data, batch_size, seed, dynamic
    self._rows = slice(None) if rows is None else np.asarray(rows)  # this process's rows
    self._epoch, self._index = 0, 0
    self._perm = self._permutation()

  def _permutation(self) -> np.ndarray:
    return np.random.default_rng([self._seed, self._epoch]).permutation(len(self._data))

  def __iter__(self) -> "TrainBatches":
    return self

  def __next__(self) -> dict:
    if (self._index + 1) * self._batch > len(self._data):
      self._epoch, self._index = self._epoch + 1, 0
      self._perm = self._permutation()
    rows = self._perm[self._index * self._batch:(self._index + 1) * self._batch][self._rows]
    x = self._data[rows]
    if self._dynamic:  # the global batch's uniform draws, so the draws do not depend on the hosts
      uniform = np.random.default_rng([self._seed, self._epoch, self._index, 7]).random(
          (self._batch, self._data.shape[1]), np.float32)
      x = uniform[self._rows] < x
    self._index += 1
    x = x.astype(np.float32)
    return {"x": x, "weights": np.ones(len(x), np.float32)}

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "index": self._index}

  def set_state(self, state: dict) -> None:
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
    self._perm = self._permutation()


def eval_batches(data: np.ndarray, *, batch_size: int, max_batches: int = 0,
                 rows: np.ndarray | None = None) -> Iterator[dict]:
  """A fixed split in order, in full batches: the last one padded with zero rows of weight 0. Of
  each global batch, the rows `rows` (a process's, `sharding.process_batch_rows`; None: all)."""
  count = -(-len(data) // batch_size)
  if max_batches:
    count = min(count, max_batches)
  rows = np.arange(batch_size) if rows is None else np.asarray(rows)
  for i in range(count):
    index = i * batch_size + rows
    present = index < len(data)
    x = np.zeros((len(rows), data.shape[1]), np.float32)
    x[present] = data[index[present]]
    yield {"x": x, "weights": present.astype(np.float32)}
