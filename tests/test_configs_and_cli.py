"""Configs: overrides, and bad input failing before compilation with one line naming the key; the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxlab import cli
from jaxlab.configs import ConfigError, available_configs, load_config
from jaxlab.train.metrics import read_metrics


def test_every_config_loads_and_validates():
  from jaxlab.train.host_devices import usable_device_count
  for name in available_configs():
    config = load_config(name, check_devices=False)
    assert usable_device_count(config, 8) >= 2  # splits over several CPU devices


def test_host_device_count_follows_the_batch():
  from jaxlab.train.host_devices import usable_device_count
  config = load_config("lm_char_cpu", check_devices=False)  # batch 12
  assert [usable_device_count(config, n) for n in (1, 2, 4, 5, 8, 16)] == [1, 2, 4, 4, 6, 12]
  config = load_config("lm_char_cpu", ["--config.mesh.tensor=2"], check_devices=False)
  assert usable_device_count(config, 8) == 8  # data 4 x tensor 2: batch 12 splits over 4
  config = load_config("lm_char_cpu", ["--config.train.microbatches=2"], check_devices=False)
  assert usable_device_count(config, 8) == 6  # 2 rows per device, one per microbatch


def test_a_config_from_before_microbatches_still_validates():
  """An older workdir's config.json has no train.microbatches: it means 1 (eval/sample keep working)."""
  import ml_collections
  from jaxlab.configs.validate import train_microbatches, validate
  from jaxlab.train.host_devices import usable_device_count
  old = load_config("lm_char_cpu", check_devices=False).to_dict()
  del old["train"]["microbatches"]
  config = ml_collections.ConfigDict(old)
  validate(config, check_devices=False)
  assert train_microbatches(config) == 1 and usable_device_count(config, 2) == 2


def test_contrastive_task_refuses_microbatches():
  with pytest.raises(ConfigError, match="config.train.microbatches"):
    load_config("contrastive_digits", ["--config.train.microbatches=2"])


def test_overrides_are_typed():
  c = load_config("lm_char", ["--config.model.num_layers=2", "--config.optim.lr=1",
                              "--config.model.position=learned", "--config.train.tensorboard=false",
                              "--config.model.rope_theta=500000"])
  assert c.model.num_layers == 2 and c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
  assert c.model.position == "learned" and c.train.tensorboard is False


@pytest.mark.parametrize("override,key", [
    ("--config.model.num_layerz=2", "config.model.num_layerz"),
    ("--config.modle.width=2", "config.modle"),
    ("--config.model.num_layers=two", "config.model.num_layers"),
    ("--config.model.num_layers=2.5", "config.model.num_layers"),
    ("--config.model.num_heads=5", "config.model.num_heads"),
    ("--config.model.num_kv_heads=3", "config.model.num_kv_heads"),
    ("--config.model.position=bogus", "config.model.position"),
    (("--config.model.position=alibi", "--config.model.rope_scaling=yarn"),
     "config.model.rope_scaling"),
    ("--config.model.rotary_fraction=0", "config.model.rotary_fraction"),
    (("--config.model.attention=linear", "--config.model.logit_soft_cap=30"),
     "config.model.logit_soft_cap"),
    (("--config.model.attention=local", "--config.model.position=alibi"), "config.model.position"),
    ("--config.data.batch_size=0", "config.data.batch_size"),
    ("--config.mesh.data=16", "config.mesh"),
    ("--config.mesh.data=3", "config.data.batch_size"),
    ("--config.optim.warmup_steps=5000", "config.optim.warmup_steps"),
    ("--config.train.microbatches=0", "config.train.microbatches"),
    (("--config.mesh.data=2", "--config.train.microbatches=3"), "config.train.microbatches"),
    ("--config.model", "config.model"),
])
def test_bad_configs_name_the_key(override, key):
  overrides = list(override) if isinstance(override, tuple) else [override]
  with pytest.raises(ConfigError) as e:
    load_config("lm_char", overrides)
  message = str(e.value)
  assert key in message and "\n" not in message


