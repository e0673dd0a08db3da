"""Configs: overrides, and bad input failing before compilation with one line naming the key; the CLI."""

import json
import shutil
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


def test_host_device_count_of_a_multi_process_run_counts_every_process(monkeypatch):
  """P processes: each process's count n is chosen for a mesh of n * P devices (it was chosen as if
  one host were the whole mesh, so the README's 2-host command failed validation)."""
  from jaxlab.train import host_devices
  config = load_config("lm_char", check_devices=False)  # batch 16, data -1
  assert host_devices.usable_device_count(config, 16, processes=2) == 8  # 2 x 8 = 16 rows
  assert host_devices.usable_device_count(config, 16, processes=1) == 16
  config = load_config("lm_char", ["--config.mesh.data=2", "--config.mesh.fsdp=2"],
                       check_devices=False)
  assert host_devices.usable_device_count(config, 2, processes=2) == 2  # 2 x 2 = data 2 x fsdp 2
  config = load_config("lm_char_cpu", ["--config.mesh.tensor=2"], check_devices=False)  # batch 12
  # 3 per process would make data 3 x tensor 2, but a tensor group would span two processes
  assert host_devices.usable_device_count(config, 3, processes=2) == 2
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(host_devices, "cores", lambda: 16)
  assert host_devices.configure(load_config("lm_char", check_devices=False), processes=2) == 8
  assert "--xla_force_host_platform_device_count=8" in host_devices.os.environ["XLA_FLAGS"]
  monkeypatch.delenv("XLA_FLAGS")
  assert host_devices.configure(load_config("lm_char", check_devices=False), processes=None) == 1
  assert "XLA_FLAGS" not in host_devices.os.environ  # --distributed: one device per process
  # A flag already set is left alone, and its count read as XLA reads it (the last one wins).
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                                  "--xla_force_host_platform_device_count=4")
  assert host_devices.configure(load_config("lm_char", check_devices=False)) == 4


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


def test_tuple_overrides():
  """A scalar for a tuple key is a one-element tuple; bools are not ints inside a tuple either."""
  load = lambda *o: load_config("made", list(o), check_devices=False)
  assert load("--config.model.hidden=500").model.hidden == (500,)
  assert load("--config.model.hidden=(64, 32)").model.hidden == (64, 32)
  with pytest.raises(ConfigError, match=r"config\.model\.hidden: expected ints"):
    load("--config.model.hidden=(True,)")
  with pytest.raises(ConfigError, match=r"config\.model\.hidden: expected ints"):
    load("--config.model.hidden=(64, 32.5)")  # was kept as a float inside the int tuple
  with pytest.raises(ConfigError, match=r"config\.model\.num_layers: expected int, got True"):
    load("--config.model.num_layers=True")  # a bool is an int to isinstance: it was taken as 1
  with pytest.raises(ConfigError, match=r"config\.model\.hidden: expected finite numbers"):
    load("--config.model.hidden=(1e400,)")
  from jaxlab.configs import check_keys_and_types, get_config
  config = get_config("made")
  config.model.hidden = (64, 32.5)  # a config file's tuple follows the same rule
  with pytest.raises(ConfigError, match=r"config\.model\.hidden: expected ints, got \(64, 32\.5\)"):
    check_keys_and_types(config, "a file")


