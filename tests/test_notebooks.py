"""Every notebook under notebooks/ runs: its code cells are executed in order in one namespace
(IPython magics and shell lines, such as the Colab install cell, are skipped)."""

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
def test_notebook_runs(path, capsys):
  exec(compile(code_of(path), str(path), "exec"), {"__name__": "__main__"})
  out = capsys.readouterr().out
  assert "val loss" in out or "max" in out
