"""experiments/attention_zoo.py runs end to end on tiny sizes and writes its tables."""

import json
import math
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.skipif(not DATA.is_file(), reason=f"needs {DATA}")
def test_tiny_run_writes_both_tables(tmp_path, experiment):
  script = experiment("attention_zoo")
  script.main(["--quick", "--data", str(DATA), "--lengths", "64,128",
               "--families", "softmax (xla),softmax (blockwise),GAU relu^2 (quadratic)",
               "--lm-families", "softmax", "--steps", "4", "--eval-batches", "2", "--out", str(tmp_path)])
  out = json.loads((tmp_path / "attention_zoo_quick.json").read_text())
  assert {(r["family"], r["length"]) for r in out["speed"]} == {
      (f, t) for f in ("softmax (xla)", "softmax (blockwise)", "GAU relu^2 (quadratic)")
      for t in (64, 128)}
  assert all(r["ms"] > 0 and r["temp_mib"] >= 0 for r in out["speed"])
  (lm,) = out["lm"]
  assert lm["family"] == "softmax" and math.isfinite(lm["val_loss"]) and lm["params"] > 100_000
  md = (tmp_path / "attention_zoo_quick.md").read_text()
  assert "| softmax | " in md and "GAU relu^2" in md
  # The memory sentence from the JSON's numbers (its ratio inverted passed before).
  xla, blk = (next(r for r in out["speed"] if r["family"] == f and r["length"] == 128)
              for f in ("softmax (xla)", "softmax (blockwise)"))
  assert (f"At T=128, blockwise softmax uses {xla['temp_mib'] / max(blk['temp_mib'], 1e-9):.0f}x "
          f"less working memory than `\"xla\"` ({blk['temp_mib']:.1f} vs {xla['temp_mib']:.1f} "
          "MiB)") in md
  # --merge keeps each row's device: a row from another machine is named with it, not relabelled.
  out["lm"].append({**lm, "family": "linear", "device": "another machine"})
  (tmp_path / "attention_zoo_quick.json").write_text(json.dumps(out))
  script.main(["--quick", "--data", str(DATA), "--lengths", "64,128", "--families", "",
               "--lm-families", "", "--merge", "--out", str(tmp_path)])
  md = (tmp_path / "attention_zoo_quick.md").read_text()
  assert f"Devices: {out['device']} (softmax (xla), " in md and "; another machine (linear)." in md


def test_claim_checks_catch_quadratic_memory(experiment):
  script = experiment("attention_zoo")
  rows = [{"family": "softmax (xla)", "length": t, "temp_mib": t * t / 1e4} for t in (4096, 16384)]
  rows += [{"family": "softmax (blockwise)", "length": t, "temp_mib": t / 1e3} for t in (4096, 16384)]
  assert script.check_claims(rows, [4096, 16384]) == []
  rows.append({"family": "linear (elu+1)", "length": 4096, "temp_mib": 1.0})
  rows.append({"family": "linear (elu+1)", "length": 16384, "temp_mib": 16.0})
  (failure,) = script.check_claims(rows, [4096, 16384])
  assert "linear (elu+1)" in failure
  rows[1]["temp_mib"] = rows[3]["temp_mib"] * 5  # xla only 5x the blockwise memory
  assert any("blockwise" in f for f in script.check_claims(rows, [4096, 16384]))
  assert script.check_claims(rows, [64, 128]) == []  # short lengths: not the claims' regime