def test_overrides_are_typed():
  c = load_config("lm_char", ["--config.model.num_layers=2", "--config.optim.lr=1",
                              "--config.model.position=xpos", "--config.train.tensorboard=false",
                              "--config.model.rope_theta=500000"])
  assert c.model.num_layers == 2 and c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
  assert c.model.position == "xpos" and c.train.tensorboard is False
  assert c.model.rope_theta == 500000.0


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
    (("--config.model.width=48", "--config.model.num_heads=8", "--config.model.rotary_fraction=0.5"),
     "config.model.rotary_fraction"),  # int(6 * 0.5) = 3 rotary dims
    (("--config.model.attention=flash", "--config.model.rotary_fraction=0.5"),
     "rotary_fraction"),
    (("--config.model.position=xpos", "--config.model.rotary_fraction=0.5"),
     "config.model.rotary_fraction"),  # xPos rotates every dim: the fraction was ignored
    ("--config.model.rerope_leaky_k=4", "config.model.rerope_leaky_k"),  # no ReRoPE window
    ("--config.model.rope_scaling_factor=4.0", "config.model.rope_scaling_factor"),  # ignored
    ("--config.model.rope_train_len=32", "config.model.rope_train_len"),  # ignored
    ("--config.mesh.cpu_devices=100000", "config.mesh.cpu_devices"),  # XLA segfaulted
    (("--config.model.attention=linear", "--config.model.logit_soft_cap=30"),
     "config.model.logit_soft_cap"),
    (("--config.model.attention=local", "--config.model.position=alibi"), "config.model.position"),
    ("--config.data.batch_size=0", "config.data.batch_size"),
    ("--config.mesh.data=16", "config.mesh"),
    ("--config.mesh.data=3", "config.data.batch_size"),
    ("--config.mesh.tensor=3", "config.mesh.tensor=3 must divide"),  # 4 kv heads
    ("--config.optim.warmup_steps=5000", "config.optim.warmup_steps"),
    ("--config.train.microbatches=0", "config.train.microbatches"),
    (("--config.mesh.data=2", "--config.train.microbatches=3"), "config.train.microbatches"),
    ("--config.optim.loss_scale=static", "config.optim.loss_scale"),
    ("--config.optim.loss_scale_period=0", "config.optim.loss_scale_period"),
    ("--config.optim.loss_scale_init=0.5", "config.optim.loss_scale_init"),
    ("--config.model", "config.model"),
    ("--config.train.eval_seed=-1", "config.train.eval_seed"),
    ("--config.optim.warmup_steps=True", "config.optim.warmup_steps"),
    (("--config.model.attention_impl=cudnn", "--config.model.logit_soft_cap=30"),
     "config.model.attention_impl='cudnn'"),
    (("--config.model.attention_impl=cudnn", "--config.model.attention=local"),
     "config.model.attention_impl='cudnn'"),
    ("--config.sample.top_k=True", "config.sample.top_k"),
    ("--config.sample.temperature=1e999", "config.sample.temperature"),
    (("--config.model.position=xpos", "--config.model.dtype=float16", "--config.data.seq_len=4096"),
     "config.model.dtype='float16'"),
    (("--config.model.position=xpos", "--config.model.max_len=100000"), "must be <= 65536"),
    ("--config.data.train_fraction=0.5", "has no effect on config.data.name='python_stdlib'"),
    ("--config.sample.seed=18446744073709551616", "config.sample.seed"),
    (("--config.optim.warmup_steps=3000000000", "--config.train.steps=6000000000"),
     "must be < 2**31"),
    ("--config.model.feature_seed=4294967296", "config.model.feature_seed"),
])
def test_bad_configs_name_the_key(override, key):
  overrides = list(override) if isinstance(override, tuple) else [override]
  with pytest.raises(ConfigError) as e:
    load_config("lm_char", overrides)
  message = str(e.value)
  assert key in message and "\n" not in message


def test_fresh_workdirs_are_distinct_and_a_failed_run_leaves_none(tmp_path, monkeypatch,
                                                                  tiny_cli_overrides, capsys):
  monkeypatch.chdir(tmp_path)
  a, b = cli._fresh_workdir("lm_char"), cli._fresh_workdir("lm_char")  # the same second
  assert a != b and a.is_dir() and b.is_dir()
  a.rmdir(), b.rmdir()
  assert cli.main(["train", *tiny_cli_overrides, "--config.sample.prompt=€€"]) == 2
  assert "config.sample.prompt" in capsys.readouterr().err
  assert list((tmp_path / "runs").iterdir()) == []
  # Config errors found by validation, and unknown configs, make no workdir either (one created
  # before validation passed every other test: theirs ran elsewhere and never looked).
  for args in (["--config.model.num_heads=7"], ["no_such_config"]):
    assert cli.main(["train", *args]) == 2
    capsys.readouterr()
    assert list((tmp_path / "runs").iterdir()) == [], args