def test_cli_reports_config_errors_in_one_line(capsys):
  assert cli.main(["train", "--config.model.num_heads=7"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "config.model.num_heads=7" in err[0]


def test_cli_unknown_config_name(capsys):
  assert cli.main(["train", "no_such_config"]) == 2
  assert "unknown config 'no_such_config'" in capsys.readouterr().err


def test_cli_train_eval_sample_on_a_workdir(tiny_corpus, tfds_dir, tmp_path, capsys):
  workdir = tmp_path / "run"
  common = ["--config.data.name=text_files", f"--config.data.path={tiny_corpus}",
            f"--config.data.data_dir={tfds_dir}", "--config.data.vocab=char",
            "--config.data.seq_len=16", "--config.data.batch_size=8",
            "--config.model.num_layers=1", "--config.model.width=32",
            "--config.optim.warmup_steps=1", "--config.train.steps=4", "--config.train.eval_every=4",
            "--config.train.eval_batches=2", "--config.train.checkpoint_every=4",
            "--config.train.tensorboard=False", "--config.mesh.data=1",
            "--config.sample.num_tokens=20", "--config.sample.prompt=the "]
  assert cli.main(["train", "lm_char", "--workdir", str(workdir), "--no-progress"] + common) == 0
  out = capsys.readouterr().out
  assert "val_loss" in out and "sample" in out
  assert cli.main(["eval", str(workdir)]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["step"] == 4 and result["val_loss"] > 0
  assert cli.main(["sample", str(workdir), "--prompt", "cat ", "--num-tokens", "10",
                   "--temperature", "0"]) == 0
  text = capsys.readouterr().out.rstrip("\n")
  assert text.startswith("cat ") and len(text) == 14
  # A second train call on the same workdir resumes and has nothing left to do.
  assert cli.main(["train", "lm_char", "--workdir", str(workdir), "--no-progress"] + common) == 0
  assert "resumed from step 4" in capsys.readouterr().out


def test_cli_eval_and_sample_best_params_of_a_density_run(tmp_path, capsys):
  """`--best` restores WORKDIR/best (train.keep_best): its validation loss is the lowest one logged;
  a workdir trained without keep_best says there is no best checkpoint."""
  common = ["--config.train.steps=30", "--config.train.eval_every=10", "--config.train.log_every=10",
            "--config.train.checkpoint_every=10", "--config.optim.warmup_steps=1",
            "--config.optim.lr=3.0", "--config.optim.min_lr=3.0", "--config.model.hidden=(16,)",
            "--config.data.batch_size=16", "--config.mesh.data=1"]  # lr 3: step 20 beats step 30
  workdir = tmp_path / "made"
  assert cli.main(["train", "made", "--workdir", str(workdir), "--no-progress"] + common) == 0
  assert "reporting those parameters" in capsys.readouterr().out
  logged = [r for r in read_metrics(workdir) if "val_loss" in r]
  lowest = min(logged, key=lambda r: r["val_loss"])
  assert lowest["step"] != 30  # so the newest and the best checkpoints differ
  assert cli.main(["eval", str(workdir), "--best"]) == 0
  best = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert best["step"] == lowest["step"]
  np.testing.assert_allclose(best["val_loss"], lowest["val_loss"], rtol=1e-5)
  assert cli.main(["eval", str(workdir)]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 30
  assert cli.main(["sample", str(workdir), "--best"]) == 0
  assert capsys.readouterr().out.strip()
  plain = tmp_path / "plain"
  assert cli.main(["train", "made", "--workdir", str(plain), "--no-progress",
                   "--config.train.keep_best=False"] + common) == 0
  capsys.readouterr()
  assert cli.main(["eval", str(plain), "--best"]) == 1
  assert "no best-params checkpoint" in capsys.readouterr().err


def test_cli_eval_on_a_non_workdir(tmp_path, capsys):
  assert cli.main(["eval", str(tmp_path)]) == 2
  assert "not a jaxlab workdir" in capsys.readouterr().err


def test_console_script_help():
  out = subprocess.run([sys.executable, "-m", "jaxlab.cli", "--help"], capture_output=True,
                       text=True, check=True).stdout
  assert "train" in out and "eval" in out and "sample" in out
  out = subprocess.run([sys.executable, "-m", "jaxlab.cli", "train", "--help"],
                       capture_output=True, text=True, check=True).stdout
  assert "lm_char_cpu" in out and "--workdir" in out


def test_model_position_options_reach_the_model():
  from jaxlab.models.gpt import gpt_from_config
  c = load_config("lm_char", ["--config.model.rope_scaling=yarn", "--config.model.rope_scaling_factor=4",
                              "--config.model.logn_scaling=true", "--config.model.rotary_fraction=0.5"],
                  check_devices=False)
  model = gpt_from_config(c.model, vocab_size=256, max_len=128).config
  assert model.rope_scaling.kind == "yarn" and model.rope_scaling.factor == 4.0
  assert model.rope_scaling.original_max_len == 128 and model.logn_train_len == 128
  assert model.rotary_fraction == 0.5
  c = load_config("lm_char", ["--config.model.position=alibi"], check_devices=False)
  assert gpt_from_config(c.model, 256, 128).config.rope_scaling is None
