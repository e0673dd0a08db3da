"""Dynamic loss scaling for float16 (jaxlab/train/loss_scale.py): without it the float16 backward pass
of a small loss flushes every gradient to zero, with it the gradients are float32's (bfloat16 needs
none); a step that overflows is skipped and the scale halves, and finite steps make it grow again."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.configs import load_config
from jaxlab.train import loss_scale, trainer


class _ScaledDown:
  """A task whose loss is the LM loss times `factor` (gradients that small underflow in float16)."""

  def __init__(self, task, factor):
    self.task, self.factor = task, factor

  def loss(self, params, batch, rng, *, train):
    loss, (total, count) = self.task.loss(params, batch, rng, train=train)
    return loss * self.factor, (total * self.factor, count)  # accumulation differentiates the total


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(tree)])


def test_float16_gradients_vanish_without_loss_scaling_and_match_float32_with_it(tiny_lm_config,
                                                                                 tmp_path):
  grads, runs = {}, {}
  for dtype in ("float32", "float16", "bfloat16"):
    run = trainer.setup(tiny_lm_config(f"--config.model.dtype={dtype}", "--config.model.num_layers=1"),
                        tmp_path / dtype)
    run.checkpointer.close()
    params = trainer.init_state(run)["params"]  # float32 parameters, the same for every dtype
    batch = next(run.task.train_iterator())
    runs[dtype] = run
    task = _ScaledDown(run.task, 2.0**-20)  # d loss / d logit ~ 2**-28, below float16's 2**-24
    scale = loss_scale.scaler({"scale": jnp.float32(2.0**15), "counter": jnp.int32(0)}, 2000)
    # (scaled, microbatches): also through gradient accumulation's path
    for scaled, micro in ((False, 1), (True, 1), (True, 2)) if dtype == "float16" else ((False, 1),):
      _, g = jax.jit(lambda p, s: trainer.loss_and_grads(task, p, batch, jax.random.key(0), micro,
                                                         scale=s))(params, scale if scaled else None)
      grads[dtype, scaled, micro] = _flat(g)
  reference = grads["float32", False, 1]
  assert np.all(np.isfinite(reference)) and np.abs(reference).max() > 0
  error = lambda key: np.linalg.norm(grads[key] - reference) / np.linalg.norm(reference)
  assert np.all(grads["float16", False, 1] == 0)  # everything flushed to zero
  assert error(("float16", True, 1)) < 2e-2 and error(("float16", True, 2)) < 2e-2
  # The plain loss at the same S: finite with and without slices (S scales each slice's mean).
  for micro in (1, 2):
    _, g = jax.jit(lambda p, s: trainer.loss_and_grads(runs["float16"].task, p, batch, jax.random.key(0),
                                                       micro, scale=s))(params, scale)
    assert np.all(np.isfinite(_flat(g))), micro
  # bfloat16 has float32's exponent range: the same tiny gradients survive unscaled (to its precision).
  assert error(("bfloat16", False, 1)) < 5e-2


def test_an_overflowing_step_is_skipped_then_the_scale_grows_again(tiny_lm_config, tmp_path):
  # 1e30 makes the float16 backward overflow; finite steps double the scale every 2 steps.
  config = tiny_lm_config("--config.model.dtype=float16", "--config.optim.loss_scale_init=1e30",
                          "--config.optim.loss_scale_period=2")
  run = trainer.setup(config, tmp_path)
  run.checkpointer.close()
  step = trainer.make_train_step(run)
  batch = run.place_batch(next(run.task.train_iterator()))
  state = trainer.init_state(run)
  before = jax.device_get({"params": state["params"], "opt_state": state["opt_state"]})
  with run.mesh, run.rules():
    state, metrics = step(state, batch)
  assert bool(metrics["skipped"]) and float(metrics["loss_scale"]) == np.float32(1e30)
  assert np.isfinite(float(metrics["loss"]))  # the forward pass is float32 at the loss
  after = jax.device_get({"params": state["params"], "opt_state": state["opt_state"]})
  jax.tree.map(np.testing.assert_array_equal, after, before)  # the update was not applied
  assert int(state["step"]) == 1
  assert jax.device_get(state["loss_scale"]) == {"scale": np.float32(1e30) / 2, "counter": 0,
                                                 "skipped": 1}

  # A representable scale: two finite steps apply their updates and double it.
  state["loss_scale"] = {**state["loss_scale"], "scale": jnp.float32(1024.0)}
  with run.mesh, run.rules():
    for _ in range(2):
      state, metrics = step(state, batch)
      assert not bool(metrics["skipped"])
  assert jax.device_get(state["loss_scale"]) == {"scale": 2048.0, "counter": 0, "skipped": 1}
  assert np.abs(_flat(jax.device_get(state["params"])) - _flat(before["params"])).max() > 0


def test_a_run_whose_every_step_was_skipped_says_so(tiny_lm_config, tmp_path, capsys):
  """Its parameters are the initial ones: it ended with exit 0 and the untrained model's numbers,
  without a word."""
  config = tiny_lm_config("--config.model.dtype=float16", "--config.optim.loss_scale_init=1e30",
                          "--config.train.steps=3", "--config.train.eval_every=3",
                          "--config.sample.num_tokens=0")
  result = trainer.train(config, tmp_path, progress=False)
  assert int(result["state"]["loss_scale"]["skipped"]) == 3
  assert "loss scaling skipped all 3 steps" in capsys.readouterr().err
  trainer.train(tiny_lm_config("--config.model.dtype=float16", "--config.train.steps=3",
                               "--config.train.eval_every=3", "--config.sample.num_tokens=0"),
                tmp_path / "fine", progress=False)
  assert "skipped all" not in capsys.readouterr().err


@pytest.mark.parametrize("dtype,choice,expected", [
    ("float16", "auto", True), ("bfloat16", "auto", False), ("float32", "auto", False),
    ("float16", "none", False), ("float32", "dynamic", True),
])
def test_auto_scales_float16_only(dtype, choice, expected):
  config = load_config("lm_char", [f"--config.model.dtype={dtype}",
                                   f"--config.optim.loss_scale={choice}"])
  assert loss_scale.enabled(config) is expected
  assert not loss_scale.enabled(load_config("contrastive_digits", []))  # float32 by default


def test_a_run_that_overflows_at_scale_one_stops_with_one_line():
  assert loss_scale.check_progress(7, 2.0, skipped=True) == 0  # the scale can still fall: carry on
  assert loss_scale.check_progress(7, 1.0, skipped=False) == 0
  # One overflow at scale 1 is survivable (the scale stays 1, the next finite step is applied): it
  # stopped the run. A finite step ends the streak.
  assert loss_scale.check_progress(7, 1.0, skipped=True) == 1
  streak = 0
  for step in range(loss_scale.OVERFLOWS_AT_SCALE_ONE - 1):
    streak = loss_scale.check_progress(step, 1.0, skipped=True, streak=streak)
  assert loss_scale.check_progress(9, 1.0, skipped=False, streak=streak) == 0
  with pytest.raises(FloatingPointError, match=r"step 12: the float16 gradients \(or the loss\) "
                                               "overflowed even at loss scale 1 in 10 steps in a row"):
    loss_scale.check_progress(12, 1.0, skipped=True, streak=streak)


def test_non_finite_losses_stop_a_run_after_a_streak_or_at_its_last_step():
  check = lambda step, loss, skipped, streak, last=False: loss_scale.check_loss_overflow(
      step, loss, skipped, streak, last=last, kept="ckpt/")
  nan = float("nan")
  assert check(3, nan, True, 0) == 1  # one overflowed forward pass: skipped, the run goes on
  assert check(4, 1.5, True, 1) == 0  # a finite (skipped) step ends the streak
  assert check(4, nan, False, 1) == 0  # not skipped: the trainer's own non-finite check applies
  streak = 0
  for step in range(loss_scale.NONFINITE_LOSS_STREAK - 1):
    streak = check(step, float("inf"), True, streak)
  with pytest.raises(FloatingPointError, match=r"the loss is nan in 3 steps in a row up to step 9 "
                                               r".*last good checkpoint kept in ckpt/\)$"):
    check(9, nan, True, streak)
  with pytest.raises(FloatingPointError, match="at step 5, the last step.*train a step further"):
    check(5, nan, True, 0, last=True)
  assert check(5, 2.0, True, 0, last=True) == 0


def test_switching_loss_scaling_on_a_workdir_is_refused_and_older_workdirs_read_as_unscaled(
    tiny_lm_config, tmp_path, as_saved_before_configs_were_recorded):
  """The checkpoints of a scaled run hold the scale, an unscaled run's do not: resuming across that
  is one line naming config.optim.loss_scale. A float16 workdir saved before loss scaling existed is
  an unscaled one, for train and for eval/sample alike."""
  import json
  from jaxlab import cli
  fp16 = ("--config.model.dtype=float16", "--config.train.steps=2", "--config.optim.warmup_steps=1")
  trainer.train(tiny_lm_config(*fp16), tmp_path, progress=False)  # auto: scaled
  with pytest.raises(ValueError, match="with loss scaling .* --config.optim.loss_scale=dynamic"):
    trainer.setup(tiny_lm_config(*fp16, "--config.optim.loss_scale=none"), tmp_path)
  trainer.setup(tiny_lm_config(*fp16, "--config.optim.loss_scale=dynamic"), tmp_path).checkpointer.close()

  trainer.train(tiny_lm_config(*fp16, "--config.optim.loss_scale=none"), tmp_path / "old",
                progress=False)
  as_saved_before_configs_were_recorded(tmp_path / "old")
  saved = json.loads((tmp_path / "old" / "config.json").read_text())
  for key in ("loss_scale", "loss_scale_init", "loss_scale_period"):
    del saved["optim"][key]  # as written by a jaxlab without loss scaling
  (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="without loss scaling .* --config.optim.loss_scale=none"):
    trainer.setup(tiny_lm_config(*fp16), tmp_path / "old")
  run = trainer.setup(tiny_lm_config(*fp16, "--config.optim.loss_scale=none"), tmp_path / "old")
  assert run.checkpointer.restore_latest(run.abstract_state)[0] == 2
  run.checkpointer.close()
  config = cli._load_workdir_config(tmp_path / "old", [])  # what eval and sample read
  assert config.optim.loss_scale == "none" and not loss_scale.enabled(config)


class _NaNGradients:
  """The LM loss plus 0 * sqrt(0): the same value, NaN gradients (a backward pass that overflows
  while the forward pass does not)."""

  def __init__(self, task):
    self.task = task

  def __getattr__(self, name):
    return getattr(self.task, name)

  def loss(self, params, batch, rng, *, train):
    loss, aux = self.task.loss(params, batch, rng, train=train)
    w = jax.tree.leaves(params)[0]
    return loss + 0.0 * jnp.sqrt(jnp.sum(0.0 * w)), aux


def test_unscaled_non_finite_gradients_stop_the_run_before_they_are_checkpointed(tiny_lm_config,
                                                                                  tmp_path):
  """Without loss scaling a NaN gradient is applied; the run stops at that step, and its state is not
  saved (it was checkpointed, and only the next step's loss stopped the run)."""
  from jaxlab.train import tasks
  config = tiny_lm_config("--config.train.checkpoint_every=1", "--config.optim.loss_scale=none")
  task = _NaNGradients(tasks.build_task(config))
  with pytest.raises(FloatingPointError, match="gradient norm is nan at step 1; stopping"):
    trainer.train(config, tmp_path, task=task, progress=False)
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


class _ForwardOverflows:
  """The LM loss times inf on the batches `overflowing` (a float16 forward pass that overflows on
  those batches only): non-finite loss and gradients alike."""

  def __init__(self, task, overflowing):
    self.task, self.overflowing = task, jnp.asarray(np.stack(overflowing))

  def __getattr__(self, name):
    return getattr(self.task, name)

  def loss(self, params, batch, rng, *, train):
    loss, aux = self.task.loss(params, batch, rng, train=train)
    same = jnp.all(self.overflowing == batch["inputs"][None], axis=(1, 2))
    return loss * jnp.where(jnp.any(same) & train, jnp.inf, 1.0), aux


def _overflowing_task(config, steps):
  """The config's task, overflowing at the training steps `steps` (1-based) only."""
  from jaxlab.train import tasks
  task = tasks.build_task(config)
  batches = [b["inputs"] for b, _ in zip(task.train_iterator(), range(max(steps)))]
  return _ForwardOverflows(task, [batches[s - 1] for s in steps])


def test_a_skipped_step_whose_float16_loss_overflowed_does_not_stop_the_run(tiny_lm_config,
                                                                            tmp_path):
  """With loss scaling such a step is skipped like a gradient overflow (it stopped the run with
  FloatingPointError before): the run goes on, the logged train_loss averages the finite steps, and
  a checkpoint due at such a step is written at the next step (its state is the one whose loss
  overflowed)."""
  from jaxlab.train import metrics as metrics_lib
  config = tiny_lm_config("--config.model.dtype=float16", "--config.train.steps=6",
                          "--config.train.log_every=6", "--config.train.eval_every=6",
                          "--config.train.checkpoint_every=2", "--config.sample.num_tokens=0")
  result = trainer.train(config, tmp_path, task=_overflowing_task(config, [2, 4]), progress=False)
  assert int(result["state"]["loss_scale"]["skipped"]) == 2
  [record] = [r for r in metrics_lib.read_metrics(tmp_path) if "train_loss" in r]
  assert record["skipped_steps"] == 2 and np.isfinite(record["train_loss"])
  assert result["run"].checkpointer.all_steps() == [3, 5, 6]  # not 2 and 4
  assert np.all(np.isfinite(_flat(jax.device_get(result["state"]["params"]))))
  # Without loss scaling the same run stops at its first overflow.
  with pytest.raises(FloatingPointError, match="loss is inf at step 2"):
    unscaled = tiny_lm_config("--config.optim.loss_scale=none", "--config.train.steps=6")
    trainer.train(unscaled, tmp_path / "unscaled", task=_overflowing_task(unscaled, [2]),
                  progress=False)


@pytest.mark.parametrize("steps,message", [
    ([2, 3, 4], "the loss is inf in 3 steps in a row up to step 4"),
    ([6], "the loss is inf at step 6, the last step"),
])
def test_losses_that_keep_overflowing_stop_the_run_before_a_checkpoint(tiny_lm_config, tmp_path,
                                                                       steps, message):
  """Parameters that an update blew up overflow at every later step (loss scaling skips them all):
  the run stops after loss_scale.NONFINITE_LOSS_STREAK steps, and a checkpoint due meanwhile is not written;
  nor is a last step whose loss overflowed."""
  config = tiny_lm_config("--config.model.dtype=float16", "--config.train.steps=6",
                          "--config.train.checkpoint_every=2", "--config.train.eval_every=6",
                          "--config.sample.num_tokens=0")
  with pytest.raises(FloatingPointError, match=message):
    trainer.train(config, tmp_path, task=_overflowing_task(config, steps), progress=False)
  run = trainer.setup(config, tmp_path)
  assert run.checkpointer.all_steps() == ([] if steps[0] == 2 else [2, 4])
  run.checkpointer.close()


def test_an_update_that_blows_up_float16_parameters_stops_the_run(tiny_lm_config, tmp_path):
  """lr 1e5: the first update makes the parameters huge (finite), every later float16 forward pass
  overflows; the run stops three steps later and saves nothing (a review saw such a state
  checkpointed)."""
  config = tiny_lm_config("--config.model.dtype=float16", "--config.optim.lr=1e5",
                          "--config.optim.warmup_steps=0", "--config.optim.grad_clip=0",
                          "--config.train.steps=8", "--config.train.checkpoint_every=2",
                          "--config.train.eval_every=8", "--config.sample.num_tokens=0")
  with pytest.raises(FloatingPointError, match="in 3 steps in a row up to step 4"):
    trainer.train(config, tmp_path, progress=False)
  assert not any((tmp_path / "checkpoints").iterdir())
