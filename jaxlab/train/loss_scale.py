"""Dynamic loss scaling for float16 training (Micikevicius et al. 2018, "Mixed Precision Training",
sec. 3.2), with jmp's `DynamicLossScale`.

In float16 the backward pass loses every value below 2**-24 (6e-8): small gradients flush to zero.
The train step therefore differentiates S * loss and divides the gradients by S. A step whose
gradients are not finite (the scaled backward overflowed float16's 65504) is skipped: parameters and
optimizer state stay as they were, and S halves (never below 1). After `period` finite steps in a row
S doubles. bfloat16 has float32's exponent range and needs none of this.

With gradient accumulation (`train.microbatches` > 1) each slice differentiates S times its own mean
loss, and its gradient is weighted back by its count, so S means the same as without slices.

The scale is part of the train state, and so of every checkpoint: {"scale": f32[], "counter": i32[]
(finite steps since S last changed), "skipped": i32[] (steps skipped so far)}. The optimizer's own
step count (and with it the learning-rate schedule) advances only on applied steps.

`config.optim.loss_scale`: "auto" (dynamic when `config.model.dtype` is "float16"), "dynamic" or
"none"; `config.optim.loss_scale_init`: the first S (2**15, as jmp suggests);
`config.optim.loss_scale_period`: the period (2000, as in the paper's recipe and jmp).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import jmp

CHOICES = ("auto", "dynamic", "none")
INITIAL_SCALE = 2.0**15
DEFAULT_PERIOD = 2000


KEYS = ("optim.loss_scale", "optim.loss_scale_init", "optim.loss_scale_period")


def enabled(config) -> bool:
  """Whether the train step scales the loss (see the module docstring). `config`: a ConfigDict or the
  dict of a saved config.json; one written before loss scaling existed (no optim.loss_scale) had none,
  and so has one without an optim section."""
  choice = config.get("optim", {}).get("loss_scale", "none")
  if choice == "auto":
    model = config.get("model", None)
    return model is not None and model.get("dtype", "float32") == "float16"
  return choice == "dynamic"


def period(config) -> int:
  return config.optim.get("loss_scale_period", DEFAULT_PERIOD)


def init_state(config) -> dict:
  """The loss-scale part of a fresh train state."""
  initial = config.optim.get("loss_scale_init", INITIAL_SCALE)
  return {"scale": jnp.asarray(initial, jnp.float32), "counter": jnp.zeros((), jnp.int32),
          "skipped": jnp.zeros((), jnp.int32)}


def scaler(scale_state: dict, period_steps: int) -> jmp.DynamicLossScale:
  """The jmp loss scale held by `scale_state` (the train state's "loss_scale")."""
  return jmp.DynamicLossScale(scale_state["scale"], scale_state["counter"], period=period_steps)


def keep_finite_step(old_state: dict, new_state: dict, grads, scale: jmp.DynamicLossScale):
  """(train state, metrics) after a step whose unscaled gradients were `grads`: `new_state` if they
  are all finite, else `old_state`'s parameters and optimizer state (the step is skipped); the loss
  scale adjusted either way. Metrics: "loss_scale" (the scale this step used) and "skipped" (bool)."""
  finite = jmp.all_finite(grads)
  params, opt_state = jmp.select_tree(
      finite, (new_state["params"], new_state["opt_state"]),
      (old_state["params"], old_state["opt_state"]))
  adjusted = scale.adjust(finite)
  skipped = jnp.logical_not(finite)
  scale_state = {"scale": adjusted.loss_scale, "counter": adjusted.counter,
                 "skipped": old_state["loss_scale"]["skipped"] + skipped.astype(jnp.int32)}
  state = dict(new_state, params=params, opt_state=opt_state, loss_scale=scale_state)
  return state, {"loss_scale": scale.loss_scale, "skipped": skipped}


def no_scaling() -> jmp.NoOpLossScale:
  """The identity loss scale (float32 and bfloat16 runs): scale and unscale change nothing."""
  return jmp.NoOpLossScale()


# Consecutive steps skipped at the smallest scale after which a run stops.
OVERFLOWS_AT_SCALE_ONE = 10


def check_progress(step: int, loss_scale: float, skipped: bool, streak: int = 0) -> int:
  """The number of consecutive steps skipped at the smallest scale (1), this one included, given
  `streak` up to the previous step. At scale 1 the scale stays 1 and the next finite step is applied,
  so a passing spike costs one step; FloatingPointError once OVERFLOWS_AT_SCALE_ONE steps in a row
  overflow there (the run would otherwise stall without saying so)."""
  streak = streak + 1 if skipped and loss_scale <= 1.0 else 0
  if streak >= OVERFLOWS_AT_SCALE_ONE:
    raise FloatingPointError(
        f"step {step}: the float16 gradients (or the loss) overflowed even at loss scale 1 in "
        f"{streak} steps in a row, which were all skipped; train in bfloat16 or float32 "
        "(config.model.dtype), or lower config.optim.lr")
  return streak


# Steps in a row whose loss is not finite (each skipped by loss scaling) that stop a run: a passing
# float16 overflow costs a step or two; parameters blown up by an update overflow every step.
NONFINITE_LOSS_STREAK = 3


def check_loss_overflow(step: int, loss: float, skipped: bool, streak: int, *, last: bool,
                        kept: str) -> int:
  """The number of consecutive skipped steps with a non-finite loss, this one included, given
  `streak` up to the previous step. Such a step is a float16 forward pass that overflowed on its
  batch (passing) or parameters that an update blew up (every later step): FloatingPointError at
  NONFINITE_LOSS_STREAK in a row, or at the `last` step of the run (nothing after it to show it
  passed). kept: where the last good checkpoint is, for the message."""
  overflowed = skipped and not math.isfinite(loss)
  streak = streak + 1 if overflowed else 0
  if streak >= NONFINITE_LOSS_STREAK or (overflowed and last):
    where = (f"in {streak} steps in a row up to step {step}" if streak > 1
             else f"at step {step}, the last step")
    raise FloatingPointError(
        f"the loss is {loss} {where} (skipped by loss scaling: the parameters have diverged, or "
        f"the float16 forward pass overflows); stopping (last good checkpoint kept in {kept})"
        + ("; to get past a one-off overflow at the last step, train a step further"
           if streak == 1 else ""))
  return streak

