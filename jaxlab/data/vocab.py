"""Character- and byte-level vocabularies: text <-> int32 token ids."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlab.digests import json_sha256


@dataclasses.dataclass(frozen=True)
class Vocab:
  """A character vocabulary (sorted alphabet) or the 256-symbol byte vocabulary (alphabet=None)."""

  alphabet: str | None = None

  @property
  def size(self) -> int:
    return 256 if self.alphabet is None else len(self.alphabet)

  @property
  def kind(self) -> str:
    return "byte" if self.alphabet is None else "char"

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 ids [len]. Raises ValueError naming characters outside the alphabet."""
    if self.alphabet is None:
      return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    table = {c: i for i, c in enumerate(self.alphabet)}
    try:
      return np.fromiter((table[c] for c in text), np.int32, count=len(text))
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    if self.alphabet is None:
      return bytes(ids.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
    return "".join(self.alphabet[i] for i in ids)

  def to_json(self) -> dict:
    return {"alphabet": self.alphabet}

  @classmethod
  def from_json(cls, d: dict) -> "Vocab":
    """The inverse of to_json; ValueError for anything to_json does not write."""
    expected = 'expected {"alphabet": null (bytes) or a string of distinct characters}'
    if not isinstance(d, dict) or "alphabet" not in d:
      raise ValueError(expected)
    alphabet = d["alphabet"]
    if alphabet is not None and (not isinstance(alphabet, str) or not alphabet
                                 or len(set(alphabet)) != len(alphabet)):
      raise ValueError(expected)
    return cls(alphabet=alphabet)

  def to_file_json(self) -> dict:
    """to_json plus the sha256 of it (a run's WORKDIR/vocab.json): an alphabet edited or damaged in
    place is caught when the file is read (a changed character made `jaxlab sample` print other
    text, silently)."""
    return {**self.to_json(), SHA256_KEY: json_sha256(self.to_json())}

  @classmethod
  def from_file_json(cls, d: dict) -> "Vocab":
    """The inverse of to_file_json (a file without the sha256, written before 2026-12-05, is read
    as to_json's); ValueError when the sha256 does not match."""
    if isinstance(d, dict) and SHA256_KEY in d:
      d = dict(d)
      if d.pop(SHA256_KEY) != json_sha256(d):
        raise ValueError("its alphabet does not match its sha256 (edited or damaged in place)")
    return cls.from_json(d)


SHA256_KEY = "sha256"


def read_vocab_file(path, hint: str) -> Vocab:
  """A run's WORKDIR/vocab.json -> Vocab. Anything that to_file_json did not write (not JSON, no
  alphabet, a sha256 that does not match) is a ValueError naming the file, with `hint` (what to
  do)."""
  import json
  import pathlib
  try:
    return Vocab.from_file_json(json.loads(pathlib.Path(path).read_text()))
  except ValueError as e:  # (json.JSONDecodeError and UnicodeDecodeError are ValueErrors)
    raise ValueError(f"{path} is not a vocabulary that jaxlab wrote ({e}); nothing was changed "
                     f"({hint})") from None


def make_vocab(kind: str, texts) -> Vocab:
  """kind "char": the sorted set of characters in `texts`; kind "byte": UTF-8 bytes."""
  if kind == "byte":
    return Vocab(None)
  if kind == "char":
    chars = set()
    for t in texts:
      chars.update(t)
    return Vocab("".join(sorted(chars)))
  raise ValueError(f"vocab kind must be 'char' or 'byte', got {kind!r}")
