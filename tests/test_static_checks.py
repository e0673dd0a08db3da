"""pyflakes over the package, the experiments and the tests: no undefined names, unused imports or
variables, redefinitions or f-strings without fields (each of which once hid a bug or dead code)."""

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _messages(paths) -> list[str]:
  from pyflakes import api, reporter

  class Collect(reporter.Reporter):
    def __init__(self):
      self.lines = []

    def unexpectedError(self, filename, msg):
      self.lines.append(f"{filename}: {msg}")

    def syntaxError(self, filename, msg, lineno, offset, text):
      self.lines.append(f"{filename}:{lineno}: {msg}")

    def flake(self, message):
      self.lines.append(str(message))

  collect = Collect()
  for path in paths:
    api.checkPath(str(path), collect)
  return collect.lines


def _noqa(line: str) -> bool:
  """A message on a line marked `# noqa` (an import made only to test that it is installed)."""
  filename, lineno = line.split(":")[:2]
  return "# noqa" in pathlib.Path(filename).read_text().splitlines()[int(lineno) - 1]


@pytest.mark.parametrize("folder", ["jaxlab", "experiments", "tests"])
def test_pyflakes_finds_nothing(folder):
  paths = sorted((ROOT / folder).rglob("*.py"))
  assert paths
  found = [m for m in _messages(paths) if not _noqa(m)]
  assert not found, "pyflakes:\n" + "\n".join(found)


def test_the_check_reports_an_unused_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("import os\n\n\ndef f():\n  return undefined_name\n")
  found = _messages([bad])
  assert any("'os' imported but unused" in m for m in found)
  assert any("undefined name 'undefined_name'" in m for m in found)
