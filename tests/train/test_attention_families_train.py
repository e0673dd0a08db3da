"""Every causal attention family trains the same LM by one config switch, and samples with its cache."""

import json
import math

import pytest

from jaxlab.train import trainer


@pytest.mark.parametrize("family", ["local", "linear", "performer", "flash"])
def test_lm_trains_and_samples_with_each_family(family, tiny_lm_config, tmp_path):
  config = tiny_lm_config(f"--config.model.attention={family}", "--config.model.attention_window=4",
                          "--config.model.num_features=16", "--config.train.steps=12",
                          "--config.model.gau_qk_dim=16", "--config.model.flash_chunk=8",
                          "--config.train.eval_every=12", "--config.optim.lr=0.01",
                          "--config.sample.prompt=the ")
  result = trainer.train(config, tmp_path, progress=False)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_losses = [r["train_loss"] for r in records if "train_loss" in r]
  assert math.isfinite(result["val_loss"]) and train_losses[-1] < train_losses[0] - 0.1
  text = result["run"].task.finish(result["state"]["params"])
  assert text.startswith("jaxlab: sample") and len(text.splitlines()) >= 3
