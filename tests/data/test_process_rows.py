"""Each process of a multi-process run copies only its own rows of every global batch (LM windows,
binary images, image-text pairs), and its rows are exactly that block of the 1-process global batch:
so the data a run trains on does not depend on the number of hosts. Processes are simulated here by
patching jax.process_count / process_index (tests/train/test_multiprocess.py runs real ones)."""

import jax
import numpy as np
import pytest

from jaxlab.configs import load_config
from jaxlab.data import binary_images as bi
from jaxlab.data import pipeline

PROCESSES = 4


def _as_process(monkeypatch, index, count=PROCESSES):
  monkeypatch.setattr(jax, "process_count", lambda: count)
  monkeypatch.setattr(jax, "process_index", lambda: index)


def _per_process(monkeypatch, make_batches):
  """[process][batch] of `make_batches()` run as each of PROCESSES processes in turn."""
  out = []
  for index in range(PROCESSES):
    _as_process(monkeypatch, index)
    out.append(make_batches())
  monkeypatch.undo()
  return out


def _assert_blocks_of(global_batches, per_process):
  for b, whole in enumerate(global_batches):
    for key, value in whole.items():
      joined = np.concatenate([batches[b][key] for batches in per_process])
      np.testing.assert_array_equal(joined, value, err_msg=f"batch {b}, {key}")
      assert all(len(batches[b][key]) == len(value) // PROCESSES for batches in per_process)


def test_the_grain_batch_fn_stacks_only_this_process_s_elements(monkeypatch):
  seen = []
  _as_process(monkeypatch, 2)
  batch_fn = pipeline.own_rows_batch_fn(lambda elements: seen.append(list(elements)), 8)
  batch_fn(list(range(8)))
  assert seen == [[4, 5]]


def test_lm_windows(monkeypatch):
  tokens = np.arange(500) % 37
  train = lambda: [next(it) for it in [pipeline.train_batches(tokens, seq_len=5, batch_size=8, seed=3)]
                   for _ in range(3)]
  evals = lambda: list(pipeline.eval_batches(tokens, seq_len=5, batch_size=8, num_batches=3, seed=1))
  for make in (train, evals):
    _assert_blocks_of(make(), _per_process(monkeypatch, make))


@pytest.mark.parametrize("dynamic", [True, False])
def test_binary_images_train_batches(monkeypatch, dynamic):
  data = np.random.default_rng(0).random((37, 6)).astype(np.float32)
  if not dynamic:
    data = (data > 0.5).astype(np.float32)

  def make():
    batches = bi.TrainBatches(data, batch_size=8, seed=5, dynamic=dynamic)
    return [next(batches) for _ in range(6)]  # crosses an epoch (4 batches of 8 in 37)
  _assert_blocks_of(make(), _per_process(monkeypatch, make))


def test_binary_images_eval_batches_pad_each_process_s_block(monkeypatch):
  data = (np.random.default_rng(1).random((21, 6)) > 0.5).astype(np.float32)
  make = lambda: list(bi.eval_batches(data, batch_size=8))
  whole = make()
  assert whole[-1]["weights"].tolist() == [1] * 5 + [0] * 3  # 21 = 8 + 8 + 5
  _assert_blocks_of(whole, _per_process(monkeypatch, make))


def test_image_text_pairs(monkeypatch, tfds_dir):
  from jaxlab.train import contrastive_task as ct
  task = ct.build(load_config("contrastive_digits", [f"--config.data.data_dir={tfds_dir}",
                                                     "--config.data.batch_size=16"]))
  train = lambda: [b for b, _ in zip(task.train_iterator(), range(2))]
  evals = lambda: [b for b, _ in zip(task.eval_iterator(), range(2))]
  for make in (train, evals):
    _assert_blocks_of(make(), _per_process(monkeypatch, make))
