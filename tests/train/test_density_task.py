"""The density task: config checks naming the key, training through the generic trainer (the validation
loss equals a direct per-example NLL), MADE's per-step mask draw, and the experiment's --quick mode."""

import importlib.util
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.configs import ConfigError, load_config
from jaxlab.data import binary_images
from jaxlab.train import checkpoint as checkpoint_lib, trainer
from jaxlab.train.density_task import DensityTask
from jaxlab.train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config,override,key", [
    ("made", "--config.data.name=cifar", "config.data.name"),
    ("nade", "--config.model.hidden=(10, 10)", "config.model.hidden"),
    ("pixelcnn", "--config.data.name=dna", "config.data.name"),
    ("pixelcnn", "--config.model.first_kernel=4", "config.model.first_kernel"),
    ("pixelcnn", "--config.model.first_kernel=1", "config.model.first_kernel"),
    ("fvsbn", "--config.model.num_masks=4", "config.model.num_masks"),
    ("made", "--config.model.hidden=(0,)", "config.model.hidden"),
    ("made", "--config.model.name=rbm", "config.model.name"),
    ("made", "--config.data.static_binarization=True", "config.data.static_binarization"),
    # The gated PixelCNN's 1x1 first layer never sees the current row (it was accepted).
    ("pixelcnn", ("--config.model.name=gated_pixelcnn", "--config.model.first_kernel=1"),
     "config.model.first_kernel"),
    ("nade", "--config.model.direct=True", "config.model.direct"),
    ("made", ("--config.model.num_masks=4", "--config.model.order_agnostic=False",
              "--config.model.connectivity_agnostic=False"), "config.model.num_masks"),
    # Sizes far beyond the papers': a NumPy MemoryError building MADE's masks, or a hang in tracing.
    ("made", "--config.model.hidden=(16, 1000000000)", "config.model.hidden=(16, 1000000000) must "
                                                       "be <= 100000 per layer"),
    ("made", "--config.model.num_masks=10000000", "config.model.num_masks=10000000 must be <= 4096"),
    ("pixelcnn", "--config.model.num_layers=100000", "config.model.num_layers=100000 must be <= "
                                                     "1000"),
])
def test_bad_config_fails_naming_the_key(config, override, key):
  overrides = list(override) if isinstance(override, tuple) else [override]
  with pytest.raises(ConfigError, match=re.escape(key)):
    load_config(config, overrides, check_devices=False)


def _tiny_data():
  rng = np.random.default_rng(0)
  proto = rng.random((3, 16)) < 0.5
  pick = lambda n, s: (proto[np.random.default_rng(s).integers(0, 3, n)] ^
                       (np.random.default_rng(s + 1).random((n, 16)) < 0.05)).astype(np.float32)
  return binary_images.BinaryDataset("tiny", pick(64, 1), pick(20, 3), pick(20, 5), (4, 4), False,
                                     "tiny test data")


def _model_flags(model: str, **values) -> list[str]:
  """--config.model.KEY=VALUE for the keys `model` reads (a new run refuses the others)."""
  from jaxlab.train.density_task import MODEL_KEYS
  return [f"--config.model.{k}={v}" for k, v in values.items()
          if k not in MODEL_KEYS["pixelcnn"] + MODEL_KEYS["made"] or k in MODEL_KEYS[model]]


