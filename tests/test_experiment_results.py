"""jaxlab.experiment_results.write: the .md / .json pair of an experiment, replaced whole or not at all."""

import json
import pathlib

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


def test_the_json_is_replaced_before_the_table_and_files_are_readable(tmp_path, monkeypatch):
  """The JSON first: a run stopped between the two renames leaves the new numbers beside the old
  table, never a table without its numbers; both files get the usual permissions (mkstemp's 0600
  made them private to their owner)."""
  import os
  renamed, real_replace = [], os.replace
  monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(pathlib.Path(dst).name),
                                                       real_replace(src, dst)))
  old = os.umask(0o022)
  try:
    md, js = experiment_results.write(tmp_path, "exp", "t", {})
  finally:
    os.umask(old)
  assert renamed == ["exp.json", "exp.md"]
  assert {oct(p.stat().st_mode & 0o777) for p in (md, js)} == {oct(0o644)}


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
