"""TFDS dataset builders for text corpora, written as array_record files (no TensorFlow needed).

- `JaxlabTextFiles`: any local text file(s); the concatenated text is split contiguously, the first
  `train_fraction` for training and the rest for validation (the usual char-level LM set-up).
- `JaxlabPythonStdlib`: the running interpreter's own standard-library `.py` sources (present on every
  machine, so the default job needs no download); files in sorted order, split by file
  (a file is in validation when crc32 of its relative path % 10 == 0).

Each example is {"text": str} (a document or a chunk of one) in corpus order (`disable_shuffling`);
`info.metadata["alphabet"]` holds the sorted set of characters of the whole corpus, so the character
vocabulary is fixed by the data, not by the split that happens to be read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import sysconfig
import zlib
from typing import Iterator

import tensorflow_datasets as tfds

from jaxlab.data.local_info import LocalDatasetInfo

CHUNK_CHARS = 1 << 18
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                        "tkinter", "turtledemo", "ensurepip")


def _chunks(text: str) -> Iterator[str]:
  for start in range(0, len(text), CHUNK_CHARS):
    yield text[start:start + CHUNK_CHARS]


def _read_text(path: pathlib.Path) -> str:
  try:
    return _decode_text(path.read_bytes(), path)
  except FileNotFoundError:
    raise FileNotFoundError(f"text file not found: {path}") from None


def _decode_text(data: bytes, path: pathlib.Path) -> str:
  """`data` as Path.read_text(encoding="utf-8") reads it: UTF-8, universal newlines."""
  try:
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8").read()
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text ({e}); both vocabularies (char and byte) read "
                     "the file as UTF-8 text") from None


def _alphabet(texts) -> str:
  chars = set()
  for t in texts:
    chars.update(t)
  return "".join(sorted(chars))


def _info(builder, description: str) -> tfds.core.DatasetInfo:
  return LocalDatasetInfo(
      builder=builder, description=description,
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
      metadata=tfds.core.MetadataDict(), disable_shuffling=True)


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
  paths: tuple = ()
  train_fraction: float = 0.9


def text_files_config(paths, train_fraction: float = 0.9) -> TextFilesConfig:
  """A builder config whose name identifies the files' contents, so a changed file is rebuilt."""
  resolved = tuple(str(pathlib.Path(p).expanduser().resolve()) for p in paths)
  if not resolved:
    raise ValueError("text_files needs at least one path")
  if not 0.0 < train_fraction < 1.0:
    raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
  digest = hashlib.sha256(repr(train_fraction).encode())
  num_chars = 0
  for p in resolved:
    path = pathlib.Path(p)
    if path.is_dir():
      raise ValueError(f"{p} is a directory; text_files reads text files (comma-separated paths)")
    if path.exists() and not path.is_file():
      raise ValueError(f"{p} is not a regular file (a device, pipe or socket); text_files reads "
                       "text files")
    if not path.is_file():
      raise FileNotFoundError(f"text file not found: {p}")
    data = path.read_bytes()
    digest.update(p.encode())
    digest.update(data)
    num_chars += len(_decode_text(data, path))
  # TFDS fails with a long AssertionError ("No examples were yielded") on an empty split: check first.
  cut = int(num_chars * train_fraction)
  if num_chars == 0:
    raise ValueError(f"text file{'s' if len(resolved) > 1 else ''} {', '.join(resolved)} "
                     f"{'are' if len(resolved) > 1 else 'is'} empty")
  if cut == 0 or cut == num_chars:
    raise ValueError(f"{', '.join(resolved)}: {num_chars} characters are too few to split "
                     f"{train_fraction} / {1 - train_fraction:.3g} into train and validation text")
  stem = "".join(c if c.isalnum() else "_" for c in pathlib.Path(resolved[0]).stem.lower())[:24]
  return TextFilesConfig(name=f"{stem}_{digest.hexdigest()[:12]}", paths=resolved,
                         train_fraction=train_fraction, version=JaxlabTextFiles.VERSION)


