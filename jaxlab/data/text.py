"""Text corpora for language modelling: config -> TFDS builder -> token arrays and a vocabulary.

`config.data.name`:
- "python_stdlib": the default corpus (the interpreter's own standard library; no download).
- "text_files": local file(s) in `config.data.path` (comma-separated), split `train_fraction` / rest.
- "tiny_shakespeare": `config.data.path` if given (a local copy of input.txt, split 90/10), else TFDS's
  own `tiny_shakespeare` (its train/validation/test joined and split 90/10 the same way).
"""

from __future__ import annotations

import dataclasses
import logging
import socket

import numpy as np
import tensorflow_datasets as tfds

from jaxlab.data import text_builders
from jaxlab.data.vocab import Vocab

DATASETS = ("python_stdlib", "text_files", "tiny_shakespeare")


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: np.ndarray  # int32 [num_train_tokens]
  validation: np.ndarray  # int32 [num_val_tokens]
  vocab: Vocab
  description: str


def _read_split(builder, split: str) -> str:
  source = builder.as_data_source(split=split)
  pieces = []
  for i in range(len(source)):
    text = source[i]["text"]
    pieces.append(text.decode("utf-8") if isinstance(text, bytes) else text)
  return pieces


def _tokens(vocab: Vocab, pieces, sep: str) -> np.ndarray:
  return vocab.encode(sep.join(pieces))


def load_corpus(data_cfg) -> Corpus:
  """Builds (once) and reads the corpus named by `data_cfg`; returns int32 token arrays and the vocab."""
  name = data_cfg.name
  data_dir = text_builders.default_data_dir(data_cfg.data_dir)
  sep = ""
  if name == "python_stdlib":
    builder = text_builders.JaxlabPythonStdlib(
        config=text_builders.stdlib_config(data_cfg.path or None), data_dir=data_dir,
        file_format="array_record")
    sep = "\n\n"
  elif name == "text_files" or (name == "tiny_shakespeare" and data_cfg.path):
    if not data_cfg.path:
      raise ValueError("config.data.path must name the text file(s) for data.name='text_files'")
    paths = [p.strip() for p in data_cfg.path.split(",") if p.strip()]  # "a.txt, b.txt" too
    try:
      files_config = text_builders.text_files_config(paths, data_cfg.train_fraction)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"config.data.path={data_cfg.path!r}: {e}") from None
    except ValueError as e:  # empty or too short to split, not UTF-8
      raise ValueError(f"config.data.path={data_cfg.path!r}: {e}") from None
    builder = text_builders.JaxlabTextFiles(config=files_config, data_dir=data_dir,
                                            file_format="array_record")
  elif name == "tiny_shakespeare":
    return _tfds_tiny_shakespeare(data_cfg, data_dir)
  else:
    raise ValueError(f"config.data.name must be one of {DATASETS}, got {name!r}")
  text_builders.prepare(builder, data_cfg.data_dir)
  alphabet = builder.info.metadata["alphabet"]
  vocab = Vocab(alphabet if data_cfg.vocab == "char" else None)
  try:
    train = _tokens(vocab, _read_split(builder, "train"), sep)
    val = _tokens(vocab, _read_split(builder, "validation"), sep)
  except (OSError, RuntimeError, ValueError) as e:  # array_record's errors for a damaged build
    first = (str(e).splitlines() or [type(e).__name__])[0][:200]
    raise ValueError(f"the prepared dataset in {builder.data_dir} could not be read ({first}); "
                     "delete that folder and it is built again from the source files") from None
  return Corpus(train, val, vocab, f"{builder.name}/{builder.builder_config.name}")


TINY_SHAKESPEARE_HOST = "raw.githubusercontent.com"  # where TFDS's tiny_shakespeare downloads from


def _reachable(host: str, timeout_s: float = 5.0) -> bool:
  try:
    socket.create_connection((host, 443), timeout=timeout_s).close()
    return True
  except OSError:
    return False


def _tfds_tiny_shakespeare(data_cfg, data_dir: str) -> Corpus:
  try:
    builder = tfds.builder("tiny_shakespeare", data_dir=data_dir, file_format="array_record")
    # Offline, TFDS would retry the download for minutes before failing: fail at once instead.
    if not builder.is_prepared() and not _reachable(TINY_SHAKESPEARE_HOST):
      raise ConnectionError(f"not prepared in {data_dir}, and {TINY_SHAKESPEARE_HOST} is not "
                            "reachable to download it")
    text_builders.prepare(builder, data_cfg.data_dir)
    pieces = [p for s in ("train", "validation", "test") for p in _read_split(builder, s)]
  except Exception as e:  # no network, no TensorFlow for its generator, ...
    logging.debug("TFDS tiny_shakespeare failed", exc_info=True)
    raise RuntimeError(
        "TFDS's tiny_shakespeare could not be prepared here "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); give a local copy with "
        "--config.data.path=/path/to/input.txt") from None
  text = "".join(pieces)
  cut = int(len(text) * data_cfg.train_fraction)
  vocab = Vocab("".join(sorted(set(text))) if data_cfg.vocab == "char" else None)
  return Corpus(vocab.encode(text[:cut]), vocab.encode(text[cut:]), vocab, "tfds/tiny_shakespeare")
