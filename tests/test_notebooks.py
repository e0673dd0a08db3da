"""Every notebook under notebooks/ is a well-formed Colab notebook whose code cells run in order in one
namespace (IPython magics and shell lines are skipped; the Colab install cell does nothing where jaxlab
is installed) and check what their text claims with `assert` statements: a notebook whose claim stops
being true fails here."""

import ast
import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def code_of(path: pathlib.Path) -> str:
  cells = json.loads(path.read_text())["cells"]
  lines = []
  for cell in cells:
    if cell["cell_type"] == "code":
      lines += [l for l in "".join(cell["source"]).splitlines() if not l.lstrip().startswith(("%", "!"))]
  return "\n".join(lines)


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_well_formed(path):
  nb = json.loads(path.read_text())
  assert nb["nbformat"] == 4, "nbformat 4 (what Colab and Jupyter open)"
  assert nb["cells"][0]["cell_type"] == "markdown", "the notebook opens with a title cell"
  code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code_cells
  for cell in nb["cells"]:
    assert isinstance(cell["source"], (list, str)) and "metadata" in cell
    if cell["cell_type"] == "code":
      # Stored without outputs, so what a reader sees is what the code does today.
      assert cell["outputs"] == [] and cell["execution_count"] is None, (
          f"{path.name}: clear the outputs before committing")
  first = "".join(code_cells[0]["source"])
  assert "pip install" in first, f"{path.name}: the first code cell says how to install jaxlab in Colab"
  tree = ast.parse(code_of(path))
  assert any(isinstance(node, ast.Assert) for node in ast.walk(tree)), (
      f"{path.name}: check the notebook's claims with assert statements")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("MPLBACKEND", "Agg")  # plots render off screen
  monkeypatch.chdir(tmp_path)  # anything a notebook writes lands here
  exec(compile(code_of(path), str(path), "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_install_cell_installs_jaxlab_where_it_is_missing(path, monkeypatch):
  """The first code cell runs pip on a Colab runtime without jaxlab (it was only a comment: "Run
  all" failed at the first import), names a missing source folder, and does nothing where jaxlab is
  installed (a local Jupyter, these tests)."""
  import importlib.util
  import subprocess
  import sys
  cells = json.loads(path.read_text())["cells"]
  install = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: calls.append(command))
  exec(install, {})
  assert calls == []
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # a fresh Colab runtime
  repo = str(path.parents[1])
  monkeypatch.setenv("JAXLAB_SOURCE", repo)
  exec(install, {})
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", repo]]
  monkeypatch.delenv("JAXLAB_SOURCE")
  if not pathlib.Path("/content/jaxlab").exists():
    with pytest.raises(FileNotFoundError, match="/content/jaxlab does not exist: upload or clone"):
      exec(install, {})
