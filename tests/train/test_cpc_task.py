"""The CPC task: `jaxlab train cpc_digits` end to end (loss falls, the linear-probe report, eval on
the workdir), sharded training equals one device step for step, padding rows of the last validation
batch change nothing, and bad configs name their key."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlab import cli
from jaxlab.configs import ConfigError, load_config
from jaxlab.train import cpc_task

TINY = ["--config.model.latent_dim=8", "--config.model.context_dim=16",
        "--config.model.encoder_hidden=16", "--config.data.batch_size=16"]


def test_cli_trains_reports_the_probe_and_evaluates(tmp_path, capsys):
  workdir = tmp_path / "run"
  flags = TINY + ["--config.train.steps=150", "--config.train.log_every=30",
                  "--config.train.eval_every=150", "--config.train.checkpoint_every=150",
                  "--config.optim.warmup_steps=5", "--config.optim.lr=1e-2"]
  assert cli.main(["train", "cpc_digits", "--workdir", str(workdir), "--no-progress"] + flags) == 0
  out = capsys.readouterr().out
  assert "linear probe of the digit on 225 held-out digits" in out
  accuracy = {line.split()[0]: float(line.split()[-1]) for line in out.splitlines()
              if line.strip().endswith(tuple("0123456789")) and " accuracy " in line}
  assert set(accuracy) == {"cpc", "untrained_cpc", "pixels"}
  assert accuracy["pixels"] > 0.9 and all(0.1 < a <= 1.0 for a in accuracy.values())
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r["train_loss"] for r in records if "train_loss" in r]
  assert train[-1] < train[0] - 0.2  # chance is log(16 x 8 = 128) = 4.85; here 4.82 -> 4.51
  assert cli.main(["eval", str(workdir)]) == 0
  evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert evaluated["step"] == 150 and np.isfinite(evaluated["val_loss"])


def test_sharded_training_equals_single_device_step_for_step(assert_sharded_training_matches):
  """data 4 x fsdp 2 (the loss's negatives span the devices) gives the 1-device run's losses."""
  assert_sharded_training_matches("cpc_digits", TINY)


def test_padding_rows_of_an_evaluation_batch_change_nothing():
  task = cpc_task.build(load_config("cpc_digits", TINY, check_devices=False))
  params = nn.meta.unbox(task.init_params(jax.random.PRNGKey(0)))
  x = task.data["valid"][:10].reshape(10, -1)
  real = {"x": x, "weights": np.ones(10, np.float32)}
  padded = {"x": np.concatenate([x, np.ones((6, 64), np.float32)]),
            "weights": np.concatenate([np.ones(10), np.zeros(6)]).astype(np.float32)}
  padded["real"] = padded["weights"]  # zero rows that are no digits
  value, (total, count) = task.loss(params, padded, None, train=False)
  expected, _ = task.loss(params, real, None, train=False)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  assert float(count) == 10 and float(total) == pytest.approx(10 * float(value))


def test_every_validation_batch_has_a_full_batch_of_negatives():
  """225 = 14 x 16 + 1: the last batch scores one digit against 15 digits from the split's start
  (negatives only), as a training batch scores against 16 x 8 rows; zero padding gave that digit
  1 x 8 rows of candidates (a far lower loss, mixed into the mean)."""
  from jaxlab.losses.cpc import cpc_loss
  from jaxlab.models.cpc import CPC
  task = cpc_task.build(load_config("cpc_digits", TINY, check_devices=False))
  params = nn.meta.unbox(task.init_params(jax.random.PRNGKey(0)))
  batches = list(task.eval_iterator())
  assert len(batches) == 15 and all(b["real"].sum() == 16 for b in batches)
  assert sum(b["weights"].sum() for b in batches) == 225
  valid = task.data["valid"].reshape(225, -1)
  last = batches[-1]
  assert last["weights"].tolist() == [1.0] + [0.0] * 15
  np.testing.assert_array_equal(last["x"], np.concatenate([valid[224:], valid[:15]]))
  value, (_, count) = task.loss(params, last, None, train=False)
  z, c = task.model.apply({"params": params}, last["x"].reshape(16, 8, 8))
  predicts = np.arange(16) == 0
  expected = cpc_loss(z, c, params["predictors"], predicts_B=predicts)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  assert float(count) == 1
  alone = task.model.apply({"params": params}, last["x"][:1].reshape(1, 8, 8), method=CPC.loss)
  assert float(value) > float(alone) + 1.0  # log(128) against log(8): the old last batch's loss


def test_a_validation_split_smaller_than_a_batch_is_zero_padded():
  """A batch larger than the 225 validation digits holds each digit once; the rest are zero rows
  that are neither scored nor negatives (a digit twice would be its own negative)."""
  task = cpc_task.build(load_config("cpc_digits", TINY + ["--config.data.batch_size=256"],
                                    check_devices=False))
  (batch,) = list(task.eval_iterator())
  assert batch["weights"].sum() == batch["real"].sum() == 225
  assert not batch["x"][225:].any()


def test_the_split_is_seeded_and_disjoint():
  a, b = cpc_task.load_digit_sequences(0), cpc_task.load_digit_sequences(0)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert [len(a[k]) for k in ("train", "valid", "test")] == [1347, 225, 225]
  rows = {x.tobytes() for k in ("train", "valid", "test") for x in a[k]}
  assert len(rows) >= 1797 - 10  # scikit-learn's digits hold a few exact duplicates
  assert not np.array_equal(cpc_task.load_digit_sequences(1)["test"], a["test"])
  assert a["train"].shape[1:] == (8, 8) and 0.0 <= a["train"].min() and a["train"].max() <= 1.0


@pytest.mark.parametrize("override,key", [
    ("--config.model.steps=8", "config.model.steps=8 must be < the 8 rows"),
    ("--config.train.microbatches=2", "config.train.microbatches=2 must be 1 for the CPC task"),
    ("--config.data.batch_size=1", "config.data.batch_size=1 must be >= 2"),
    ("--config.model.encoder_hidden=-1", "config.model.encoder_hidden=-1 must be an int >= 0"),
    ("--config.model.latent_dim=0", "config.model.latent_dim"),
    ("--config.data.name=mnist", "config.data.name"),
    ("--config.mesh.tensor=2", "config.mesh.tensor=2: task 'cpc' has no tensor-parallel axis"),
])
def test_bad_configs_name_the_key(override, key):
  with pytest.raises(ConfigError) as e:
    load_config("cpc_digits", [override])
  assert key in str(e.value) and "\n" not in str(e.value)


def test_the_probe_s_baseline_is_the_run_s_initial_parameters(tmp_path):
  """It was another random draw (PRNGKey(seed) instead of the trainer's params key)."""
  from jaxlab.train import trainer
  config = load_config("cpc_digits", TINY)
  run = trainer.setup(config, tmp_path)
  run.checkpointer.close()
  initial = jax.device_get(trainer.init_state(run)["params"])
  # Equal up to float rounding (the trainer's init is compiled; another draw differs by O(0.1)).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               run.task.initial_params(), initial)


def test_features_are_the_mean_context_and_the_probe_never_fits_on_test():
  task = cpc_task.build(load_config("cpc_digits", TINY, check_devices=False))
  params = task.initial_params()
  x = task.data["test"][:7]
  _, c_BTC = task.model.apply({"params": params}, x)
  np.testing.assert_allclose(task.features(params, x), np.mean(np.asarray(c_BTC), axis=1),
                             rtol=1e-6)
  # Test labels shuffled: a probe fit on the training digits scores about chance on them (one fit on
  # the test split would score high).
  train, test = task.data["train"].reshape(1347, -1), task.data["test"].reshape(225, -1)
  shuffled = np.random.default_rng(0).permutation(task.data["test_labels"])
  assert cpc_task._linear_probe(train, task.data["train_labels"], test, shuffled) < 0.3
  assert cpc_task._linear_probe(train, task.data["train_labels"], test,
                                task.data["test_labels"]) > 0.9
