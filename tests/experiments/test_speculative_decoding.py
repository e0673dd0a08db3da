"""experiments/speculative_decoding.py trains its variants (tiny here), measures the heads and both
decoders, and writes its table."""

import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.skipif(not DATA.is_file(), reason=f"needs {DATA}")
def test_tiny_run_writes_the_table(tmp_path, experiment):
  script = experiment("speculative_decoding")
  script.main(["--data", str(DATA), "--steps", "4", "--prompts", "2", "--in-process",
               "--variants", "baseline", "medusa1", "--results", str(tmp_path), "--out", "tiny",
               "--override=--config.model.num_layers=1", "--override=--config.model.width=32",
               "--override=--config.mesh.data=1", "--override=--config.train.eval_batches=4"])
  out = json.loads((tmp_path / "tiny.json").read_text())
  base, medusa = out["results"]
  assert base["variant"] == "baseline" and len(base["head_accuracy"]) == 1 and "greedy" not in base
  assert len(medusa["head_accuracy"]) == 4 and all(0 <= a <= 1 for a in medusa["head_accuracy"])
  # Medusa-1 heads leave the next-token model alone: the same validation loss as the baseline.
  assert medusa["val_loss"] == pytest.approx(base["val_loss"], rel=1e-6)
  ranks = medusa["rank_accuracy"]  # [3 heads][8 ranks], the first of them the top-1 accuracy
  assert len(ranks) == 3 and all(len(r) == 8 for r in ranks) and all(sum(r) <= 1 for r in ranks)
  assert [r[0] for r in ranks] == pytest.approx(medusa["head_accuracy"][1:])
  trees = medusa["trees"]
  assert len(trees["tree"]["paths"]) == 16 and 1 <= len(trees["tree_joint"]["paths"]) <= 16
  # The joint tree holds the nodes most often right, so at least as many are right per position.
  assert trees["tree_joint"]["right_per_position"] >= trees["tree"]["right_per_position"] - 1e-9
  greedy = medusa["greedy"]
  assert greedy["ms_per_token_plain"] > 0
  for name in ("chain", "tree", "tree_joint"):
    assert greedy[name]["identical_to_greedy"] and 1 <= greedy[name]["tokens_per_pass"] <= 4
    assert greedy[name]["ms_per_token"] > 0 and medusa["t0.8"][name]["ms_per_token"] > 0
    for acceptance in (name, f"{name}_typical"):
      assert 1 <= medusa["t0.8"][acceptance]["tokens_per_pass"] <= 4
      assert medusa["t0.8"][acceptance]["logp"] < 0
  md = (tmp_path / "tiny.md").read_text()
  assert "| medusa1 | tree of 16, rates (" in md and "| medusa1 | tree of " in md
  assert ("identical to greedy decoding for every prompt: medusa1 (chain), medusa1 (tree), "
          "medusa1 (tree_joint)") in md and "- medusa1, joint: `paths: " in md
