"""Bad configs fail before anything is compiled or trained, with one line naming the key."""

import jax
import pytest

from jaxlab.configs import ConfigError, load_config


def early(name, *overrides):
  return load_config(name, list(overrides), check_devices=False)


@pytest.mark.parametrize("name, override, key", [
    ("lm_char_cpu", "--config.model.mlp_ratio=0.001", "config.model.mlp_ratio"),
    ("lm_char_cpu", "--config.model.num_layers=100000", "config.model.num_layers=100000 must be <="),
    # ~25 s in NumPy (RoPE's frequencies) before the memory check refused it
    ("lm_char", "--config.model.width=1000000000", "config.model.width=1000000000 must be <= 131,072"),
    ("contrastive_digits", "--config.model.text_width=1000000000",
     "config.model.text_width=1000000000 must be <= 131,072"),
    ("contrastive_digits", "--config.model.text_layers=5000", "config.model.text_layers=5000"),
    ("contrastive_digits", "--config.model.mlp_ratio=0.001", "config.model.mlp_ratio"),
    ("lm_char_cpu", "--config.optim.lr=1e999", "config.optim.lr"),
    ("made", "--config.optim.min_lr=1e999", "config.optim.min_lr"),
    ("lm_char_cpu", "--config.optim.weight_decay=1e999", "config.optim.weight_decay"),
    ("lm_char_cpu", "--config.optim.grad_clip=1e999", "config.optim.grad_clip"),
    ("lm_char_cpu", "--config.optim.eps=-1.0", "config.optim.eps"),
    ("made", "--config.optim.eps=0.0", "config.optim.eps"),
    ("lm_char_cpu", "--config.seed=-5", "config.seed"),
    ("made", "--config.seed=4294967296", "config.seed"),
    ("lm_char_cpu", "--config.model.rope_theta=-1.0", "config.model.rope_theta"),
    ("lm_char_cpu", "--config.model.rope_theta=1e999", "config.model.rope_theta"),
    ("lm_char", "--config.model.logit_soft_cap=1e400", "config.model.logit_soft_cap"),  # inf passed
    ("lm_char", "--config.model.rope_scaling_factor=1e400", "config.model.rope_scaling_factor"),
    ("contrastive_digits", "--config.data.batch_size=400", "config.data.batch_size"),
    # range checks that no row reached (each removed, the value was accepted)
    ("lm_char", "--config.train.eval_every=0", "config.train.eval_every"),
    ("lm_char", "--config.train.keep_checkpoints=0", "config.train.keep_checkpoints"),
    ("lm_char", "--config.optim.b1=1.0", "config.optim.b1"),
    ("lm_char", "--config.optim.min_lr=1.0", "config.optim.min_lr"),
    ("lm_char", "--config.optim.weight_decay=-1.0", "config.optim.weight_decay"),
    ("lm_char", "--config.optim.grad_clip=-1.0", "config.optim.grad_clip"),
    ("lm_char", "--config.mesh.cpu_devices=-1", "config.mesh.cpu_devices"),
    ("lm_char", "--config.optim.lr=True", "config.optim.lr"),  # a bool for a float key
])
def test_bad_values_name_the_key(name, override, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
    early(name, override)
  assert "\n" not in str(info.value)


def test_a_loss_scale_beyond_float32_is_refused():
  with pytest.raises(ConfigError, match=r"config\.optim\.loss_scale_init"):
    early("lm_char", "--config.model.dtype=float16", "--config.optim.loss_scale_init=1e300")


def test_good_edge_values_pass():
  early("lm_char_cpu", "--config.seed=4294967295", "--config.model.mlp_ratio=0.05",
        "--config.model.attention_impl=pallas")
  early("lm_char_cpu", "--config.model.attention=flash", "--config.model.mlp_ratio=0.001")
  early("lm_char_cpu", "--config.model.attention=gau", "--config.model.mlp_ratio=0.001")
  early("lm_char_cpu", "--config.model.attention=gau", "--config.model.gau_kind=softmax",
        "--config.model.logn_scaling=True")


def test_batch_not_divisible_by_a_fixed_mesh_blames_the_batch():
  with pytest.raises(ConfigError, match=r"config\.data\.batch_size=13 .*= 2$"):
    early("lm_char_cpu", "--config.data.batch_size=13", "--config.mesh.data=2")
  with pytest.raises(ConfigError, match=r"config\.data\.batch_size=12 .*= 8$"):
    early("made", "--config.data.batch_size=12", "--config.mesh.data=2", "--config.mesh.fsdp=4")
  early("lm_char_cpu", "--config.data.batch_size=13", "--config.mesh.data=-1")  # devices decide


def test_cudnn_attention_is_refused_off_the_gpu():
  assert jax.default_backend() == "cpu"
  with pytest.raises(ConfigError, match=r"config\.model\.attention_impl='cudnn'"):
    load_config("lm_char_cpu", ["--config.model.attention_impl=cudnn", "--config.mesh.data=1"])
  load_config("lm_char_cpu", ["--config.model.attention_impl=pallas", "--config.mesh.data=1"])


# ------------------------------------------------------------------ at task construction (data known)

def test_seq_len_longer_than_the_validation_split(tiny_lm_config):
  from jaxlab.train.lm_task import LMTask
  with pytest.raises(ConfigError, match=r"config\.data\.seq_len=3000 .*validation split has \d+") \
      as info:
    LMTask(tiny_lm_config("--config.data.seq_len=3000", "--config.model.max_len=0"))
  assert "\n" not in str(info.value)


def test_batch_with_no_whole_validation_batch(tiny_lm_config):
  from jaxlab.train.lm_task import LMTask
  with pytest.raises(ConfigError, match=r"config\.data\.batch_size=4000 .*validation split"):
    LMTask(tiny_lm_config("--config.data.batch_size=4000"))


def test_prompt_outside_the_vocabulary(tiny_lm_config):
  from jaxlab.train.lm_task import LMTask
  with pytest.raises(ConfigError, match=r"^config\.sample\.prompt: character '€' is not in the "
                                        r"vocabulary"):
    LMTask(tiny_lm_config("--config.sample.prompt=€€")).check_before_training()
  # No sample at the end of training: the prompt does not matter (and eval never checks it).
  LMTask(tiny_lm_config("--config.sample.prompt=€€", "--config.sample.num_tokens=0")
         ).check_before_training()
  task = LMTask(tiny_lm_config("--config.sample.prompt=ROMEO:"))
  task.check_prompt("the cat", "--prompt")
  with pytest.raises(ValueError, match=r"^--prompt: character '€' is not in the vocabulary"):
    task.check_prompt("cat€", "--prompt")
  byte_task = LMTask(tiny_lm_config("--config.data.vocab=byte", "--config.sample.prompt=€€"))
  byte_task.check_prompt("€ anything", "--prompt")


def test_a_prompt_outside_the_vocabulary_leaves_no_workdir(tiny_lm_config, tmp_path):
  """`jaxlab train` refuses it before the workdir exists (a fresh runs/NAME-STAMP each time, before)."""
  from jaxlab.train import trainer
  with pytest.raises(ConfigError, match="config.sample.prompt"):
    trainer.train(tiny_lm_config("--config.sample.prompt=€€"), tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()


def test_density_batch_larger_than_the_training_split():
  from jaxlab.train.density_task import DensityTask
  config = early("made", "--config.data.batch_size=2000", "--config.mesh.data=1")
  with pytest.raises(ConfigError, match=r"config\.data\.batch_size=2000 .*1347 training"):
    DensityTask(config)


def test_a_mesh_larger_than_the_cpu_devices_names_cpu_devices():
  """On a 2-core machine `--config.mesh.data=4` said "only 1 are available" (jaxlab's own choice
  of CPU devices) without naming the key that changes it."""
  with pytest.raises(ConfigError, match=r"config\.mesh: mesh sizes \[16, 1, 1\] need 16 devices, "
                                        r"but only 8 are available \(CPU devices: .*set "
                                        r"config\.mesh\.cpu_devices to the count the mesh needs\)"):
    load_config("lm_char", ["--config.mesh.data=16", "--config.data.batch_size=16"])


@pytest.mark.parametrize("override,message", [
    ("--config.mesh.tensor=0", "config.mesh.tensor=0 must be >= 1, or -1 (the rest)"),
    ("--config.mesh.fsdp=-2", "config.mesh.fsdp=-2 must be >= 1, or -1 (the rest)"),
    ("--config.mesh.fsdp=-1", "config.mesh: at most one of data, fsdp, tensor may be -1"),
])
def test_a_bad_mesh_size_names_its_key(override, message):
  """It named the section only ("config.mesh: mesh sizes must be positive or -1, got [-1, 1, 0]"),
  with a hint about CPU devices that did not apply."""
  with pytest.raises(ConfigError) as e:
    load_config("lm_char", [override])
  assert str(e.value).startswith(message) and "cpu_devices" not in str(e.value)
