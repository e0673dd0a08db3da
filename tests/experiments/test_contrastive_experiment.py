"""experiments/contrastive.py: its pieces on hand-made inputs, and --quick end to end on the emoji pairs."""

import json
import math
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
EMOJI = REPO.parent / "shared" / "data" / "emoji_captions"


def test_batches_hold_distinct_captions_and_valid_images(experiment):
  import jax
  import jax.numpy as jnp
  script = experiment("contrastive")
  split = script.make_split(np.zeros((7, 1)), ["a", "b", "a", "c", "b", "d", "a"], [0] * 7)
  assert split.captions == ["a", "b", "c", "d"] and split.count_C.tolist() == [3, 2, 1, 1]
  for seed in range(20):
    caption_B, image_B = script.sample_batch(jax.random.PRNGKey(seed), jnp.asarray(split.images_of_C),
                                             jnp.asarray(split.count_C), 4)
    assert sorted(np.asarray(caption_B).tolist()) == [0, 1, 2, 3]  # B = C: every caption once
    assert (split.image_caption_M[np.asarray(image_B)] == np.asarray(caption_B)).all()


def test_retrieval_metrics_on_hand_made_embeddings(experiment):
  script = experiment("contrastive")
  caption_CE = np.eye(3)
  image_ME = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0.6, 0.8]])  # image 3: caption 2 first
  image_ME /= np.linalg.norm(image_ME, axis=1, keepdims=True)
  image_caption_M = np.array([0, 0, 1, 2])
  labels_M = np.array([0, 0, 1, 1])
  class_KE = np.array([[1.0, 0, 0], [0, 1.0, 0]])
  m = script.retrieval_metrics(image_ME, caption_CE, image_caption_M, class_KE, labels_M)
  assert m["i2t_R@1"] == pytest.approx(1.0)  # image 3's best caption is 2 (0.8 > 0.6)
  assert m["t2i_R@1"] == pytest.approx(1.0)  # each caption's top image is one of its own
  assert m["zs_acc"] == pytest.approx(1.0) and m["zs_bal_acc"] == pytest.approx(1.0)
  image_ME[3] = [0, 1, 0]  # now image 3 retrieves caption 1 first: one miss of four
  m = script.retrieval_metrics(image_ME, caption_CE, image_caption_M, class_KE, labels_M)
  assert m["i2t_R@1"] == pytest.approx(0.75) and m["i2t_R@5"] == pytest.approx(1.0)
  base = script.majority_baseline(np.array([0, 0, 0, 1]))
  assert base["zs_acc"] == 0.75 and base["zs_bal_acc"] == 0.5


@pytest.mark.skipif(not EMOJI.is_dir(), reason=f"needs {EMOJI}")
def test_no_drawing_is_on_two_sides_of_the_three_splits(tmp_path, experiment):
  """The validation split (crc32 % 10 == 1) follows split_keys as the test split does: byte-identical
  drawings (Twemoji's families, shared flags) on both sides of it leaked into the lr choice."""
  train, val, test, _, _ = experiment("contrastive").load_emoji(str(tmp_path), str(EMOJI))
  drawings = lambda split: {np.asarray(image).tobytes() for image in split.images_MHWC}
  assert not drawings(train) & drawings(val)
  assert not (drawings(train) | drawings(val)) & drawings(test)
  assert (len(train.captions), len(val.captions), len(test.captions)) == (2975, 371, 440)


def test_seeds_must_fill_whole_groups_of_the_grid(experiment, capsys):
  with pytest.raises(SystemExit):
    experiment("contrastive").main(["--quick", "--seeds", "3", "--out", "/nonexistent"])
  assert "--seeds must be a positive multiple of the lr grid's size 2" in capsys.readouterr().err