@pytest.mark.parametrize("model", ["made"])  # the PixelCNNs train in the --quick test below
def test_trains_and_validation_loss_is_the_mean_nll(tmp_path, model):
  config = load_config("pixelcnn" if "pixelcnn" in model else "made", [
      f"--config.model.name={model}", "--config.data.batch_size=16", "--config.train.steps=40",
      "--config.train.eval_every=40", "--config.train.checkpoint_every=40",
      "--config.train.log_every=20", "--config.optim.warmup_steps=5", "--config.optim.lr=0.01",
      *_model_flags(model, hidden="(32,)", channels=8, num_layers=1, first_kernel=3),
      "--config.eval.batch_size=8",
      *(["--config.model.num_masks=3"] if model == "made" else [])])
  data = _tiny_data()
  task = DensityTask(config, data=data)
  initial = task.nll(jax.device_get(trainer.init_state(trainer.setup(config, tmp_path / "init",
                                                                      task=task))["params"]),
                     data.valid)
  result = trainer.train(config, tmp_path / "run", task=task, progress=False)
  params = result["state"]["params"]
  direct = task.nll(params, data.valid)  # 20 examples: 2 batches of 16, the second padded
  np.testing.assert_allclose(result["val_loss"], direct, rtol=1e-5)
  assert direct < initial - 2.0  # learned something (16 dims, 3 prototypes)
  if model == "made":  # training draws one of the 3 mask sets per step; the test NLL averages them
    log_probs = np.stack([np.asarray(task.log_prob(params, data.valid, mask_index=k), np.float64)
                          for k in range(3)])  # [K, N]
    per_mask = [float(-lp.mean()) for lp in log_probs]
    # The reported NLL is the K-mask ensemble: -mean log((1/K) sum_k p_k(x)), not any one set's.
    ensemble = -np.mean(np.logaddexp.reduce(log_probs, axis=0) - np.log(3))
    np.testing.assert_allclose(direct, ensemble, rtol=1e-5)
    assert direct < max(per_mask)
    # Each set was trained alike (measured: 8.59, 8.37, 8.98 from 11.16). Training with set 0 only
    # gives 7.40, 9.25, 9.67: a spread of 2.3 and a set that learned 1.5 nats, which fail here.
    assert max(per_mask) - min(per_mask) < 1.2, per_mask
    assert all(nll < initial - 1.8 for nll in per_mask), (initial, per_mask)
  test_nll = task.nll(params, data.test)  # finish reports the test split's NLL, not validation's
  assert abs(test_nll - direct) > 1e-3
  assert f"test NLL {test_nll:.3f} nats" in task.finish(params)



@pytest.mark.parametrize("model", ["fvsbn", "nade", "made", "pixelcnn", "gated_pixelcnn"])
def test_sharded_training_equals_single_device_step_for_step(tmp_path, model):
  """Three trainer steps on a data 4 x fsdp 2 mesh give the 1-device run's losses and
  parameters, and fsdp really shards the parameters (the models name logical axes: without
  them every parameter was replicated)."""
  from jaxlab.train.metrics import read_metrics
  base = "pixelcnn" if "pixelcnn" in model else "made"
  common = [f"--config.model.name={model}", "--config.data.batch_size=16", "--config.train.steps=3",
            "--config.train.eval_every=3", "--config.train.checkpoint_every=3",
            "--config.train.log_every=1", "--config.optim.warmup_steps=1", "--config.optim.lr=0.01",
            *_model_flags(model, hidden="(8, 8)" if model == "made" else "(8,)", channels=4,
                          num_layers=1, first_kernel=3),
            "--config.eval.batch_size=8",
            "--config.train.keep_best=False"]
  runs = {}
  for name, mesh in (("single", (1, 1, 1)), ("sharded", (4, 2, 1))):
    config = load_config(base, common + [f"--config.mesh.{axis}={size}" for axis, size in
                                         zip(("data", "fsdp", "tensor"), mesh)])
    task = DensityTask(config, data=_tiny_data())
    result = trainer.train(config, tmp_path / name, task=task, progress=False)
    params = result["state"]["params"]
    if name == "sharded":
      split = [jax.tree_util.keystr(path) for path, leaf in
               jax.tree_util.tree_leaves_with_path(params)
               if len(leaf.addressable_shards[0].data.shape) and
               leaf.addressable_shards[0].data.size < leaf.size]
      assert split, "no parameter is sharded"
    losses = [m["train_loss"] for m in read_metrics(tmp_path / name) if "train_loss" in m]
    runs[name] = (losses, jax.device_get(params))
  (ref_losses, ref_params), (losses, params) = runs["single"], runs["sharded"]
  assert len(losses) == 3 and losses[-1] != losses[0]
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), params,
               ref_params)

