"""pyflakes over the package, the experiments and the tests: no undefined names, unused imports or
variables, redefinitions or f-strings without fields (each of which once hid a bug or dead code)."""

import pathlib
import re

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
  """A message on a line marked `# noqa` or `# noqa: F...` (pyflakes' codes; an import made only to
  test that it is installed); other codes (E402, BLE001) do not silence pyflakes."""
  filename, lineno = line.split(":")[:2]
  source = pathlib.Path(filename).read_text().splitlines()[int(lineno) - 1]
  marker = re.search(r"#\s*noqa(?::\s*([A-Z0-9, ]+))?", source)
  if marker is None:
    return False
  codes = marker.group(1)
  return codes is None or any(c.strip().startswith("F") for c in codes.split(","))


@pytest.mark.parametrize("folder", ["jaxlab", "experiments", "tests"])
def test_pyflakes_finds_nothing(folder):
  paths = sorted((ROOT / folder).rglob("*.py"))
  assert paths
  found = [m for m in _messages(paths) if not _noqa(m)]
  assert not found, "pyflakes:\n" + "\n".join(found)


def test_only_pyflakes_codes_silence_a_line(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("import a  # noqa: E402\nimport b  # noqa: F401\nimport c  # noqa\n"
                  "import d  # noqa: BLE001\n")
  kept = [m for m in _messages([path]) if not _noqa(m)]
  assert [m.split("'")[1] for m in kept] == ["a", "d"]


def test_the_check_reports_an_unused_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("import os\n\n\ndef f():\n  return undefined_name\n")
  found = _messages([bad])
  assert any("'os' imported but unused" in m for m in found)
  assert any("undefined name 'undefined_name'" in m for m in found)
