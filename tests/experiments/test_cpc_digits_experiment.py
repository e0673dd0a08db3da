"""experiments/cpc_digits.py at a tiny size: one row per seed, the summary and the paired gap."""

import json

import pytest


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


def test_summary_and_render_on_hand_made_rows(experiment):
  """The means, standard deviations, the paired gap's standard error (sd / sqrt(n)) and the verdict,
  from rows whose numbers are known (the quick run checked only the gap's mean)."""
  script = experiment("cpc_digits")
  rows = [{"seed": s, "val_loss": v, "cpc_accuracy": c, "untrained_cpc_accuracy": u,
           "pixels_accuracy": 0.98, "wall_s": 10.0}
          for s, v, c, u in ((0, 3.0, 0.95, 0.90), (1, 3.2, 0.96, 0.92), (2, 3.4, 0.94, 0.87))]
  s = script.summary(rows)
  assert s["val_loss"][0] == pytest.approx(3.2) and s["val_loss"][1] == pytest.approx(0.2)
  assert s["cpc_accuracy"][0] == pytest.approx(0.95) and s["untrained_cpc_accuracy"][0] == \
      pytest.approx(0.8966666666)
  # gaps 0.05, 0.04, 0.07: mean 0.0533, sd 0.01528, se 0.00882
  assert s["gap"][0] == pytest.approx(0.0533333333) and s["gap"][1] == pytest.approx(0.0088191710)
  out = {"device": "a CPU", "python": "3.11", "date": "today", "command": "c", "steps": 5,
         "rows": rows, "summary": s}
  md = script.render(out)
  assert "| mean +- sd | 3.2000 +- 0.2000 | 0.9500 +- 0.0100 | 0.8967 +- 0.0252 | 0.9800 +- " in md
  assert "paired by seed: 0.0533 +- 0.0088 (more than 2 standard errors)." in md
  close = [dict(r, untrained_cpc_accuracy=r["cpc_accuracy"] - g)
           for r, g in zip(rows, (0.05, -0.04, 0.01))]
  assert "(within 2 standard errors)" in script.render(dict(out, summary=script.summary(close)))