def test_cli_train_refuses_a_directory_that_is_not_a_workdir(tmp_path, tiny_cli_overrides,
                                                             capsys):
  (tmp_path / "config.json").write_text('{"my": "settings"}')
  assert cli.main(["train", "--workdir", str(tmp_path), *tiny_cli_overrides]) == 2
  assert "is not a jaxlab workdir" in capsys.readouterr().err
  assert (tmp_path / "config.json").read_text() == '{"my": "settings"}'
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_cli_reports_config_errors_in_one_line(capsys):
  assert cli.main(["train", "--config.model.num_heads=7"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "config.model.num_heads=7" in err[0]


def test_cli_unknown_config_name(capsys):
  assert cli.main(["train", "no_such_config"]) == 2
  assert "unknown config 'no_such_config'" in capsys.readouterr().err


def test_cli_train_eval_sample_on_a_workdir(tiny_cli_overrides, tmp_path, capsys):
  workdir = tmp_path / "run"
  common = tiny_cli_overrides
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
  # --stop: the continuation ends before its first occurrence (one in the prompt does not count)
  for stop in (text[6:8], "ca", "~~~"):
    assert cli.main(["sample", str(workdir), "--prompt", "cat ", "--num-tokens", "10",
                     "--temperature", "0", "--stop", stop]) == 0
    cut = text.find(stop, 4)
    assert capsys.readouterr().out.rstrip("\n") == (text if cut < 0 else text[:cut]), stop
  # A model override that keeps every shape is refused by eval and sample too (the structure check
  # alone let it through: a removed key check printed another val_loss, exit 0).
  for command in (["eval", str(workdir)], ["sample", str(workdir), "--num-tokens", "4"]):
    assert cli.main(command + ["--config.model.rope_theta=5.0"]) == 2
    assert "only data.batch_size may be overridden" in capsys.readouterr().err
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
  assert cli.main(["sample", str(workdir), "--num-tokens", "2"]) == 0  # two 8x8 images
  images = capsys.readouterr().out.strip().split("\n\n")
  assert len(images) == 2 and all(len(image.splitlines()) == 8 for image in images)
  assert cli.main(["sample", str(workdir), "--num-tokens", "0"]) == 0  # none (it gave 16)
  assert capsys.readouterr().out.strip() == ""
  assert cli.main(["sample", str(workdir), "--temperature", "5"]) == 2  # a language model's flag
  assert cli.main(["sample", str(workdir), "--stop", "x"]) == 2
  assert "--temperature is for language-model runs; this run's task is 'density'" in \
      capsys.readouterr().err
  plain = tmp_path / "plain"
  assert cli.main(["train", "made", "--workdir", str(plain), "--no-progress",
                   "--config.train.keep_best=False"] + common) == 0
  capsys.readouterr()
  for command in ("eval", "sample"):  # a flag error, before anything is built
    assert cli.main([command, str(plain), "--best"]) == 2
    assert "--best: " + str(plain) + " kept no best parameters" in capsys.readouterr().err


def test_eval_best_on_a_task_that_keeps_no_best_parameters_says_why():
  """`jaxlab eval WORKDIR --best` on a contrastive run advised training with keep_best=True, which
  that task refuses (it has no validation split)."""
  with pytest.raises(cli.UsageError, match="--best: the 'contrastive' task keeps no best parameters"
                                           ": config.train.keep_best=True would choose"):
    cli._check_task_keeps_best(load_config("contrastive_digits", [], check_devices=False))
  cli._check_task_keeps_best(load_config("made", [], check_devices=False))  # made keeps them


def test_cli_sample_on_a_run_without_a_sampler_is_refused_first(tmp_path, capsys):
  """A contrastive workdir loaded its data and built its run before "task has no sampler" (exit 1)."""
  config = load_config("contrastive_digits", [], check_devices=False)
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  assert cli.main(["sample", str(tmp_path)]) == 2
  assert "is a 'contrastive' run, which has nothing to sample" in _one_error_line(capsys)


def test_cli_eval_on_a_non_workdir(tmp_path, capsys):
  assert cli.main(["eval", str(tmp_path)]) == 2
  assert "not a jaxlab workdir" in capsys.readouterr().err


def test_console_script_help():
  out = subprocess.run([sys.executable, "-m", "jaxlab.cli", "--help"], capture_output=True,
                       text=True, check=True).stdout
  assert "train" in out and "eval" in out and "sample" in out and "bench" in out
  out = subprocess.run([sys.executable, "-m", "jaxlab.cli", "train", "--help"],
                       capture_output=True, text=True, check=True).stdout
  assert "lm_char_cpu" in out and "--workdir" in out
  assert "under runs/" in " ".join(out.split())  # --workdir's help, not only the usage line


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


# --- Bad command-line input: one line naming the argument/key/file, before anything is compiled. ---

def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


@pytest.mark.parametrize("body,expected", [
    ("def get_config(:\n  pass\n", "SyntaxError: invalid syntax (line 1)"),
    ("import no_such_module_for_jaxlab\n", "ModuleNotFoundError: No module named"),
    ("def get_config():\n  raise ValueError('boom\\nmore')\n", "get_config() raised ValueError: boom"),
    ("def get_config():\n  return None\n", "returned NoneType, not an ml_collections.ConfigDict"),
    ("X = 1\n", "defines no get_config()"),
])
def test_cli_bad_config_file_is_one_line_naming_it(tmp_path, capsys, body, expected):
  path = tmp_path / "my_cfg.py"
  path.write_text(body)
  assert cli.main(["train", str(path), "--workdir", str(tmp_path / "run")]) == 2
  line = _one_error_line(capsys)
  assert line.startswith("jaxlab: config error: ") and str(path) in line and expected in line
  assert not (tmp_path / "run").exists()


def test_config_file_returning_a_dict_is_converted(tmp_path):
  from jaxlab.configs import get_config
  path = tmp_path / "as_dict.py"
  path.write_text("def get_config():\n  from jaxlab.configs.lm_char_cpu import get_config as g\n"
                  "  return g().to_dict()\n")
  config = load_config(str(path), ["--config.model.num_layers=1"], check_devices=False)
  assert config.model.num_layers == 1 and config.task == "lm"
  path.write_text("def get_config():\n  return {'task': 'lm', 'data': {'batch_size': 2}}\n")
  assert type(get_config(str(path))).__name__ == "ConfigDict"
  with pytest.raises(ConfigError, match=r"lacks keys that task 'lm' needs: config\.data\.") as e:
    load_config(str(path), check_devices=False)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit,expected", [
    ("c['model']['use_bias'] = 'no'", "config.model.use_bias: expected bool, got 'no'"),
    ("c['model']['dropout'] = '0.1'", "config.model.dropout: expected float, got '0.1'"),
    ("c['model']['num_layers'] = 2.0", "config.model.num_layers: expected int, got 2.0"),
    ("c['model']['num_layers'] = True", "config.model.num_layers: expected int, got True"),
    ("c['optim']['lr'] = float('inf')", "config.optim.lr: expected a finite number, got inf"),
    ("c['model']['num_layer'] = 8", "unknown config key config.model.num_layer (did you mean "
                                    "config.model.num_layers?)"),
    ("c['optim']['weight_decy'] = 0.0", "unknown config key config.optim.weight_decy (did you mean "
                                        "config.optim.weight_decay?)"),
    ("c['train']['step'] = 5", "unknown config key config.train.step (did you mean "
                               "config.train.steps?)"),
    # Not near any key: kept and saved in config.json as if it applied, read by nothing.
    ("c['model']['siglip_bias_init'] = -10.0", "unknown config key config.model.siglip_bias_init: "
                                               "task 'lm' has no such setting"),
    ("del c['model']['use_bias']", "lacks keys that task 'lm' needs: config.model.use_bias"),
    ("del c['seed']", "lacks keys that task 'lm' needs: config.seed"),
])
def test_config_file_keys_and_types_are_those_of_the_task(tmp_path, capsys, edit, expected):
  """A config file (here one returning a dict, which skips ConfigDict's own type checks) with a typo,
  a missing key or a value of the wrong type: one line naming the key, before anything is built."""
  path = tmp_path / "edited.py"
  path.write_text("def get_config():\n  from jaxlab.configs.lm_char_cpu import get_config as g\n"
                  f"  c = g().to_dict()\n  {edit}\n  return c\n")
  assert cli.main(["train", str(path), "--workdir", str(tmp_path / "run")]) == 2
  line = _one_error_line(capsys)
  assert line.startswith("jaxlab: config error: ") and expected in line, line
  assert not (tmp_path / "run").exists()