@pytest.mark.skipif(not EMOJI.is_dir(), reason=f"needs {EMOJI}")
def test_quick_run_writes_the_whole_report(tmp_path, experiment):
  script = experiment("contrastive")
  out = script.main(["--quick", "--batches", "16", "--examples", "256", "--steps", "8",
                     "--memory-batches", "256", "--tier-b-steps", "2", "--seeds", "4",
                     "--emoji", str(EMOJI), "--data-dir", str(tmp_path / "tfds"),
                     "--out", str(tmp_path)])
  assert out["complete"] and out["counts"]["test"] == 440 and out["counts"]["test_images"] == 880
  assert out["counts"]["train"] + out["counts"]["val"] <= 3346
  rows = {(r["protocol"], r["loss"]): r for r in out["tier_a"]}
  assert set(rows) == {(p, l) for p in ("examples", "steps") for l in ("clip", "siglip")}
  for (protocol, _), r in rows.items():
    assert r["batch"] == 16 and r["lr"] in r["lr_grid"]
    assert r["steps"] == (out["settings"]["examples"] // 16 if protocol == "examples"
                          else out["settings"]["steps"])
    assert len(r["lr_grid"]) == len(r["val_scores"]) == 2
    # 4 seeds, run 2 at a time in the grid's program: the second pair is seeds 3 and 4, not a copy
    assert r["seeds"] == [1, 2, 3, 4] and len(r["per_seed"]) == len(r["final_train_loss"]) == 4
    assert len({json.dumps(m, sort_keys=True) for m in r["per_seed"]}) == 4
    scalar = "logit_scale" if r["loss"] == "clip" else "bias"
    assert len(r[scalar]) == 4
    assert r["lr"] == r["lr_grid"][int(np.argmax(r["val_scores"]))]  # chosen on validation
    for k in script.METRICS:
      assert 0.0 <= r[k] <= 1.0 and math.isfinite(r[k + "_sd"])
      seeds = [m[k] for m in r["per_seed"]]  # the mean over seeds (one seed's number passed)
      assert r[k] == pytest.approx(float(np.mean(seeds)))
      assert r[k + "_sd"] == pytest.approx(float(np.std(seeds, ddof=1)))
  assert {r["loss"] for r in out["tier_b"]} == {"clip", "siglip"}
  assert {r["loss"] for r in out["memory"]} >= {"SigLIP chunked (ring), 8 devices",
                                                 "CLIP all-gather, 8 devices"}
  md = (tmp_path / "contrastive_quick.md").read_text()
  for text in ("Generated entirely by", "Command: `python experiments/contrastive.py --quick",
               "protocol (1): same examples seen", "protocol (2): same number of steps",
               "## Reading (generated from the numbers above)", "Does the SigLIP paper's finding",
               "Tier B: the real dual encoder", "## Peak memory per device"):
    assert text in md, text
  assert "PARTIAL" not in md and "re-rendered" not in md
  again = script.main(["--quick", "--report-only", "--out", str(tmp_path)])  # from the .json alone
  assert again["tier_a"] == out["tier_a"]
  md2 = (tmp_path / "contrastive_quick.md").read_text()
  assert "re-rendered from contrastive_quick.json" in md2
  assert md2.split("## Design")[1] == md.split("## Design")[1]  # same tables and reading
  assert json.loads((tmp_path / "contrastive_quick.json").read_text())["wall_seconds"] > 0
  rerun = script.main(["--quick", "--tier-b-only", "--emoji", str(EMOJI), "--data-dir",
                       str(tmp_path / "tfds"), "--out", str(tmp_path)])  # tier A and memory kept
  assert rerun["tier_a"] == out["tier_a"] and rerun["memory"] == out["memory"] and rerun["complete"]
  assert {r["loss"] for r in rerun["tier_b"]} == {"clip", "siglip"}
  assert rerun["wall_seconds"] > out["wall_seconds"]
  assert "then tier B re-run by `python experiments/contrastive.py --quick --tier-b-only" in (
      tmp_path / "contrastive_quick.md").read_text()
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    return
  assert (tmp_path / "contrastive_quick.png").is_file()


def _row(loss, batch, r1_per_seed, protocol="examples", lr=1e-3, lr_grid=(1e-4, 1e-3, 1e-2)):
  return {"protocol": protocol, "loss": loss, "batch": batch, "lr": lr, "lr_grid": list(lr_grid),
          "per_seed": [{"i2t_R@1": v, "t2i_R@1": v} for v in r1_per_seed]}


def test_gaps_and_verdict_on_hand_made_rows(experiment):
  """The report's conclusions (SigLIP - CLIP per batch with the paired standard error, and whether the
  paper's two claims hold) from rows whose numbers are known: no test called them before."""
  script = experiment("contrastive")
  rows = [_row("clip", 16, [0.50, 0.52, 0.48]), _row("siglip", 16, [0.60, 0.61, 0.59]),
          _row("clip", 512, [0.70, 0.71, 0.69], lr=1e-2), _row("siglip", 512, [0.70, 0.72, 0.69]),
          _row("clip", 16, [0.1, 0.1, 0.1], protocol="steps")]  # another protocol: not mixed in
  g = script.gaps(rows, "examples")
  assert [x["batch"] for x in g] == [16, 512]
  # batch 16: differences 0.10, 0.09, 0.11 -> mean 0.10, se 0.01 / sqrt(3)
  assert g[0]["gap"] == pytest.approx(0.10) and g[0]["se"] == pytest.approx(0.01 / math.sqrt(3))
  assert g[0]["clip"] == pytest.approx(0.50) and g[0]["siglip"] == pytest.approx(0.60)
  assert not g[0]["clip_lr_at_top"] and g[1]["clip_lr_at_top"] and g[1]["seeds"] == 3
  assert g[1]["gap"] == pytest.approx(0.01 / 3)  # differences 0, 0.01, 0
  v = script.verdict(g)
  # SigLIP clearly ahead at small batch, and the gap shrinks at large batch: the paper's claims hold.
  assert v["small_sig"] and v["converge"] and v["holds"] and not v["reverses"]
  assert v["small_gap"] == pytest.approx(0.10) and v["large_abs"] == pytest.approx(0.01 / 3)
  assert "B=16: +10.0 +- 0.6 (SigLIP ahead)" in v["parts"]
  assert "B=512: +0.3 +- 0.3 (within 2 s.e.)" in v["parts"]
  # CLIP clearly ahead at large batch after SigLIP led at small: a reversal, not convergence.
  rows[3] = _row("siglip", 512, [0.60, 0.61, 0.60])
  v = script.verdict(script.gaps(rows, "examples"))
  assert v["reverses"] and not v["converge"] and not v["holds"] and v["n_large_against"] == 1
  assert "(CLIP ahead)" in v["parts"]