def test_keep_best_saves_the_lowest_validation_loss_params_and_survives_a_resume(tmp_path):
  """train.keep_best: WORKDIR/best holds the parameters of the evaluation with the lowest validation
  loss (so restoring them reproduces that loss), and a resumed run starts from that record."""
  overrides = ["--config.data.batch_size=16", "--config.train.eval_every=5",
               "--config.train.checkpoint_every=10", "--config.train.log_every=10",
               "--config.optim.warmup_steps=1", "--config.optim.lr=0.3", "--config.optim.min_lr=0.3",
               "--config.model.hidden=(32,)", "--config.eval.batch_size=8"]
  data = _tiny_data()
  config = load_config("made", overrides + ["--config.train.steps=20"], check_devices=False)
  task = DensityTask(config, data=data)
  result = trainer.train(config, tmp_path, task=task, progress=False)
  vals = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r}
  assert sorted(vals) == [5, 10, 15, 20]
  best_step = min(vals, key=vals.get)
  assert (result["best_step"], result["best_val_loss"]) == (best_step, vals[best_step])
  step, best, _ = trainer.restore_best_params(result["run"])
  assert step == best_step
  np.testing.assert_allclose(task.nll(best, data.valid), vals[best_step], rtol=1e-5)
  # resumed for 20 more steps: the record carries over and only a lower loss replaces it
  config = load_config("made", overrides + ["--config.train.steps=40"], check_devices=False)
  result = trainer.train(config, tmp_path, task=DensityTask(config, data=data), progress=False)
  vals = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r}
  best_step = min(vals, key=vals.get)
  assert (result["best_step"], result["best_val_loss"]) == (best_step, vals[best_step])
  step, best, _ = trainer.restore_best_params(result["run"])
  assert step == best_step
  np.testing.assert_allclose(task.nll(best, data.valid), vals[best_step], rtol=1e-5)


def test_a_resume_does_not_trust_an_edited_val_loss_in_metrics_jsonl(tmp_path, capsys):
  """A run resumed at an evaluation step offered the val_loss read back from metrics.jsonl to the
  best-params record: a digit edited there (no checksum) chose the reported parameters."""
  import shutil
  overrides = ["--config.data.batch_size=16", "--config.train.eval_every=10",
               "--config.train.checkpoint_every=10", "--config.train.log_every=10",
               "--config.optim.warmup_steps=1", "--config.model.hidden=(16,)",
               "--config.eval.batch_size=8"]
  data = _tiny_data()
  config = load_config("made", overrides + ["--config.train.steps=20"], check_devices=False)
  trainer.train(config, tmp_path, task=DensityTask(config, data=data), progress=False)
  shutil.rmtree(tmp_path / "best")  # as if killed before step 20's record (and 10's) was written
  path = tmp_path / "metrics.jsonl"
  records = [json.loads(line) for line in path.read_text().splitlines()]
  true_loss = next(r["val_loss"] for r in records if r["step"] == 20 and "val_loss" in r)
  for r in records:
    if r["step"] == 20 and "val_loss" in r:
      r["val_loss"] = true_loss / 2  # edited
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  capsys.readouterr()
  config = load_config("made", overrides + ["--config.train.steps=30"], check_devices=False)
  trainer.train(config, tmp_path, task=DensityTask(config, data=data), progress=False)
  assert f"but checkpoint 20 evaluates to {true_loss}" in capsys.readouterr().err
  best = checkpoint_lib.BestParams(tmp_path, create=False)
  assert best.val_loss > true_loss / 2 * 1.5  # the real evaluation's, not the edited number
  best.close()


def test_a_workdir_trained_with_other_made_masks_is_refused(tmp_path, monkeypatch):
  """MADE's masks are drawn from config.model.mask_seed by NumPy's random stream, which NumPy may
  change between versions: a run whose masks come out differently must not resume (or evaluate) the
  saved weights with them."""
  data = _tiny_data()
  config = load_config("made", ["--config.data.batch_size=16", "--config.train.steps=5",
                                "--config.train.eval_every=5", "--config.train.checkpoint_every=5",
                                "--config.train.log_every=5", "--config.optim.warmup_steps=1",
                                "--config.model.hidden=(32,)", "--config.model.num_masks=2",
                                "--config.eval.batch_size=8"], check_devices=False)
  trainer.train(config, tmp_path, task=DensityTask(config, data=data), progress=False)
  saved = (tmp_path / trainer.MODEL_FINGERPRINT).read_text()
  trainer.setup(config, tmp_path, task=DensityTask(config, data=data)).checkpointer.close()  # same
  draw = np.random.default_rng
  monkeypatch.setattr(np.random, "default_rng", lambda seed: draw(seed + 1))  # "another NumPy"
  with pytest.raises(ValueError, match="MADE's masks from config.model.mask_seed"):
    trainer.setup(config, tmp_path, task=DensityTask(config, data=data))
  assert (tmp_path / trainer.MODEL_FINGERPRINT).read_text() == saved  # nothing was changed


