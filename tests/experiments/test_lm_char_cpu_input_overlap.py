"""experiments/lm_char_cpu_input_overlap.py times its three loop orders on a tiny model and writes its
table."""

import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.skipif(not DATA.is_file(), reason=f"needs {DATA}")
def test_tiny_run_writes_the_table(tmp_path, experiment):
  script = experiment("lm_char_cpu_input_overlap")
  script.main(["--data", str(DATA), "--rounds", "3", "--block", "2", "--out", str(tmp_path),
               "--override=--config.mesh.data=2", "--override=--config.model.num_layers=1",
               "--override=--config.model.width=32"])
  out = json.loads((tmp_path / "lm_char_cpu_input_overlap.json").read_text())
  assert out["xla_devices"] == 2 and out["rounds"] == 3
  assert set(out["ms_per_step"]) == {"fetch, step; grain threads", "fetch, step; in thread",
                                     "step, fetch next; in thread"}
  assert all(len(v) == 3 and all(t > 0 for t in v) for v in out["ms_per_step"].values())
  md = (tmp_path / "lm_char_cpu_input_overlap.md").read_text()
  assert "| step, fetch next; in thread | " in md and "2 XLA CPU devices" in md