class JaxlabTextFiles(tfds.core.GeneratorBasedBuilder):
  """Local text files, split contiguously into train / validation.

  VERSION names what the build holds (tests/data/test_builder_versions.py pins it): a change to the
  examples or metadata written for the same files must raise it, so that builds prepared by an
  earlier jaxlab are not reused."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Contiguous train / validation text in chunks; the alphabet."}
  BUILDER_CONFIGS = []

  def _info(self) -> tfds.core.DatasetInfo:
    return _info(self, "Local text files: " + ", ".join(self.builder_config.paths))

  def _split_generators(self, dl_manager):
    text = "".join(_read_text(pathlib.Path(p)) for p in self.builder_config.paths)
    cut = int(len(text) * self.builder_config.train_fraction)
    self.info.metadata["alphabet"] = _alphabet([text])
    return {"train": self._generate_examples(text[:cut]),
            "validation": self._generate_examples(text[cut:])}

  def _generate_examples(self, text: str):
    for i, chunk in enumerate(_chunks(text)):
      yield i, {"text": chunk}


def stdlib_files(root: str | None = None) -> list[pathlib.Path]:
  """The standard library's .py files (no tests, site-packages or GUI demos), sorted."""
  base = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  files = []
  for path in sorted(base.rglob("*.py")):
    parts = path.relative_to(base).parts
    if any(p in STDLIB_EXCLUDED_DIRS for p in parts[:-1]):
      continue
    files.append(path)
  if not files:
    if root:
      raise FileNotFoundError(f"config.data.path={root!r}: no .py files found there (with "
                              "config.data.name='python_stdlib' it names a directory of Python "
                              "sources; a text file is read with config.data.name='text_files')")
    raise FileNotFoundError(f"no .py files found under {base}")
  return files


def is_validation_file(relative_path: str) -> bool:
  return zlib.crc32(relative_path.encode()) % 10 == 0


@dataclasses.dataclass
class StdlibConfig(tfds.core.BuilderConfig):
  root: str = ""


def stdlib_config(root: str | None = None) -> StdlibConfig:
  """Named by the root's folder name and a digest of its absolute path and each file's relative path,
  size and modification time, so that an edited source tree (or another one of the same name) gets
  its own build rather than an earlier one's cache."""
  files = stdlib_files(root)
  base = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  # TFDS fails with a long AssertionError on an empty split: a small tree can put every file in one.
  num_val = sum(is_validation_file(str(f.relative_to(base))) for f in files)
  if num_val in (0, len(files)):
    where = f"config.data.path={root!r}" if root else str(base)
    raise ValueError(f"{where}: all {len(files)} .py files fall in the "
                     f"{'training' if num_val == 0 else 'validation'} split (a file is in "
                     "validation when crc32 of its relative path % 10 == 0); the tree needs files "
                     "in both")
  digest = hashlib.sha256(str(base.resolve()).encode())
  for f in files:
    stat = f.stat()
    digest.update(f"{f.relative_to(base)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
  version = "".join(c for c in base.name if c.isalnum())
  return StdlibConfig(name=f"{version}_{digest.hexdigest()[:12]}", root=str(base),
                      version=JaxlabPythonStdlib.VERSION)


class JaxlabPythonStdlib(tfds.core.GeneratorBasedBuilder):
  """The running Python's standard-library sources, one example per file, split by file (VERSION:
  as JaxlabTextFiles's)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.1.0": "The alphabet holds the newline of the blank line that joins the files when they are "
               "read back (a 1.0.0 build of sources without one failed to load).",
      "1.0.0": "One example per file, split by crc32 of the relative path; the alphabet."}
  BUILDER_CONFIGS = []

  def _info(self) -> tfds.core.DatasetInfo:
    return _info(self, "Python standard library sources under " + self.builder_config.root)

  def _split_generators(self, dl_manager):
    base = pathlib.Path(self.builder_config.root)
    docs = []
    for f in stdlib_files(self.builder_config.root):
      text = f.read_bytes().decode("utf-8", errors="replace")
      docs.append((str(f.relative_to(base)), text))
    # "\n": text.load_corpus joins the files with a blank line, which a file may not contain
    self.info.metadata["alphabet"] = _alphabet([*(t for _, t in docs), "\n"])
    train = [d for d in docs if not is_validation_file(d[0])]
    val = [d for d in docs if is_validation_file(d[0])]
    return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

  def _generate_examples(self, docs):
    for i, (_, text) in enumerate(docs):
      # Files are joined by a blank line when read back; each example is one file.
      yield i, {"text": text}


def prepare(builder: tfds.core.DatasetBuilder, data_dir: str = "") -> tfds.core.DatasetBuilder:
  """Writes the array_record files once (a later call reuses them). Another process preparing the
  same dataset at the same moment wins the final rename; this one then reads its files.

  data_dir: config.data.data_dir as given; an OS error on a path under the folder the builds go to
  names that key (TFDS's own message names only the path)."""
  try:
    builder.download_and_prepare()
  except FileExistsError:
    if not builder.is_prepared():
      raise
  except OSError as e:
    root = os.path.abspath(default_data_dir(data_dir))
    where = os.path.abspath(str(e.filename)) if e.filename else None  # no path: not data_dir's
    if where is not None and (where == root or where.startswith(root + os.sep)
                              or root.startswith(where + os.sep)):
      shown = f"{data_dir!r}" if data_dir else f"'' (that is {root})"
      raise type(e)(e.errno, f"config.data.data_dir={shown} cannot hold the dataset builds: "
                             f"{e.strerror}", e.filename) from None
    raise
  return builder


def default_data_dir(data_dir: str) -> str:
  return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