def test_a_fresh_run_moves_an_earlier_best_record_aside(tmp_path, capsys):
  """Training from step 0 in a workdir whose checkpoints are gone must not inherit WORKDIR/best of the
  earlier run (its record could beat every new evaluation): it is set aside (intact, so not among
  the corrupt checkpoints)."""
  import shutil
  data = _tiny_data()
  config = load_config("made", ["--config.data.batch_size=16", "--config.train.steps=10",
                                "--config.train.eval_every=5", "--config.train.checkpoint_every=10",
                                "--config.train.log_every=5", "--config.optim.warmup_steps=1",
                                "--config.model.hidden=(32,)", "--config.eval.batch_size=8"],
                       check_devices=False)
  first = trainer.train(config, tmp_path, task=DensityTask(config, data=data), progress=False)
  shutil.rmtree(tmp_path / "checkpoints")
  (tmp_path / "metrics.jsonl").unlink()
  second = trainer.train(config, tmp_path, task=DensityTask(config, data=data), progress=False)
  assert "was saved before any checkpoint of this workdir: by an earlier run" in capsys.readouterr().out
  assert [p.name.split(".")[0] for p in (tmp_path / "set_aside_checkpoints").iterdir()] == ["best"]
  assert not (tmp_path / "corrupt_checkpoints").exists()
  assert second["best_val_loss"] == first["best_val_loss"]  # the same run again, deterministic


def test_experiment_quick_mode_runs(tmp_path):
  spec = importlib.util.spec_from_file_location("binary_density", REPO / "experiments" /
                                                "binary_density.py")
  exp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exp)
  assert exp.main(["--quick", "--steps", "4", "--out", str(tmp_path),
                   "--only", "digits:made_k32,digits:gated_pixelcnn"]) == 0
  rows = json.loads((tmp_path / "binary_density_quick.json").read_text())["rows"]
  assert [r["model"] for r in rows] == ["made_k32", "gated_pixelcnn"]
  assert all(np.isfinite(r["test_nll"]) and r["test_nll"] > 0 for r in rows)
  assert (tmp_path / "binary_density_quick_digits_gated_pixelcnn.png").stat().st_size > 0
  assert "| digits | made_k32 |" in (tmp_path / "binary_density_quick.md").read_text()


def test_every_planned_run_has_a_valid_config(tmp_path):
  """The full plan's overrides (direct connections, weight decay, eval cadence, static MNIST) all name
  real keys of their model's config; a bad one fails before any training starts."""
  spec = importlib.util.spec_from_file_location("binary_density", REPO / "experiments" /
                                                "binary_density.py")
  exp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exp)
  for quick in (True, False):
    for dataset_name, label, overrides, steps in exp.plan(quick, 1.0, None):
      config = exp.run_config(dataset_name, label, overrides, steps, quick)
      assert config.train.steps == steps and config.model.name in label
  static = exp.run_config("mnist-static", "nade", [], 10, False)
  assert static.data.name == "mnist" and static.data.static_binarization
  assert exp.run_config("dna", "made_k32", [], 10, False).model.num_masks == 32
  with pytest.raises(ConfigError, match="direkt"):
    exp.main(["--only", "dna:fvsbn,dna:made", "--extra=--config.model.direkt=True",
              "--out", str(tmp_path), "--workroot", str(tmp_path / "runs")])
  assert not list(tmp_path.glob("binary_density*"))  # nothing trained, no table written


def test_nll_refuses_a_split_that_is_not_binary():
  config = load_config("made", ["--config.model.hidden=(8,)", "--config.data.batch_size=16"],
                       check_devices=False)
  task = DensityTask(config, data=_tiny_data())
  params = task.init_params(jax.random.PRNGKey(0))
  grey = _tiny_data().valid * 0.5
  with pytest.raises(ValueError, match="split must hold only 0 and 1"):
    task.nll(params, grey)
  assert np.isfinite(task.nll(params, _tiny_data().valid))


