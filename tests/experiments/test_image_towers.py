"""experiments/image_towers.py: the summary and table from fake runs (the real runs are minutes each)."""

import math


def test_summary_means_over_seeds_and_table_ratios(experiment):
  script = experiment("image_towers")
  runs = []
  for tower, base, ms in (("vit", 0.80, 30.0), ("swin-p2-w2", 0.90, 45.0)):
    for seed, delta in ((0, 0.01), (1, -0.01)):
      runs.append({"tower": tower, "seed": seed, "val_loss": 3.5 + delta,
                   "zero_shot_accuracy": base + delta, "image_to_text_R@1": base,
                   "text_to_image_R@1": 1.0, "image_params": 1000, "step_time_ms": ms + seed,
                   "wall_s": 1.0})
  rows = script.summarise(runs)
  assert [r["tower"] for r in rows] == ["vit", "swin-p2-w2"]
  assert math.isclose(rows[1]["zero_shot_accuracy"], 0.90)
  assert math.isclose(rows[1]["zero_shot_accuracy_sd"], math.sqrt(2) * 0.01)
  assert rows[0]["step_time_ms"] == 30.5
  table = script.render({"device": "cpu", "command": "x", "steps": 600, "seeds": [0, 1],
                         "rows": rows, "wall_min": 1.0})
  assert "| swin-p2-w2 | 1,000 | 3.500 +- 0.014 | 0.900 +- 0.014 |" in table
  assert "45.5 (1.49x) |" in table


def test_the_whole_row_from_three_skewed_seeds(experiment):
  """Three seeds with skewed numbers (two seeds made the mean and the median equal), both recall
  columns varying, and each tower its own parameter count: every cell of a row is checked."""
  script = experiment("image_towers")
  runs = []
  for tower, params, ms in (("vit", 1000, 30.0), ("swin-p2-w2", 2500, 45.0)):
    for seed, d, extra_ms in ((0, 0.0, 0.0), (1, 0.03, 1.0), (2, 0.09, 20.0)):
      runs.append({"tower": tower, "seed": seed, "val_loss": 3.0 + d, "zero_shot_accuracy": 0.8 + d,
                   "image_to_text_R@1": 0.7 + 2 * d, "text_to_image_R@1": 0.9 - d,
                   "image_params": params, "step_time_ms": ms + extra_ms, "wall_s": 1.0})
  rows = script.summarise(runs)
  table = script.render({"device": "cpu", "command": "x", "steps": 600, "seeds": [0, 1, 2],
                         "rows": rows, "wall_min": 1.0})
  # d = 0, 0.03, 0.09: mean 0.04, sd 0.0458; step times median 31 / 46 (means 37 / 52)
  assert ("| vit | 1,000 | 3.040 +- 0.046 | 0.840 +- 0.046 | 0.780 +- 0.092 | 0.860 +- 0.046 | "
          "31.0 (1.00x) |") in table
  assert ("| swin-p2-w2 | 2,500 | 3.040 +- 0.046 | 0.840 +- 0.046 | 0.780 +- 0.092 | "
          "0.860 +- 0.046 | 46.0 (1.48x) |") in table


def test_every_tower_is_a_valid_contrastive_digits_config(experiment):
  """The overrides of each tower load and validate (geometry included) and build the tower they name."""
  from jaxlab.configs import load_config
  from jaxlab.train import contrastive_task
  script = experiment("image_towers")
  for tower, overrides in script.TOWERS.items():
    config = load_config("contrastive_digits", overrides, check_devices=False)
    model = contrastive_task.model_config(config, vocab_size=50)
    assert model.image_encoder == ("swin" if tower.startswith("swin") else "vit"), tower
    assert (model.image_position == "rope2d") == tower.startswith("vit-rope2d"), tower
    assert model.image_rope_theta == (10000.0 if tower.endswith("theta10000") else 100.0), tower
