"""Each process of a multi-process run copies only its own rows of every global batch (LM windows,
binary images, image-text pairs): the rows its devices hold under the batch sharding
(`sharding.process_batch_rows`), in the order jax.make_array_from_process_local_data reads them. So
the global batch the devices see is the 1-process one, whatever the number of hosts and however the
mesh orders their devices (a contiguous block per process on CPU/GPU; interleaved processes, as
jax.make_mesh may give on a TPU pod, are simulated here). Processes are simulated by patching
jax.process_count / process_index and the device -> process map (tests/train/test_multiprocess.py
runs real ones)."""

import jax
import numpy as np
import pytest

from jaxlab.configs import load_config
from jaxlab.data import binary_images as bi
from jaxlab.data import pipeline
from jaxlab.train import sharding

PROCESSES = 4
# Device -> process maps over the 8 devices of a (data=8) or (data=4, fsdp=2) mesh, whose devices
# jax.make_mesh orders by id on CPU: blocks (process p owns devices 2p, 2p+1, as on CPU/GPU) and
# interleaved (p owns devices p and p+4: the processes alternate along the batch axes).
LAYOUTS = {"blocks": lambda device: device.id // 2, "interleaved": lambda device: device.id % 4}


def _as_process(monkeypatch, index, layout):
  monkeypatch.setattr(jax, "process_count", lambda: PROCESSES)
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(sharding, "_process_of", LAYOUTS[layout])


def _global_batches(monkeypatch, make_batches, rows_of, layout):
  """The global batches the devices would hold when each simulated process supplies its batches of
  `make_batches()`: process p's rows go to rows_of(p) (ascending), as make_array_from_process_local_data
  places them."""
  per_process, rows = [], []
  for p in range(PROCESSES):
    _as_process(monkeypatch, p, layout)
    rows.append(rows_of())
    per_process.append(make_batches())
  monkeypatch.undo()
  assembled = []
  for b in range(len(per_process[0])):
    batch = {}
    for key in per_process[0][b]:
      parts = [batches[b][key] for batches in per_process]
      out = np.zeros((sum(map(len, parts)),) + parts[0].shape[1:], parts[0].dtype)
      for own, part in zip(rows, parts):
        assert len(part) == len(own)
        out[own] = part
      batch[key] = out
    assembled.append(batch)
  assert sorted(np.concatenate(rows).tolist()) == list(range(sum(map(len, rows))))  # a partition
  return assembled, rows


def _assert_same(global_batches, assembled):
  assert len(global_batches) == len(assembled)
  for b, (whole, joined) in enumerate(zip(global_batches, assembled)):
    assert whole.keys() == joined.keys()
    for key in whole:
      np.testing.assert_array_equal(joined[key], whole[key], err_msg=f"batch {b}, {key}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mesh_sizes", [(8, 1, 1), (4, 2, 1), (2, 2, 2)])
def test_process_rows_are_the_rows_each_process_s_devices_hold(monkeypatch, layout, mesh_sizes):
  mesh = sharding.make_mesh(mesh_sizes)
  held = sharding.batch_sharding(mesh).devices_indices_map((16,))
  rows = []
  for p in range(PROCESSES):
    _as_process(monkeypatch, p, layout)
    rows.append(sharding.process_batch_rows(mesh, 16))
  monkeypatch.undo()
  for device, (index,) in held.items():
    assert set(range(16)[index]) <= set(rows[LAYOUTS[layout](device)].tolist())
  for own in rows:
    assert own.tolist() == sorted(own.tolist())
  if mesh_sizes[2] == 1:  # every device holds distinct rows: the processes partition the batch
    assert sorted(np.concatenate(rows).tolist()) == list(range(16))
  contiguous = all(own.tolist() == list(range(own[0], own[-1] + 1)) for own in rows)
  assert contiguous == (layout == "blocks")


def test_one_process_supplies_all_rows():
  assert sharding.process_batch_rows(sharding.make_mesh((4, 2, 1)), 16) is None
  assert sharding.config_process_rows(load_config("lm_char").mesh, 16) is None


def test_place_batch_refuses_other_rows_than_the_process_holds():
  mesh = sharding.make_mesh((8, 1, 1))
  batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  placed = sharding.place_batch(batch, mesh, 16)
  np.testing.assert_array_equal(np.asarray(placed["x"]), batch["x"])
  # Rows split over the batch axes, two per device (a replicated placement gave the same numbers).
  assert placed["x"].sharding.spec[0] == ("data", "fsdp")
  assert {shard.data.shape for shard in placed["x"].addressable_shards} == {(2, 3)}
  with pytest.raises(ValueError):
    sharding.place_batch({"x": batch["x"][:8]}, mesh, 16)


def test_mesh_shape_resolves_the_rest_and_refuses_what_does_not_divide():
  assert sharding.mesh_shape((-1, 2, 2), 8) == (2, 2, 2)
  assert sharding.mesh_shape((2, -1, 1), 8) == (2, 4, 1)
  assert sharding.mesh_shape((2, 2, 1), 8) == (2, 2, 1)  # fewer devices than there are: allowed
  # "the rest" of 8 devices with a fixed 3: not 6 of the 8 silently
  with pytest.raises(ValueError, match=r"do not divide the 8 devices"):
    sharding.mesh_shape((-1, 3, 1), 8)
  with pytest.raises(ValueError, match="need 16 devices"):
    sharding.mesh_shape((4, 4, 1), 8)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape((-1, -1, 1), 8)


def test_the_grain_batch_fn_stacks_only_the_given_rows():
  seen = []
  pipeline.rows_batch_fn(lambda elements: seen.append(list(elements)), np.array([1, 5]))(range(8))
  assert seen == [[1, 5]]
  assert pipeline.rows_batch_fn(len, None)(range(8)) == 8


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_lm_windows(monkeypatch, layout):
  tokens = np.arange(500) % 37
  mesh = sharding.make_mesh((4, 2, 1))
  rows_of = lambda: sharding.process_batch_rows(mesh, 8)
  train = lambda rows=None: [next(it) for it in [pipeline.train_batches(
      tokens, seq_len=5, batch_size=8, seed=3, rows=rows)] for _ in range(3)]
  evals = lambda rows=None: list(pipeline.eval_batches(tokens, seq_len=5, batch_size=8,
                                                       num_batches=3, seed=1, rows=rows))
  for make in (train, evals):
    assembled, _ = _global_batches(monkeypatch, lambda: make(rows_of()), rows_of, layout)
    _assert_same(make(), assembled)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dynamic", [True, False])
def test_binary_images_train_batches(monkeypatch, dynamic, layout):
  data = np.random.default_rng(0).random((37, 6)).astype(np.float32)
  if not dynamic:
    data = (data > 0.5).astype(np.float32)
  mesh = sharding.make_mesh((8, 1, 1))
  rows_of = lambda: sharding.process_batch_rows(mesh, 8)

  def make(rows=None):
    batches = bi.TrainBatches(data, batch_size=8, seed=5, dynamic=dynamic, rows=rows)
    return [next(batches) for _ in range(6)]  # crosses an epoch (4 batches of 8 in 37)
  assembled, _ = _global_batches(monkeypatch, lambda: make(rows_of()), rows_of, layout)
  _assert_same(make(), assembled)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_binary_images_eval_batches_pad_each_process_s_rows(monkeypatch, layout):
  data = (np.random.default_rng(1).random((21, 6)) > 0.5).astype(np.float32)
  mesh = sharding.make_mesh((8, 1, 1))
  rows_of = lambda: sharding.process_batch_rows(mesh, 8)
  make = lambda rows=None: list(bi.eval_batches(data, batch_size=8, rows=rows))
  whole = make()
  assert whole[-1]["weights"].tolist() == [1] * 5 + [0] * 3  # 21 = 8 + 8 + 5
  np.testing.assert_array_equal(whole[-1]["x"][5:], 0)
  assembled, rows = _global_batches(monkeypatch, lambda: make(rows_of()), rows_of, layout)
  _assert_same(whole, assembled)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tasks_supply_their_process_s_rows(monkeypatch, layout, tfds_dir, tiny_cli_overrides):
  """The tasks' own iterators, rows from their config's mesh: LM windows, binary images and
  image-text pairs."""
  from jaxlab.train import tasks
  configs = [
      load_config("contrastive_digits", [f"--config.data.data_dir={tfds_dir}",
                                         "--config.data.batch_size=16"]),
      load_config("made", ["--config.data.batch_size=16", "--config.mesh.fsdp=2"]),
      load_config("lm_char", [*tiny_cli_overrides, "--config.data.batch_size=16",
                              "--config.mesh.data=-1"]),
  ]
  for config in configs:
    task = tasks.task_module(config.task).build(config)
    rows_of = lambda: sharding.config_process_rows(config.mesh, 16)
    train = lambda: [b for b, _ in zip(task.train_iterator(), range(2))]
    evals = lambda: [b for b, _ in zip(task.eval_iterator(), range(2))]
    for make in (train, evals):
      assembled, rows = _global_batches(monkeypatch, make, rows_of, layout)
      assert all(len(own) == 4 for own in rows)
      _assert_same(make(), assembled)