@pytest.mark.parametrize("name,overrides,key", [
    ("made", ["--config.model.channels=8"], "config.model.channels=8 applies to"),
    ("nade", ["--config.model.num_layers=9"], "config.model.num_layers=9 applies to"),
    ("pixelcnn", ["--config.model.hidden=(7,)"], "config.model.hidden=(7,) applies to"),
    ("fvsbn", ["--config.model.mask_seed=3"], "config.model.mask_seed=3 applies to"),
    # pixelcnn's own num_layers (4) under another model: the way out is that model's config
    ("pixelcnn", ["--config.model.name=made"], "set it to 5 (or train made's own config: "
                                                "`jaxlab train made`)"),
    ("made", ["--config.data.path=/nonexistent"], "config.data.path='/nonexistent' is not read"),
    ("made", ["--config.data.binarize_seed=5"], "config.data.binarize_seed=5 is not read"),
    ("made", ["--config.sample.grid_path=/tmp"], "config.sample.grid_path='/tmp' must name a .png"),
    # A file where a folder should be failed after training (and lost the test NLL line).
    ("made", ["--config.sample.grid_path=" + __file__ + "/sub/g.png"], "cannot be written: "
                                                                      f"{__file__} is not a folder"),
    ("made", ["--config.data.name=dna", "--config.sample.grid_path=/tmp/g.png"],
     "config.sample.grid_path='/tmp/g.png' applies to the image datasets"),  # no grid for UCI
])
def test_options_the_model_or_data_do_not_read_are_refused_for_a_new_run(name, overrides, key):
  """They were trained without a word (ignored), and a grid_path that is a folder failed after
  training with PIL's "unknown file extension"."""
  from jaxlab.configs import ConfigError
  with pytest.raises(ConfigError, match=re.escape(key)):
    load_config(name, overrides, check_devices=False)
  load_config("made", ["--config.data.name=mnist", "--config.data.binarize_seed=5",
                       "--config.sample.grid_path=/tmp/g.png"], check_devices=False)  # read


def test_an_eval_batch_larger_than_the_split_is_cut_to_it():
  """eval.batch_size=10**9 trained the whole run and then allocated 10**9 padding rows in finish()."""
  data = _tiny_data()
  flags = ["--config.data.batch_size=16", "--config.model.hidden=(32,)"]
  small = DensityTask(load_config("made", flags + ["--config.eval.batch_size=8"],
                                  check_devices=False), data=data)
  huge = DensityTask(load_config("made", flags + ["--config.eval.batch_size=1000000000"],
                                 check_devices=False), data=data)
  params = small.init_params(jax.random.key(0))
  np.testing.assert_allclose(huge.nll(params, data.test), small.nll(params, data.test), rtol=1e-6)


def test_the_test_nll_of_a_multi_process_run_covers_the_whole_split(monkeypatch):
  """finish() runs on process 0 alone, on its copy of the parameters: its NLL covered only that
  process's rows of each batch (half the split with 2 processes; found by review)."""
  data = _tiny_data()
  task = DensityTask(load_config("made", ["--config.data.batch_size=16", "--config.model.hidden=(32,)",
                                          "--config.eval.batch_size=8"], check_devices=False),
                     data=data)
  params = task.init_params(jax.random.key(0))
  want = np.mean(-np.asarray(task.log_prob(params, jnp.asarray(data.test, jnp.float32)), np.float64))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  np.testing.assert_allclose(task.nll(params, data.test), want, rtol=1e-5)


def test_resuming_with_another_model_names_the_model_first(tmp_path):
  """The refusal named the first differing key alphabetically (config.model.hidden), not the
  other model that explains it; it is a config error (`jaxlab` exits 2)."""
  data = _tiny_data()
  common = ["--config.data.batch_size=16", "--config.train.steps=2", "--config.train.eval_every=2",
            "--config.train.checkpoint_every=2", "--config.train.log_every=2",
            "--config.optim.warmup_steps=1", "--config.eval.batch_size=8"]
  made = load_config("made", common + ["--config.model.hidden=(32,)"], check_devices=False)
  trainer.train(made, tmp_path, task=DensityTask(made, data=data), progress=False)
  nade = load_config("nade", common + ["--config.model.hidden=(8,)"], check_devices=False)
  with pytest.raises(ConfigError, match=r"checkpoints trained with config\.model\.name='made' .*"
                                        r"but this run has 'nade'"):
    trainer.setup(nade, tmp_path, task=DensityTask(nade, data=data))
  # Another task altogether: the task is named, not the model or dataset names it implies.
  other = load_config("contrastive_digits", [], check_devices=False)
  with pytest.raises(ConfigError, match=r"checkpoints trained with config\.task='density' .*"
                                        r"but this run has 'contrastive'"):
    trainer.setup(other, tmp_path)


