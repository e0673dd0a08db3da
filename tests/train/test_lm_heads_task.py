"""Extra heads through the config, the LM task's loss and the command line: the training loss adds the
heads' losses (evaluation scores the next-token head), and `jaxlab sample --speculative` gives the
same greedy text as ordinary sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import cli
from jaxlab.configs import ConfigError, load_config
from jaxlab.train import lm_task


def test_lm_loss_adds_the_heads_and_eval_scores_only_the_next_token(tiny_lm_config):
  """The training objective is next-token + weighted heads' losses, also under gradient accumulation
  (microbatches: the same loss and gradient); evaluation scores the next-token head alone."""
  from jaxlab.train import trainer
  config = tiny_lm_config("--config.model.mtp_heads=2", "--config.model.heads_loss_decay=0.5")
  task = lm_task.build(config)
  params = jax.tree.map(lambda a: a * 3.0, task.init_params(jax.random.key(0)))
  params = jax.tree.map(lambda a: getattr(a, "value", a), params,
                        is_leaf=lambda a: hasattr(a, "value"))
  batch = next(iter(task.train_iterator()))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  logits = jax.jit(lambda p: task.model.apply({"params": p}, batch["inputs"], all_heads=True))(
      params)
  nt_sum, count = lm_task.next_token_loss(logits[:, :, 0], batch["targets"])
  want = nt_sum / count + lm_task.heads_loss(logits, batch["targets"], 0.5)
  grads = jax.jit(lambda m: trainer.loss_and_grads(task, params, batch, jax.random.key(0), m),
                  static_argnums=0)
  (whole_loss, whole_grads), (parts_loss, parts_grads) = grads(1), grads(4)
  np.testing.assert_allclose(whole_loss, want, rtol=1e-6)
  np.testing.assert_allclose(parts_loss, want, rtol=1e-5)
  # Float32 sums in another order (4 slices): within 1e-5 of each leaf's largest entry; a wrong
  # weighting of the slices is off by O(1) of it. (An absolute 1e-6 used 78% of its margin here,
  # and rounding moves with the core count.)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5 * np.abs(b).max()),
               parts_grads, whole_grads)
  eval_loss, (eval_sum, _) = jax.jit(lambda p: task.loss(p, batch, jax.random.key(0),
                                                         train=False))(params)
  np.testing.assert_allclose(eval_loss, nt_sum / count, rtol=1e-6)
  np.testing.assert_allclose(eval_sum, nt_sum, rtol=1e-6)
  assert float(whole_loss) > float(eval_loss) + 0.1


@pytest.mark.parametrize("overrides,key", [
    (("--config.model.mtp_heads=1", "--config.model.medusa_heads=2"), "config.model.mtp_heads=1"),
    (("--config.model.medusa_heads=-1",), "config.model.medusa_heads"),
    (("--config.model.mtp_heads=16",), "config.data.seq_len=16"),
    (("--config.model.medusa_heads=1", "--config.model.heads_loss_decay=0"),
     "config.model.heads_loss_decay"),
    (("--config.sample.speculative=True",), "config.sample.speculative"),
    (("--config.sample.speculative=True", "--config.model.medusa_heads=1",
      "--config.model.attention=flash"), "config.model.attention='flash'"),
    (("--config.sample.speculative=True", "--config.model.mtp_heads=16",
      "--config.data.seq_len=32", "--config.model.attention=linear"),
     "a pass of 16 drafts + 1 token"),
    (("--config.sample.speculative=True", "--config.model.mtp_heads=16",  # the local ring's bound
      "--config.data.seq_len=32", "--config.model.attention=local"),
     "a pass of 16 drafts + 1 token"),
    (("--config.sample.speculative=True", "--config.model.medusa_heads=1",
      "--config.model.position=learned", "--config.model.max_len=20",
      "--config.sample.num_tokens=17"), "config.sample.num_tokens=17"),
    (("--config.model.position=xpos", "--config.model.dtype=float16",
      "--config.sample.num_tokens=3000"), "config.sample.num_tokens=3000: prompt + num_tokens"),
    (("--config.model.position=xpos", "--config.model.medusa_heads=2",
      "--config.sample.speculative=True", "--config.sample.num_tokens=32800"),
     "config.sample.num_tokens=32800: prompt + num_tokens = 32804 (+ 2 draft positions)"),
    (("--config.model.heads_stop_gradient=True",), "config.model.heads_stop_gradient"),
    (("--config.model.heads_loss_decay=0.8",), "config.model.heads_loss_decay"),
    (("--config.model.medusa_heads=1", "--config.model.heads_loss_decay=True"),
     "config.model.heads_loss_decay"),
    (("--config.model.medusa_heads=2", "--config.sample.draft_tree=2,2"),
     "config.sample.speculative=True"),
    (("--config.model.medusa_heads=2", "--config.sample.speculative=True",
      "--config.sample.draft_tree=2,x"), "config.sample.draft_tree"),
    (("--config.model.medusa_heads=2", "--config.sample.speculative=True",
      "--config.sample.draft_tree=2,2,2"), "config.sample.draft_tree='2,2,2' is 3 deep"),
    (("--config.model.medusa_heads=2", "--config.sample.speculative=True",
      "--config.model.attention=local", "--config.sample.draft_tree=2,1"),
     "config.sample.draft_tree='2,1' branches"),
    (("--config.model.medusa_heads=1", "--config.sample.speculative=True",
      "--config.sample.draft_tree=200"), "config.sample.draft_tree='200': a width of 200"),
    (("--config.sample.acceptance=lenient",), "config.sample.acceptance='lenient'"),
    (("--config.model.medusa_heads=1", "--config.sample.acceptance=typical"),
     "config.sample.speculative=True"),
    (("--config.model.medusa_heads=2", "--config.sample.speculative=True",
      "--config.sample.draft_tree=1000,1000,1000"), "config.sample.draft_tree: the draft tree"),
    (("--config.model.medusa_heads=2", "--config.sample.speculative=True",
      "--config.model.attention_impl=cudnn", "--config.sample.draft_tree=2"),
     "config.sample.draft_tree='2' branches"),
    (("--config.model.medusa_heads=1", "--config.sample.speculative=True",
      "--config.sample.acceptance=typical", "--config.sample.temperature=0"),
     "config.sample.temperature"),
    (("--config.model.medusa_heads=1", "--config.sample.speculative=True",
      "--config.sample.acceptance=typical", "--config.sample.typical_delta=-1"),
     "config.sample.typical_delta"),
])
def test_bad_head_configs_name_the_key(tiny_lm_config, overrides, key):
  with pytest.raises(ConfigError) as e:
    config = tiny_lm_config(*overrides)
    lm_task.build(config).check_before_training()
  assert key in str(e.value) and "\n" not in str(e.value)


def test_cli_trains_heads_and_samples_speculatively(tiny_cli_overrides, tmp_path, capsys):
  workdir = tmp_path / "run"
  common = tiny_cli_overrides + ["--config.model.mtp_heads=2", "--config.sample.speculative=True"]
  assert cli.main(["train", "lm_char", "--workdir", str(workdir), "--no-progress"] + common) == 0
  captured = capsys.readouterr()
  assert "sample" in captured.out and "(one candidate per head): 20 tokens" in captured.err
  texts = []
  for flags in (["--config.sample.speculative=False"], ["--speculative"]):
    assert cli.main(["sample", str(workdir), "--prompt", "cat ", "--num-tokens", "12",
                     "--temperature", "0", *flags]) == 0
    captured = capsys.readouterr()
    assert ("speculative decoding (one candidate per head): 12 tokens" in captured.err) == (
        flags == ["--speculative"])
    texts.append(captured.out)
  assert texts[0] == texts[1] and texts[0].startswith("cat ")
  # A tree of drafts (--draft-tree implies --speculative): greedy decoding's text again.
  assert cli.main(["sample", str(workdir), "--prompt", "cat ", "--num-tokens", "12",
                   "--temperature", "0", "--draft-tree", "3,2"]) == 0
  captured = capsys.readouterr()
  assert "speculative decoding (a tree of 9 candidates): 12 tokens" in captured.err
  assert captured.out == texts[0]
  assert cli.main(["sample", str(workdir), "--prompt", "cat ", "--num-tokens", "12",
                   "--temperature", "0", "--draft-tree", "paths: 0 1 0,0"]) == 0
  captured = capsys.readouterr()
  assert "(a tree of 3 candidates)" in captured.err and captured.out == texts[0]
  assert cli.main(["sample", str(workdir), "--num-tokens", "12", "--draft-tree", "3,2",
                   "--config.sample.acceptance=typical"]) == 0
  assert "(a tree of 9 candidates, typical acceptance): 12 tokens" in capsys.readouterr().err
  assert cli.main(["sample", str(workdir), "--draft-tree", "3,2,2"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "config.sample.draft_tree='3,2,2' is 3 deep" in err[0], err


def test_medusa1_heads_leave_the_next_token_model_exactly_as_without_them(tiny_lm_config, tmp_path):
  """heads_stop_gradient: same init, no gradient from the heads into the trunk, and the heads' gradients
  clipped apart (the tiny run clips: lr 3e-2 on a 2-layer model), so the trained next-token model
  equals the one trained without heads, step for step."""
  from jaxlab.train import trainer
  from jaxlab.train.metrics import read_metrics
  common = ("--config.optim.lr=3e-2", "--config.optim.grad_clip=0.05",
            "--config.train.checkpoint_every=6")
  runs = {}
  for name, extra in (("plain", ()), ("medusa1", ("--config.model.medusa_heads=2",
                                                   "--config.model.heads_stop_gradient=True")),
                      ("coupled", ("--config.model.medusa_heads=2",
                                   "--config.model.heads_stop_gradient=True"))):
    config = tiny_lm_config(*common, *extra)
    task = lm_task.build(config)
    if name == "coupled":  # one global norm over trunk and heads, as before the clip groups
      task.clip_groups = lambda: ()
    trainer.train(config, tmp_path / name, task=task, progress=False)
    run = trainer.setup(config, tmp_path / name, task=task)
    _, state, _ = run.checkpointer.restore_latest(run.abstract_state)
    run.checkpointer.close()
    runs[name] = ([r["val_loss"] for r in read_metrics(tmp_path / name) if "val_loss" in r],
                  state["params"])
  plain, medusa1, coupled = runs["plain"], runs["medusa1"], runs["coupled"]

  def max_param_difference(run):
    return max(float(jnp.max(jnp.abs(a - b))) for name in plain[1]
               for a, b in zip(jax.tree.leaves(run[1][name]), jax.tree.leaves(plain[1][name])))

  # Bit-equal under XLA CPU's fusion emitters; under the elemental ones (tests/conftest.py) the two
  # programs round differently (the heads' ops fuse with the trunk's) and Adam's 1/sqrt(v) magnifies
  # last-bit differences of near-zero gradients: parameters 1.1e-5 apart at most, against 3.2e-2 for
  # the coupled run; val losses 4.3e-6 apart on an AVX-512 machine (2026-12-04), against 8e-4.
  np.testing.assert_allclose(medusa1[0], plain[0], rtol=2e-5)
  assert max_param_difference(medusa1) < 1e-4
  assert max(abs(a - b) for a, b in zip(coupled[0], plain[0])) > 1e-4
  assert max_param_difference(coupled) > 1e-2


def test_cli_speculative_on_a_task_without_it_is_one_line(tmp_path, capsys):
  workdir = tmp_path / "made"
  (workdir / "checkpoints").mkdir(parents=True)
  config = load_config("made", ["--config.mesh.data=1"], check_devices=False)
  (workdir / "config.json").write_text(config.to_json_best_effort())
  for flags in (["--speculative"], ["--draft-tree", "2,2"]):
    assert cli.main(["sample", str(workdir), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"error: {flags[0]}: " in err[0] and "'density'" in err[0], err
