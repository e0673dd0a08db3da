"""grain pipelines that turn a token array into batches of random windows.

Training batches: every window start of the token array, shuffled by a seeded permutation (reshuffled each
epoch), grouped into global batches; each process keeps its own rows of the global batch, so the global
batch does not depend on the number of hosts. The iterator's state (`get_state`/`set_state`) is saved in
checkpoints, so a resumed run sees exactly the batches it would have seen.

Evaluation batches: a fixed, seeded set of windows, the same at every evaluation.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np


class WindowSource:
  """grain random-access source: window i is tokens[i : i + seq_len + 1]."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    if tokens.ndim != 1:
      raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if len(tokens) < seq_len + 2:
      raise ValueError(f"a split of {len(tokens)} tokens is too short for windows of {seq_len + 1}")
    self._tokens = tokens
    self._seq_len = seq_len

  def __len__(self) -> int:
    return len(self._tokens) - self._seq_len

  def __getitem__(self, i: int) -> np.ndarray:
    return self._tokens[i:i + self._seq_len + 1]


def _to_example(windows) -> dict:
  windows = np.stack(windows).astype(np.int32)
  return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def epoch_shuffle_seed(seed: int) -> int:
  """grain's shuffle seed for the training stream of run seed `seed`: seed * 0x9E3779B1 mod 2**32
  (Knuth's multiplicative hash; a bijection, and 0 stays 0).

  grain shuffles epoch e of a repeated dataset with its seed + e, so raw run seeds s and s + 1 would
  see the same orders one epoch apart (a seed sweep trained on shifted copies of one data order).
  Hashed, run seeds 0..10,000 are at least 341,411 epochs apart."""
  return (int(seed) * 0x9E3779B1) % 2**32


# The seeded training streams' version, saved with the iterator state: 1 shuffled with the run seed
# itself (before 2026-12-04), 2 with epoch_shuffle_seed(seed).
STREAM_VERSION = 2


def check_stream_version(saved_version: int, seed: int, workdir) -> None:
  """Refuses to resume a training stream saved under another STREAM_VERSION when the two orders
  differ for `seed` (they agree for seed 0): the saved position in the epoch would index another
  permutation, repeating some windows and skipping others."""
  if saved_version == STREAM_VERSION or epoch_shuffle_seed(seed) == int(seed) % 2**32:
    return
  raise ValueError(f"{workdir} was trained with jaxlab's earlier training stream (shuffled with the "
                   f"run seed itself, not a hash of it), which differs for config.seed={seed}: "
                   "resuming would repeat and skip windows of the current epoch; nothing was "
                   "changed (finish it with the jaxlab that started it, or use a new --workdir)")


def rows_batch_fn(batch_fn, rows: np.ndarray | None):
  """A grain `batch_fn` that stacks only the elements `rows` (indices into each global batch; None:
  all of them) of each global batch: every process draws the same global batch (the order does not
  depend on the number of hosts) but copies only its own rows (`sharding.process_batch_rows`)."""
  if rows is None:
    return batch_fn
  def own_rows(elements):
    elements = list(elements)
    return batch_fn([elements[i] for i in rows])
  return own_rows


def train_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                  rows: np.ndarray | None = None,
                  read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """Infinite iterator of {"inputs", "targets"}: int32 [len(rows) or batch_size, seq_len], the rows
  `rows` (None: all) of each global batch of `batch_size` windows.

  `read_options` None reads each batch in the calling thread when it is asked for: grain's default
  (16 threads, 500 batches ahead) costs more CPU than these windows do and competes with the train
  step for the cores, and the train loop already reads the next batch while a step computes
  (experiments/results/lm_char_cpu_input_overlap.md).
  """
  dataset = (grain.MapDataset.source(WindowSource(tokens, seq_len))
             .shuffle(seed=epoch_shuffle_seed(seed))
             .repeat()
             .batch(batch_size, drop_remainder=True,
                    batch_fn=rows_batch_fn(_to_example, rows)))
  if read_options is None:
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return iter(dataset.to_iter_dataset(read_options))


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, num_batches: int,
                 seed: int, rows: np.ndarray | None = None) -> Iterator[dict]:
  """The fixed evaluation set: `num_batches` batches of seeded random windows (fewer if the split is
  short); of each, the rows `rows` (None: all)."""
  source = WindowSource(tokens, seq_len)
  dataset = (grain.MapDataset.source(source).shuffle(seed=seed)
             .batch(batch_size, drop_remainder=True,
                    batch_fn=rows_batch_fn(_to_example, rows)))
  for i in range(min(num_batches, len(dataset))):
    yield dataset[i]