def test_a_grid_that_cannot_be_written_keeps_the_test_nll_in_the_error(monkeypatch, tmp_path):
  """finish() built the NLL line, then save_grid raised and only the OS error was printed."""
  from jaxlab.train import density_task
  config = load_config("made", ["--config.data.batch_size=16", "--config.model.hidden=(8,)",
                                f"--config.sample.grid_path={tmp_path / 'g.png'}"],
                       check_devices=False)
  data = _tiny_data()
  task = DensityTask(config, data=data)
  params = task.init_params(jax.random.key(0))
  for error, kind in ((OSError(28, "No space left on device"), OSError),
                      (OSError("encoder error -2"), OSError),  # no errno: was "[Errno None] ..."
                      (RuntimeError("XLA ran out of memory"), RuntimeError)):
    def fail(*args, error=error, **kwargs):
      raise error
    monkeypatch.setattr(density_task, "save_grid", fail)
    with pytest.raises(kind, match=r"^(\[Errno 28\] )?test NLL \d+\.\d+ nats per example .*; but the "
                                   r"samples could not be drawn or written to config\.sample\."
                                   r"grid_path=.*: (No space left|encoder error|XLA ran out)"):
      task.finish(params)


def test_evaluating_on_data_of_another_width_blames_the_data(tmp_path):
  """A dna run evaluated on another file said its MADE masks differ because "this NumPy draws other
  masks"; the data check now runs before the model-structure check."""
  common = ["--config.data.batch_size=16", "--config.train.steps=2", "--config.train.eval_every=2",
            "--config.train.checkpoint_every=2", "--config.train.log_every=2",
            "--config.optim.warmup_steps=1", "--config.eval.batch_size=8",
            "--config.model.hidden=(32,)"]
  config = load_config("made", common, check_devices=False)
  trainer.train(config, tmp_path, task=DensityTask(config, data=_tiny_data()), progress=False)
  data = _tiny_data()
  narrow = binary_images.BinaryDataset("tiny", data.train[:, :9], data.valid[:, :9],
                                       data.test[:, :9], None, False, "narrower data")
  with pytest.raises(ValueError, match="data") as info:
    trainer.setup(config, tmp_path, task=DensityTask(config, data=narrow), reading=True)
  assert "masks" not in str(info.value)


def test_sampling_refuses_parameters_with_non_finite_log_probabilities():
  """Samples of NaN parameters were printed as images (exit 0)."""
  import types
  config = load_config("made", ["--config.data.batch_size=16", "--config.model.hidden=(8,)"],
                       check_devices=False)
  task = DensityTask(config, data=_tiny_data())
  params = task.init_params(jax.random.key(0))
  args = types.SimpleNamespace(num_tokens=2, seed=0)
  assert task.sample_command(params, args).count("#") + task.sample_command(params, args).count(".")
  broken = jax.tree.map(lambda p: p * np.nan, params)
  with pytest.raises(FloatingPointError, match="non-finite log-probability"):
    task.sample_command(broken, args)


def test_mixed_precision_training_scales_float16_and_tracks_float32(tmp_path):
  """config.model.dtype: bfloat16 trains to the float32 run's losses within its precision; float16
  turns dynamic loss scaling on by itself (optim.loss_scale=auto); int8 is refused by name."""
  from jaxlab.configs import ConfigError
  from jaxlab.train.metrics import read_metrics
  data = _tiny_data()
  flags = ["--config.data.batch_size=16", "--config.train.steps=30", "--config.train.eval_every=30",
           "--config.train.checkpoint_every=30", "--config.train.log_every=10",
           "--config.optim.warmup_steps=2", "--config.optim.lr=0.01", "--config.model.hidden=(32,)",
           "--config.eval.batch_size=8", "--config.train.keep_best=False"]
  losses = {}
  for dtype in ("float32", "bfloat16", "float16"):
    config = load_config("made", flags + [f"--config.model.dtype={dtype}"], check_devices=False)
    result = trainer.train(config, tmp_path / dtype, task=DensityTask(config, data=data),
                           progress=False)
    assert ("loss_scale" in result["state"]) == (dtype == "float16")
    losses[dtype] = [r["train_loss"] for r in read_metrics(tmp_path / dtype) if "train_loss" in r]
  assert losses["float32"][-1] < losses["float32"][0] - 1.0  # it learned
  for dtype in ("bfloat16", "float16"):
    np.testing.assert_allclose(losses[dtype], losses["float32"], rtol=0.03)
    assert losses[dtype] != losses["float32"]
  with pytest.raises(ConfigError, match="config.model.dtype='int8' must be one of float32"):
    load_config("made", ["--config.model.dtype=int8"], check_devices=False)
