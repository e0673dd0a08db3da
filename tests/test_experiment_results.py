"""jaxlab.experiment_results.write: the .md / .json pair of an experiment, replaced whole or not at all."""

import json

import pytest

from jaxlab import experiment_results


def test_writes_the_pair_and_replaces_an_older_one(tmp_path):
  out = tmp_path / "results" / "new"  # created
  md, js = experiment_results.write(out, "exp", "| a |\n| --- |\n\n", {"rows": [1.5, None]})
  assert (md, js) == (out / "exp.md", out / "exp.json")
  assert md.read_text() == "| a |\n| --- |\n"  # one final newline
  assert json.loads(js.read_text()) == {"rows": [1.5, None]}
  experiment_results.write(out, "exp", "second", {"rows": []})
  assert md.read_text() == "second\n" and json.loads(js.read_text()) == {"rows": []}
  assert sorted(p.name for p in out.iterdir()) == ["exp.json", "exp.md"]  # no temporary files


def test_a_record_json_cannot_hold_leaves_the_old_pair(tmp_path):
  experiment_results.write(tmp_path, "exp", "old table", {"x": 1})
  with pytest.raises(TypeError):
    experiment_results.write(tmp_path, "exp", "new table", {"x": object()})
  assert (tmp_path / "exp.md").read_text() == "old table\n"
  assert json.loads((tmp_path / "exp.json").read_text()) == {"x": 1}


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
  """A write that fails after the JSON (here: the table's rename) leaves the old table whole and
  no temporary file behind."""
  import os
  experiment_results.write(tmp_path, "exp", "old table", {"x": 1})
  real_replace = os.replace

  def fail_on_the_table(src, dst):
    if str(dst).endswith(".md"):
      raise OSError(28, "No space left on device")
    real_replace(src, dst)

  monkeypatch.setattr(os, "replace", fail_on_the_table)
  with pytest.raises(OSError):
    experiment_results.write(tmp_path, "exp", "new table", {"x": 2})
  assert (tmp_path / "exp.md").read_text() == "old table\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.json", "exp.md"]