def test_built_in_configs_have_their_tasks_keys_and_types():
  from jaxlab.configs import available_configs, check_keys_and_types, get_config
  for name in available_configs():
    check_keys_and_types(get_config(name), name)


def test_cli_config_file_that_is_not_python(tmp_path, capsys):
  path = tmp_path / "notes.txt"
  path.write_text("hello\n")
  assert cli.main(["train", str(path)]) == 2
  line = _one_error_line(capsys)
  assert str(path) in line and "must be a .py file with get_config()" in line


def test_cli_override_without_equals_sign(capsys):
  assert cli.main(["train", "lm_char", "--config.model.width", "64"]) == 2
  assert _one_error_line(capsys) == ("jaxlab: config error: override --config.model.width needs "
                                     "=VALUE (--config.model.width=64)")
  assert cli.main(["train", "lm_char", "--config.model.width"]) == 2
  assert "(--config.model.width=VALUE)" in _one_error_line(capsys)


def test_cli_workdir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / "a_file"
  path.write_text("keep me")
  assert cli.main(["train", "lm_char_cpu", "--workdir", str(path), "--no-progress"]) == 2
  line = _one_error_line(capsys)
  assert "--workdir" in line and str(path) in line and "a file, not a directory" in line
  assert cli.main(["train", "lm_char_cpu", "--workdir", str(path / "sub")]) == 2
  assert f"lies under {path}" in _one_error_line(capsys)
  for command in ("eval", "sample"):
    assert cli.main([command, str(path)]) == 2
    assert "WORKDIR" in _one_error_line(capsys)
  assert path.read_text() == "keep me"


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "/nowhere/config.json"),
                                   RuntimeError("RESOURCE_EXHAUSTED: Permission denied (out of memory)"),
                                   FloatingPointError("Permission denied: the loss is nan")],
                         ids=["os", "runtime", "floating_point"])
def test_cli_os_errors_are_one_line(monkeypatch, capsys, error):
  def denied(*args, **kwargs):
    raise error
  monkeypatch.setattr(cli, "_load_workdir_config", denied)
  assert cli.main(["eval", "/nowhere"]) == 1
  line = _one_error_line(capsys)
  assert line.startswith("jaxlab: error: ") and "Permission denied" in line


def _handwritten_workdir(tmp_path, overrides, edit=None):
  """A workdir with only config.json (`overrides`: a tiny LM run) and no checkpoints."""
  workdir = tmp_path / "old"
  (workdir / "checkpoints").mkdir(parents=True)
  config = json.loads(load_config("lm_char", overrides,
      check_devices=False).to_json_best_effort())
  if edit:
    edit(config)
  (workdir / "config.json").write_text(json.dumps(config, indent=2))
  return workdir


def test_cli_workdir_config_json_that_is_not_json(tmp_path, capsys):
  (tmp_path / "config.json").write_text('{"task": "lm"}\n}')
  assert cli.main(["eval", str(tmp_path)]) == 2
  line = _one_error_line(capsys)
  assert str(tmp_path / "config.json") in line and "not valid JSON" in line


