"""experiments/length_extrapolation.py --quick runs end to end and its numbers obey what must hold."""

import json
import math
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.skipif(not DATA.is_file(), reason=f"needs {DATA}")
def test_quick_run_writes_tables_and_scaling_is_the_identity_at_the_training_length(tmp_path,
                                                                                    experiment):
  script = experiment("length_extrapolation")
  variants = ["rope + PI", "rope + dynamic NTK", "rope + YaRN", "rope + ReRoPE(w=16) + log-n",
              "rope + leaky ReRoPE(w=16, k=16)"]  # a name with a comma
  script.main(["--quick", "--encodings", "rope,learned", "--steps", "15", "--lengths", "32,64",
               "--variants", "; ".join(variants), "--data", str(DATA), "--out", str(tmp_path)])
  out = json.loads((tmp_path / "length_extrapolation_quick.json").read_text())
  rows = {(r["model"], r["length"], r["mode"]): r for r in out["rows"]}
  models = ["rope", "learned"] + variants
  assert {m for m, _, _ in rows} == set(models)
  for (model, length, mode), r in rows.items():
    if model == "learned" and length > 32:
      assert r["loss"] is None  # beyond the learned table
    else:
      assert math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 and r["scored"] > 0
  for mode in ("non-overlapping", "sliding"):
    plain = rows[("rope", 32, mode)]["loss"]
    # At the training length every RoPE scaling is the identity: eval_model runs each method with
    # factor 1 there (PI, YaRN with its temperature) or with L <= L_train (dynamic NTK), not plain RoPE.
    for variant in ("rope + PI", "rope + dynamic NTK", "rope + YaRN"):
      assert rows[(variant, 32, mode)]["loss"] == pytest.approx(plain, abs=1e-5), variant
  table = (tmp_path / "length_extrapolation_quick.md").read_text()
  assert "| rope + YaRN |" in table and "n/a" in table
  try:
    import matplotlib  # noqa: F401  (the plot needs the `experiments` extra)
  except ImportError:
    return
  assert (tmp_path / "length_extrapolation_quick.png").is_file()


@pytest.mark.parametrize("variant", ["rope + PI", "rope + NTK", "rope + dynamic NTK", "rope + YaRN",
                                     "rope + log-n", "rope + NTK + log-n"])
def test_eval_models_are_plain_rope_up_to_the_training_length_and_differ_beyond(variant,
                                                                                 experiment):
  """The variant itself (not a substitute) at L = L_train equals plain RoPE, as each method promises
  (factor 1; dynamic NTK and log-n are the identity within L_train), and differs beyond."""
  import jax
  import numpy as np
  from jaxlab.configs import load_config
  script = experiment("length_extrapolation")
  s = script.settings(quick=True)
  config = load_config("lm_char", script.train_overrides(s, str(DATA), "rope", 10),
                       check_devices=False)
  tokens = jax.random.randint(jax.random.key(0), (1, 64), 0, 20)
  plain = script.eval_model(config, 20, 32, {}, 64)
  params = plain.init(jax.random.key(1), tokens[:, :32])["params"]
  changes = script.rope_variants(16)[variant]
  short = script.eval_model(config, 20, 32, changes, 32)
  c = short.config
  if "rope_scaling" in changes:  # the method itself is on, at factor 1 where it has one
    assert c.rope_scaling is not None and c.rope_scaling.kind == changes["rope_scaling"]
    assert c.rope_scaling.factor == 1.0
  else:
    assert c.rope_scaling is None
  assert c.logn_train_len == (32 if changes.get("logn_scaling") else 0)
  np.testing.assert_allclose(short.apply({"params": params}, tokens[:, :32]),
                             plain.apply({"params": params}, tokens[:, :32]), atol=1e-5)
  long = script.eval_model(config, 20, 32, changes, 64)
  diff = np.abs(np.asarray(long.apply({"params": params}, tokens) - plain.apply({"params": params},
                                                                                tokens)))
  assert diff[:, 40:].max() > 1e-5, variant


@pytest.mark.parametrize("flags,message", [
    (["--variants", "rope + PIE"], "unknown"),
    (["--lengths", "8,32"], "must be >= the sliding stride"),
])
def test_bad_variants_and_lengths_are_refused(flags, message, experiment, capsys):
  """An unknown variant was skipped silently; a length below the stride counted targets it never
  scored (uniform logits gave half of log V)."""
  script = experiment("length_extrapolation")
  with pytest.raises(SystemExit):
    script.main(["--quick", *flags])
  assert message in capsys.readouterr().err


def test_sliding_windows_score_the_same_targets_at_every_length(experiment):
  """The sliding columns differ only in context: with a model whose logits depend on nothing but the
  current input token, every window length gives the same loss and count (scoring from the text's
  start, a longer window scored later characters); a start that leaves too little context is refused."""
  import jax
  import numpy as np
  script = experiment("length_extrapolation")

  class CurrentTokenModel:
    def apply(self, variables, inputs_BT):
      return 3.0 * jax.nn.one_hot(inputs_BT, 7)

  tokens = np.random.default_rng(0).integers(0, 7, 400)
  results = [script.score(CurrentTokenModel(), {}, tokens, length=length, stride=16, num_scored=96,
                          sliding=True, first_scored=112, batch_tokens=64)
             for length in (16, 32, 128)]
  assert results[0][2] == 96 and all(r == pytest.approx(results[0], rel=1e-6) for r in results)
  scored_from_start = [script.score(CurrentTokenModel(), {}, tokens, length=length, stride=16,
                                    num_scored=96, sliding=True, first_scored=length - 16)[0]
                       for length in (16, 128)]
  assert scored_from_start[0] != pytest.approx(scored_from_start[1], rel=1e-6)
  with pytest.raises(ValueError, match="context"):
    script.score(CurrentTokenModel(), {}, tokens, length=128, stride=16, num_scored=96, sliding=True,
                 first_scored=100)
