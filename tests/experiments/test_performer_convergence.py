"""experiments/performer_convergence.py --quick runs end to end and its numbers obey what must hold."""

import json
import math
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_quick_run_writes_tables_and_the_error_falls_with_num_features(tmp_path, experiment):
  script = experiment("performer_convergence")
  script.main(["--quick", "--out", str(tmp_path)])
  out = json.loads((tmp_path / "performer_convergence_quick.json").read_text())
  assert out["device"] and out["settings"]["features"] == [16, 256]
  rows = {(r["regime"], r["causal"]): r for r in out["rows"]}
  assert set(rows) == {(g, c) for g in script.REGIMES for c in (False, True)}
  for (regime, causal), r in rows.items():
    errs = [r["errors"][str(m)] for m in out["settings"]["features"]]
    assert all(math.isfinite(e) and e > 0 for e in errs), (regime, causal, errs)
    assert errs[0] > errs[-1], (regime, causal, errs)  # more features, smaller error
    if regime == "two clusters":  # the regime where FAVOR+ beats uniform attention
      assert errs[-1] < r["uniform"], (regime, causal, errs, r["uniform"])
  table = (tmp_path / "performer_convergence_quick.md").read_text()
  assert "| 256 |" in table and "| uniform |" in table and out["device"] in table


def test_table_on_hand_made_rows(experiment):
  """Each error, the uniform baseline and the ratio M=lo / M=hi per column (the ratio inverted passed
  the run above, which checks that the table has rows only)."""
  script = experiment("performer_convergence")
  rows = [{"regime": "smooth", "causal": False, "errors": {"16": 0.4, "64": 0.2, "256": 0.1},
           "uniform": 0.5},
          {"regime": "smooth", "causal": True, "errors": {"16": 0.3, "64": 0.2, "256": 0.05},
           "uniform": 0.6}]
  lines = script.table(rows, [16, 64, 256])
  assert lines[0] == "| M | smooth, non-causal | smooth, causal |"
  assert "| 64 | 0.2000 | 0.2000 |" in lines and "| uniform | 0.5000 | 0.6000 |" in lines
  assert lines[-1] == "| ratio M=16 / M=256 | 4.00 | 6.00 |"