@pytest.mark.parametrize("key,value,expected", [
    (("model", "mlp_ratio"), "2.0", "config.model.mlp_ratio: expected float, got '2.0'"),
    (("train", "tensorboard"), "false", "config.train.tensorboard: expected bool, got 'false'"),
])
def test_cli_workdir_config_json_value_of_the_wrong_type_is_named(tmp_path, tiny_cli_overrides,
                                                                  capsys, key, value, expected):
  """A hand-edited config.json with "2.0" for a float failed as "'>' not supported between 'str'
  and 'int'", naming no key; "false" for a bool passed (a non-empty string is true)."""
  def edit(config):
    config[key[0]][key[1]] = value
  workdir = _handwritten_workdir(tmp_path, tiny_cli_overrides, edit)
  assert cli.main(["eval", str(workdir)]) == 2
  line = _one_error_line(capsys)
  assert expected in line and str(workdir / "config.json") in line


def test_older_workdir_config_gets_todays_defaults(tmp_path, tiny_corpus, tiny_cli_overrides, capsys,
                                                   monkeypatch):
  def drop(config):
    del config["model"]["attention_impl"]
  workdir = _handwritten_workdir(tmp_path, tiny_cli_overrides, drop)
  config = cli._load_workdir_config(workdir, ["--config.train.eval_batches=3"])
  assert config.model.attention_impl == "auto" and config.train.eval_batches == 3
  assert config.model.width == 32 and config.data.path == str(tiny_corpus)
  assert _one_error_line(capsys) == (f"jaxlab: {workdir / 'config.json'} has no "
                                     "model.attention_impl (an older jaxlab); using the default "
                                     "'auto'")
  # Another process of a multi-process run (it knows its id once it has joined) stays silent.
  from jaxlab.train import distributed
  monkeypatch.setattr(distributed, "is_primary", lambda: False)
  assert cli._load_workdir_config(workdir, []).model.attention_impl == "auto"
  assert capsys.readouterr().err == ""


def test_workdir_config_keeps_a_key_of_its_own(tmp_path, tiny_cli_overrides):
  """A user's config file may carry top-level keys and sections of its own (notes, metadata); one
  inside the task's sections that the task lacks looks like a setting and is refused. A workdir
  saved with one (an older jaxlab kept them) still loads for eval/sample."""
  def add(config):
    config["model"]["wobble"] = 3
  workdir = _handwritten_workdir(tmp_path, tiny_cli_overrides, add)
  assert cli._load_workdir_config(workdir, []).model.wobble == 3
  path = tmp_path / "own_keys.py"
  path.write_text("def get_config():\n  import ml_collections\n"
                  "  from jaxlab.configs.lm_char_cpu import get_config as g\n"
                  "  c = g()\n  c.notes = 'mine'\n  c.meta = ml_collections.ConfigDict()\n"
                  "  c.meta.owner = 'me'\n  return c\n")
  config = load_config(str(path), check_devices=False)
  assert config.notes == "mine" and config.meta.owner == "me"
  path.write_text(path.read_text().replace("  return c", "  c.model.wobble = 3\n  return c"))
  with pytest.raises(ConfigError, match=r"unknown config key config\.model\.wobble: task 'lm' has "
                                        r"no such setting"):
    load_config(str(path), check_devices=False)


def test_a_config_file_of_an_unknown_task_is_a_config_error(tmp_path, capsys):
  path = tmp_path / "nope.py"
  path.write_text("def get_config():\n  from jaxlab.configs.lm_char_cpu import get_config as g\n"
                  "  c = g()\n  c.task = 'nope'\n  return c\n")
  assert cli.main(["train", str(path), "--workdir", str(tmp_path / "run")]) == 2
  assert "config.task='nope' must be one of contrastive, cpc, density, lm" in _one_error_line(capsys)
  assert not (tmp_path / "run").exists()


def test_data_paths_are_made_absolute_but_urls_are_not(tmp_path, monkeypatch):
  from jaxlab.configs import absolute_data_path
  monkeypatch.chdir(tmp_path)
  assert absolute_data_path("rel.txt", "lm") == str(tmp_path / "rel.txt")
  assert absolute_data_path("gs://bucket/x.txt", "lm") == "gs://bucket/x.txt"


