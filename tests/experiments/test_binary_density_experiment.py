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


def test_a_row_s_derived_numbers(experiment):
  """gap = test - published (its sign says which is better), epochs = examples / training size, the
  selected step is the best record's or else the last."""
  script = experiment("binary_density")
  row = script.result_row("mnist", "nade", "nade", ["--x=1"], steps=10_000, examples_seen=1_000_000,
                          train_size=50_000, best_step=8_500, train_s=812.34, eval_s=3.21,
                          step_ms=81.234, val_nll=87.1234, test_nll=87.6345, published=88.86,
                          grid="g.png", note="n")
  assert row["gap"] == -1.23 and row["epochs"] == 20.0 and row["selected_step"] == 8_500
  assert (row["val_nll"], row["test_nll"], row["ms_per_step"], row["train_s"]) == \
      (87.123, 87.635, 81.23, 812.3)
  assert row["overrides"] == ["--x=1"] and row["samples_png"] == "g.png"
  worse = script.result_row("caltech", "made", "made", [], steps=100, examples_seen=5_000,
                            train_size=4_100, best_step=None, train_s=1.0, eval_s=1.0, step_ms=None,
                            val_nll=1.0, test_nll=90.0, published=88.04, grid="", note="")
  assert worse["gap"] == 1.96 and worse["selected_step"] == 100 and worse["epochs"] == 1.22
  assert worse["ms_per_step"] is None
  assert script.result_row("x", "y", "y", [], steps=1, examples_seen=1, train_size=1, best_step=None,
                           train_s=0, eval_s=0, step_ms=1, val_nll=1, test_nll=1, published=None,
                           grid="", note="")["gap"] is None
