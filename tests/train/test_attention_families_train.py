"""Every causal attention family trains the same LM by one config switch, and samples with its cache."""

import json
import math
import re

import pytest

from jaxlab.train import trainer


# Each family's own options (another family's, set away from the default, is a config error).
FAMILY_OVERRIDES = {
    "local": ["--config.model.attention_window=4"], "linear": [],
    "performer": ["--config.model.num_features=16"],
    "flash": ["--config.model.gau_qk_dim=16", "--config.model.flash_chunk=8"],
    "gau": ["--config.model.gau_qk_dim=16", "--config.model.gau_offset_init=0.5"],
    "block_sparse": ["--config.model.sparse_layout=bigbird", "--config.model.sparse_block_size=4"]}


@pytest.mark.parametrize("family", list(FAMILY_OVERRIDES))
def test_lm_trains_and_samples_with_each_family(family, tiny_lm_config, tmp_path):
  config = tiny_lm_config(f"--config.model.attention={family}", *FAMILY_OVERRIDES[family],
                          "--config.train.steps=12", "--config.train.eval_every=12",
                          "--config.optim.lr=0.01", "--config.sample.prompt=the ")
  result = trainer.train(config, tmp_path, progress=False)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_losses = [r["train_loss"] for r in records if "train_loss" in r]
  assert math.isfinite(result["val_loss"]) and train_losses[-1] < train_losses[0] - 0.1
  text = result["run"].task.finish(result["state"]["params"])
  assert text.startswith("jaxlab: sample") and len(text.splitlines()) >= 3


@pytest.mark.parametrize("override,key", [
    ("--config.model.sparse_layout=dilated", "config.model.sparse_layout"),
    ("--config.model.sparse_block_size=0", "config.model.sparse_block_size"),
    ("--config.model.sparse_local_blocks=0", "config.model.sparse_local_blocks"),
    ("--config.model.sparse_stride=0", "config.model.sparse_stride"),
    ("--config.model.sparse_num_random=-1", "config.model.sparse_num_random"),
    ("--config.model.position=alibi", "config.model.attention='block_sparse'"),
    # A block larger than the context: an array of block^2 entries killed the process in XLA.
    ("--config.model.sparse_block_size=1000000000", "config.model.sparse_block_size=1000000000 "
                                                    "must be <= the context"),
    # Options of another layout (here 'window') would be ignored.
    ("--config.model.sparse_stride=3", "config.model.sparse_stride=3 applies to "
                                       "config.model.sparse_layout='strided', not 'window'"),
    ("--config.model.sparse_num_global=9", "config.model.sparse_num_global=9 applies to "
                                           "config.model.sparse_layout='bigbird'"),
])
def test_block_sparse_options_are_validated(override, key, tiny_lm_config):
  from jaxlab.configs import ConfigError
  with pytest.raises(ConfigError, match=re.escape(key)):
    tiny_lm_config("--config.model.attention=block_sparse", override)


@pytest.mark.parametrize("overrides,key", [
    (["--config.model.attention_window=2"], "config.model.attention_window=2 applies to "
                                            "config.model.attention='local', not 'softmax'"),
    (["--config.model.attention=linear", "--config.model.num_features=8"], "config.model.num_features"),
    (["--config.model.gau_qk_dim=32"], "config.model.gau_qk_dim"),
    (["--config.model.position=learned", "--config.model.rope_theta=500"], "config.model.rope_theta"),
    (["--config.model.attention=flash", "--config.model.gau_qk_dim=3"], "config.model.gau_qk_dim=3 "
                                                                        "must be even"),
    (["--config.model.attention=gau", "--config.model.gau_qk_dim=3"], "config.model.gau_qk_dim=3 "
                                                                      "must be even"),
    (["--config.model.attention=gau", "--config.model.flash_chunk=8"],
     "config.model.flash_chunk=8 applies to config.model.attention='flash', not 'gau'"),
    (["--config.model.attention=gau", "--config.model.logn_scaling=True"],
     "config.model.logn_scaling applies to config.model.attention='gau' with gau_kind='softmax'"),
    (["--config.model.attention=gau", "--config.model.position=alibi"], "config.model.position="),
    (["--config.model.attention=block_sparse", "--config.model.sparse_layout=strided",
      "--config.model.sparse_num_random=3"], "config.model.sparse_num_random=3 applies to "
                                             "config.model.sparse_layout='bigbird', not 'strided'"),
    (["--config.sample.typical_epsilon=0.5"], "config.sample.typical_epsilon=0.5 applies to "
                                              "config.sample.acceptance='typical', not 'exact'"),
    # 1e9 features ran out of memory after compiling, in a workdir already written.
    (["--config.model.attention=performer", "--config.model.num_features=1000000000"],
     "config.model.num_features=1000000000 must be <= 65536"),
    (["--config.data.path=/nonexistent/a.txt"], "config.data.path='/nonexistent/a.txt': "
                                                "/nonexistent/a.txt does not exist"),
])
def test_options_that_would_be_ignored_are_refused(overrides, key, tiny_lm_config):
  """gpt_from_config passes the chosen family's options only: another family's, or rope_theta
  without a rotating position, trained the default model without a word."""
  from jaxlab.configs import ConfigError
  with pytest.raises(ConfigError, match=re.escape(key)):
    tiny_lm_config(*overrides)