def test_config_file_without_the_keys_read_with_a_default_loads(tmp_path):
  """Keys added later and read with a default (loss scaling, microbatches, keep_best) may be absent
  from a config file written before them."""
  from jaxlab.configs import OPTIONAL_KEYS
  path = tmp_path / "older.py"
  path.write_text("def get_config():\n  from jaxlab.configs.lm_char_cpu import get_config as g\n"
                  "  c = g().to_dict()\n  for key in ('loss_scale', 'loss_scale_period', "
                  "'loss_scale_init'):\n    del c['optim'][key]\n  del c['train']['microbatches']\n"
                  "  del c['train']['keep_best']\n  return c\n")
  assert {"optim.loss_scale", "train.microbatches", "train.keep_best"} <= set(OPTIONAL_KEYS)
  config = load_config(str(path), check_devices=False)
  assert "microbatches" not in config.train
  # sample.speculative is read without a default: a file lacking it is refused by name (it was
  # listed as optional, to no effect)
  path.write_text("def get_config():\n  from jaxlab.configs.lm_char_cpu import get_config as g\n"
                  "  c = g().to_dict()\n  del c['sample']['speculative']\n  return c\n")
  with pytest.raises(ConfigError, match=r"lacks keys that task 'lm' needs: config\.sample\.speculative"):
    load_config(str(path), check_devices=False)


def test_a_run_saved_with_another_familys_option_resumes(tmp_path, tiny_cli_overrides, capsys,
                                                        as_saved_before_configs_were_recorded):
  """A run an older jaxlab trained with attention_window set beside softmax (ignored, so full
  attention) resumes with its own config: the new-run check is skipped when the workdir holds a
  checkpoint (the resume requires the saved model section anyway); a fresh workdir still refuses it."""
  workdir = tmp_path / "old_run"
  assert cli.main(["train", "lm_char", "--workdir", str(workdir), "--no-progress",
                   *tiny_cli_overrides]) == 0
  as_saved_before_configs_were_recorded(workdir)
  saved = json.loads((workdir / "config.json").read_text())
  saved["model"]["attention_window"] = 32  # as an older jaxlab saved it
  (workdir / "config.json").write_text(json.dumps(saved))
  again = tiny_cli_overrides + ["--config.model.attention_window=32", "--config.train.steps=6",
                                "--config.train.eval_every=6", "--config.train.checkpoint_every=6"]
  capsys.readouterr()
  assert cli.main(["train", "lm_char", "--workdir", str(workdir), "--no-progress", *again]) == 0
  assert "step 6:" in capsys.readouterr().out
  assert cli.main(["train", "lm_char", "--workdir", str(tmp_path / "new"), "--no-progress",
                   *again]) == 2
  assert "config.model.attention_window=32 applies to" in _one_error_line(capsys)


def test_a_workdir_saved_with_another_familys_option_still_loads(tmp_path, tiny_cli_overrides):
  """attention_window with softmax is refused for a new run (it would be ignored), but a workdir an
  older jaxlab saved that way trained full attention and still evaluates, samples and resumes."""
  def add(config):
    config["model"]["attention_window"] = 32
  workdir = _handwritten_workdir(tmp_path, tiny_cli_overrides, add)
  config = cli._load_workdir_config(workdir, [])
  assert config.model.attention == "softmax" and config.model.attention_window == 32
  with pytest.raises(ConfigError, match="config.model.attention_window=32 applies to"):
    load_config("lm_char", tiny_cli_overrides + ["--config.model.attention_window=32"],
                check_devices=False)
  with pytest.raises(ConfigError, match=r"config.model.attention_impl='xla' applies to "
                                        r"config.model.attention=one of \('softmax', 'local', "
                                        r"'block_sparse'\), not 'performer'"):
    load_config("lm_char", tiny_cli_overrides + ["--config.model.attention=performer",
                                                 "--config.model.attention_impl=xla"],
                check_devices=False)
  load_config("lm_char", tiny_cli_overrides + ["--config.model.attention=local",  # its decoding's
                                               "--config.model.attention_impl=xla"],
              check_devices=False)


