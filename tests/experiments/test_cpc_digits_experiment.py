"""experiments/cpc_digits.py at a tiny size: one row per seed, the summary and the paired gap."""

import json


def test_quick_run_writes_a_row_per_seed_and_the_paired_gap(experiment, tmp_path):
  script = experiment("cpc_digits")
  out = script.main(["--quick", "--seeds", "0", "1", "--steps", "20", "--out", str(tmp_path)])
  assert [r["seed"] for r in out["rows"]] == [0, 1]
  for r in out["rows"]:
    assert all(0.0 < r[k] <= 1.0 for k in ("cpc_accuracy", "untrained_cpc_accuracy",
                                           "pixels_accuracy"))
  gap, se = out["summary"]["gap"]
  expected = sum(r["cpc_accuracy"] - r["untrained_cpc_accuracy"] for r in out["rows"]) / 2
  assert abs(gap - expected) < 1e-12 and se is not None
  md = (tmp_path / "cpc_digits_quick.md").read_text()
  assert "--seeds 0 1 --steps 20 --quick" in md and md.count("\n| 0 |") == 1
  assert json.loads((tmp_path / "cpc_digits_quick.json").read_text())["steps"] == 20
