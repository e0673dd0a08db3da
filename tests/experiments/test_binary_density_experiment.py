"""experiments/binary_density.py runs end to end (quick, a few steps) and a re-run of some rows with
--only keeps the others, saying which rows come from runs with other settings."""

import json


def test_quick_rows_and_a_merged_rerun_record_their_settings(experiment, tmp_path):
  script = experiment("binary_density")
  out = tmp_path / "results"
  script.main(["--quick", "--steps", "2", "--only", "digits:fvsbn,digits:made", "--out", str(out)])
  first = json.loads((out / "binary_density_quick.json").read_text())
  assert [(r["dataset"], r["model"]) for r in first["rows"]] == [("digits", "fvsbn"),
                                                                ("digits", "made")]
  assert all(r["budget"] == 1.0 and "commit" in r for r in first["rows"])  # None without git
  script.main(["--quick", "--steps", "2", "--budget", "0.5", "--only", "digits:made", "--out",
               str(out)])
  merged = json.loads((out / "binary_density_quick.json").read_text())
  assert {(r["model"], r["budget"]) for r in merged["rows"]} == {("fvsbn", 1.0), ("made", 0.5)}
  md = (out / "binary_density_quick.md").read_text()
  assert "Rows kept from runs with other settings than this run's budget 0.5" in md
  assert "digits:fvsbn (budget 1.0)" in md and "digits:made" not in md.split("other settings")[1]