@pytest.mark.parametrize("flags,flag", [
    (["--num-tokens", "-5"], "--num-tokens"),
    (["--num-tokens", "200000000"], "--num-tokens"),  # aborted XLA (SIGABRT) allocating the cache
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-k", "-3"], "--top-k"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "-0.1"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),
    (["--seed", "-5"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
])
def test_cli_sample_flags_checked_first(tmp_path, capsys, flags, flag):
  # WORKDIR does not even exist: the flags are checked before anything is read or built.
  assert cli.main(["sample", str(tmp_path / "none"), *flags]) == 2
  line = _one_error_line(capsys)
  assert line.startswith(f"jaxlab: error: {flag} ")


@pytest.mark.parametrize("flags", [["--top-p", "1"], ["--top-k", "0"], ["--seed", str(2**32 - 1)],
                                   ["--temperature", "0"], ["--num-tokens", "0"]])
def test_cli_sample_flags_at_their_edges_are_accepted(tmp_path, capsys, flags):
  """The "off" values and the largest seed the help documents pass the flag checks (the error is
  then the missing workdir's)."""
  assert cli.main(["sample", str(tmp_path / "none"), *flags]) == 2
  assert "not a jaxlab workdir" in _one_error_line(capsys)


def test_cli_sample_checks_the_prompt_before_restoring(tmp_path, tiny_cli_overrides, capsys,
                                                        monkeypatch):
  from jaxlab.train import lm_task
  workdir = _handwritten_workdir(tmp_path, tiny_cli_overrides)
  calls = []
  def check_prompt(self, prompt, what):
    calls.append((prompt, what))
    if "Z" in prompt:
      raise ValueError(f"{what} {prompt!r} has characters outside the vocabulary")
  monkeypatch.setattr(lm_task.LMTask, "check_prompt", check_prompt, raising=False)
  assert cli.main(["sample", str(workdir), "--prompt", "Zz~"]) == 2  # a flag error, as argparse's
  assert "--prompt 'Zz~' has characters outside" in _one_error_line(capsys)
  assert calls[-1] == ("Zz~", "--prompt")
  monkeypatch.undo()
  (workdir / "checkpoints").rmdir()
  assert cli.main(["sample", str(workdir), "--prompt", "the"]) == 1  # a good prompt: on to restore
  assert "no readable checkpoint" in _one_error_line(capsys)
  assert not (workdir / "checkpoints").exists()  # a reader made no folder in the workdir it read
  if hasattr(lm_task.LMTask, "check_prompt"):
    assert cli.main(["sample", str(workdir), "--prompt", "Zz~"]) == 2
    line = _one_error_line(capsys)
    assert "--prompt" in line and "checkpoint" not in line


def test_cli_sample_and_eval_help(capsys):
  with pytest.raises(SystemExit):
    cli.main(["sample", "--help"])
  out = " ".join(capsys.readouterr().out.split())
  for flag, key in [("--prompt", "prompt"), ("--num-tokens", "num_tokens"),
                    ("--temperature", "temperature"), ("--top-k", "top_k"), ("--top-p", "top_p"),
                    ("--seed", "seed")]:
    assert flag in out and f"default: config.sample.{key}" in out
  assert "--config.SECTION.KEY=VALUE" in out
  for help_text in ("end the continuation just before its first TEXT", "draft with the model's extra",
                    "speculative decoding with a tree of drafts", "sample from WORKDIR/best"):
    assert help_text in out, help_text
  with pytest.raises(SystemExit):
    cli.main(["eval", "--help"])
  assert "--config.SECTION.KEY=VALUE" in capsys.readouterr().out


def test_cli_ctrl_c_is_one_line(monkeypatch, capsys):
  def interrupted(args, overrides):
    raise KeyboardInterrupt
  monkeypatch.setattr(cli, "cmd_train", interrupted)
  assert cli.main(["train", "lm_char_cpu"]) == 130
  assert _one_error_line(capsys) == ("jaxlab: interrupted; run the same command to resume from the "
                                     "newest checkpoint")
  monkeypatch.setattr(cli, "cmd_eval", interrupted)  # nothing to resume: no hint
  assert cli.main(["eval", "/nowhere"]) == 130
  assert _one_error_line(capsys) == "jaxlab: interrupted"


def test_cli_sample_needs_only_the_workdir(tiny_corpus, tfds_dir, tmp_path, capsys):
  """`jaxlab sample` reads the vocabulary from WORKDIR/vocab.json: the training text may be gone.
  A vocab.json that jaxlab did not write is one line, and changes nothing."""
  import shutil
  text = tmp_path / "corpus.txt"
  shutil.copy(tiny_corpus, text)
  workdir = tmp_path / "run"
  assert cli.main(["train", "lm_char", "--workdir", str(workdir), "--no-progress",
                   "--config.data.name=text_files", f"--config.data.path={text}",
                   f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.vocab=char",
                   "--config.data.seq_len=16", "--config.data.batch_size=8",
                   "--config.model.num_layers=1", "--config.model.width=32",
                   "--config.optim.warmup_steps=1", "--config.train.steps=2",
                   "--config.train.eval_every=2", "--config.train.eval_batches=1",
                   "--config.train.checkpoint_every=2", "--config.train.tensorboard=False",
                   "--config.mesh.data=1", "--config.sample.num_tokens=0"]) == 0
  capsys.readouterr()
  args = ["sample", str(workdir), "--prompt", "the ", "--num-tokens", "8", "--temperature", "0"]
  assert cli.main(args) == 0
  before = capsys.readouterr().out
  # --seed is the sampler's (one ignored for config.sample.seed passed every sampling test).
  def sampled(seed):
    assert cli.main(["sample", str(workdir), "--prompt", "the ", "--num-tokens", "40",
                     "--temperature", "1", "--seed", str(seed)]) == 0
    return capsys.readouterr().out
  assert sampled(1) == sampled(1) != sampled(2)
  text.unlink()
  shutil.rmtree(tmp_path / "tfds")
  assert cli.main(args) == 0
  assert capsys.readouterr().out == before and before.startswith("the ")
  saved = (workdir / "vocab.json").read_text()
  # A character changed in place (still distinct characters): sample printed other text, exit 0.
  alphabet = json.loads(saved)["alphabet"]
  edited = json.dumps({**json.loads(saved), "alphabet": alphabet.replace(alphabet[-1], "#")})
  assert "#" not in alphabet
  for bad in ('{"alphabet": "aab"}', '["abc"]', '{"alphabet": 7}', edited):
    (workdir / "vocab.json").write_text(bad)
    assert cli.main(args) == 1
    line = _one_error_line(capsys)
    assert "vocab.json is not a vocabulary that jaxlab wrote" in line
    assert ("does not match its sha256" in line) == (bad == edited)
  (workdir / "vocab.json").write_text(saved)
  assert cli.main(args) == 0
  assert capsys.readouterr().out == before


def test_workdir_config_json_with_a_typo_or_a_null_section(tmp_path, tiny_cli_overrides, capsys):
  """A misspelt key in WORKDIR/config.json was read by nothing without a word; "model": null gave
  "a config value has the wrong type for its key ('NoneType' object is not subscriptable)"."""
  def typo(config):
    config["model"]["num_layer"] = 3
  workdir = _handwritten_workdir(tmp_path, tiny_cli_overrides, typo)
  cli._load_workdir_config(workdir, [])
  assert _one_error_line(capsys) == (f"jaxlab: {workdir / 'config.json'} has keys this jaxlab does "
                                     "not read (a typo or an edit?), ignored: model.num_layer")

  def null(config):
    config["model"] = None
  workdir = _handwritten_workdir(tmp_path / "null", tiny_cli_overrides, null)
  with pytest.raises(ConfigError, match=r"config.json: 'model' must be a section \(a JSON object\), "
                                        r"got null"):
    cli._load_workdir_config(workdir, [])


def test_the_best_record_never_claims_evaluations_it_did_not_see(tmp_path, capsys):
  """A damaged record is moved aside by the train run that finds it (it stayed, called "nothing was
  changed (a jaxlab train of this workdir moves such a record aside)" by that very run); a record
  this run does not follow (keep_best switched off) is moved aside (eval --best served it); a record
  started on a resume says which evaluations it covers; another eval_batches on resume is noted."""
  common = ["--config.model.hidden=(16,)", "--config.train.checkpoint_every=10",
            "--config.train.eval_every=5", "--config.train.log_every=5",
            "--config.optim.warmup_steps=1", "--config.optim.lr=1.0", "--config.optim.min_lr=1.0",
            "--config.data.batch_size=10", "--config.mesh.data=1", "--no-progress"]
  train = lambda workdir, steps, *more: cli.main(["train", "made", "--workdir", str(tmp_path / workdir),
                                                  f"--config.train.steps={steps}", *common, *more])
  # 1. params of the record deleted: the run reports the final parameters and moves it aside
  assert train("a", 20) == 0
  for params in (tmp_path / "a" / "best").glob("*/params"):
    shutil.rmtree(params)
  capsys.readouterr()
  assert train("a", 20) == 0
  out = capsys.readouterr().out
  assert "could not be read and was moved aside; reporting the final parameters" in out
  assert list((tmp_path / "a" / "corrupt_checkpoints").glob("best.*"))
  assert not (tmp_path / "a" / "best").exists()  # not made again until a record is written
  assert cli.main(["eval", str(tmp_path / "a"), "--best"]) == 1
  assert "no best-params checkpoint in" in capsys.readouterr().err
  # 2. keep_best switched off on a resume: the old record goes aside and --best is refused
  assert train("b", 10) == 0
  assert train("b", 20, "--config.train.keep_best=False") == 0
  assert "is not kept up to date by this run (config.train.keep_best=False); moved to" in \
      capsys.readouterr().out
  assert not (tmp_path / "b" / "best").exists()
  assert list((tmp_path / "b" / "set_aside_checkpoints").glob("best.*"))
  assert not (tmp_path / "b" / "corrupt_checkpoints").exists()
  assert cli.main(["eval", str(tmp_path / "b"), "--best"]) == 2  # a flag error: it kept none
  assert "kept no best parameters" in capsys.readouterr().err
  # 3. switched on at a resume: the record covers the evaluations from there on, and says so
  assert train("c", 10, "--config.train.keep_best=False") == 0
  capsys.readouterr()
  assert train("c", 20) == 0
  captured = capsys.readouterr()
  assert "holds no record, so the best-params record covers the evaluations from step 10 on" in \
      captured.err
  assert "(of the evaluations from step 10 on); reporting those parameters" in captured.out
  assert train("c", 30) == 0  # the record keeps saying so on later resumes
  assert "(of the evaluations from step 10 on); reporting those parameters" in \
      capsys.readouterr().out
  assert cli.main(["eval", str(tmp_path / "c"), "--best"]) == 0  # and so does eval --best
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best_of_evaluations_from"] == 10
  assert cli.main(["eval", str(tmp_path / "a")]) == 0
  assert "best_of_evaluations_from" not in capsys.readouterr().out
  # 4. other validation batches on a resume
  assert train("d", 10) == 0
  capsys.readouterr()
  assert train("d", 20, "--config.train.eval_batches=1") == 0
  assert "config.train.eval_batches changed from 1000 to 1 since the checkpoints" in \
      capsys.readouterr().err
