"""experiments/gau_flash.py (--quick) and gau_flash_lm.py (a few steps) run end to end and write their
tables (both once failed at their last line: an import of a helper that had moved)."""

import json


def test_gau_flash_quick_writes_its_table(tmp_path, experiment):
  experiment("gau_flash").main(["--quick", "--out", str(tmp_path)])
  out = json.loads((tmp_path / "gau_flash_quick.json").read_text())
  assert out["device"] and {r["length"] for r in out["speed"]} == {256, 1024}
  md = (tmp_path / "gau_flash_quick.md").read_text()
  assert "| FLASH mixed chunk" in md
  # The cells' ratios and the summary sentence, from the JSON's numbers (not checked before).
  get = lambda name, t: next(r for r in out["speed"] if r["family"] == name and r["length"] == t)
  flash = next(r["family"] for r in out["speed"] if r["family"].startswith("FLASH"))
  r, x = get(flash, 1024), get("softmax (xla), reference", 1024)
  assert (f"{r['ms']:.1f} ms / {r['temp_mib']:.1f} MiB ({r['ms'] / x['ms']:.2f}x, "
          f"{r['temp_mib'] / max(x['temp_mib'], 1e-9):.3f}x)") in md
  assert (f"FLASH uses {x['temp_mib'] / max(r['temp_mib'], 1e-9):.0f}x less working memory and is "
          f"{x['ms'] / r['ms']:.1f}x faster than softmax (xla)") in md


def test_gau_flash_lm_writes_its_table(tmp_path, experiment):
  text = tmp_path / "text.txt"
  text.write_text("to be or not to be, that is the question.\n" * 200)
  script = experiment("gau_flash_lm")
  names = list(script.MODELS)
  script.MODELS = {name: script.MODELS[name] for name in (names[0], names[3])}  # compile time
  script.main(["--data", str(text), "--steps", "2", "--out", str(tmp_path)])
  rows = json.loads((tmp_path / "gau_flash_lm.json").read_text())["rows"]
  assert [r["name"] for r in rows] == list(script.MODELS)
  assert all(r["val_loss"] > 0 for r in rows)
  # The GAU model is the GPT with two gated attention units per block (no MLP), not a copy of it.
  assert rows[0]["params"] != rows[1]["params"]
  assert "| transformer" in (tmp_path / "gau_flash_lm.md").read_text()
