"""An experiment's results as a pair of files: OUT/STEM.md (the table a reader opens) and OUT/STEM.json
(the same numbers for scripts), written together by every script under experiments/.

Both are written to temporary files in OUT first and then renamed over the old pair, the JSON first:
a record that cannot be serialised, or a script killed while writing, leaves the previous pair whole
(at worst a new .json beside the old .md, never a truncated file)."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any


def write(out_dir: str | os.PathLike, stem: str, markdown: str,
          record: dict[str, Any]) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes OUT/STEM.md (`markdown`, ending in one newline) and OUT/STEM.json (`record`, indented);
  creates OUT. Returns (md path, json path). TypeError, before any file is touched, for a record
  that JSON cannot hold."""
  out_dir = pathlib.Path(out_dir)
  payload = json.dumps(record, indent=2) + "\n"
  text = markdown.rstrip("\n") + "\n"
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
  for path, content in ((paths[1], payload), (paths[0], text)):
    _replace(path, content)
  return paths


def _replace(path: pathlib.Path, content: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(content)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp's file is private, 0600)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
