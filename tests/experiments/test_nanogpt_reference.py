"""experiments/nanogpt_reference.py: runs a nanoGPT checkout's train.py unchanged, with the seed shifted
and the README's CPU command, and reads its printed evaluations and timings.

No torch and no nanoGPT here: a stand-in checkout whose train.py prints what nanoGPT prints, and a
stand-in `torch` module that records the seed it is given. The scoring program (nanoGPT's model on every
validation window) is replaced by one that reads what the stand-in train.py saved.
"""

import sys
import textwrap

import pytest

FAKE_TORCH = '''
__version__ = "0.0-fake"
seeds = []
def manual_seed(seed):
  seeds.append(seed)
'''

# Prints nanoGPT's log lines; the val loss at the end encodes the seed torch saw and the arguments.
FAKE_TRAIN = '''
import os, sys, torch
from model import MODEL_OK
exec(open("configurator.py").read())
assert os.path.exists(os.path.join("data", "shakespeare_char", "train.bin")), "prepare.py did not run"
torch.manual_seed(1337)
steps = int(next(a for a in sys.argv if a.startswith("--max_iters=")).split("=")[1])
assert "--device=cpu" in sys.argv and "--compile=False" in sys.argv and "--n_embd=128" in sys.argv
assert sys.argv[-2:] == ["--eval_iters=200", "--always_save_checkpoint=True"], sys.argv
os.makedirs("out")
open(os.path.join("out", "ckpt.pt"), "w").write(str(steps))
for it in range(steps + 1):
  if it % 250 == 0:
    print(f"step {it}: train loss 9.0000, val loss {1 + it / 10000 + torch.seeds[-1] / 1e6:.4f}")
  print(f"iter {it}: loss 2.0000, time {5000.0 if it % 250 == 0 else 40.0 + it % 3:.2f}ms, mfu 0.03%")
'''

FAKE_PREPARE = '''
import os
here = os.path.dirname(__file__)
text = open(os.path.join(here, "input.txt")).read()
open(os.path.join(here, "train.bin"), "w").write(str(len(text)))
'''


FAKE_SCORE = """
import json
import sys, torch
assert (__import__("pathlib").Path(sys.argv[1]) / "torch_reference_gpt.py").is_file(), sys.argv
print(json.dumps({"step": int(open("out/ckpt.pt").read()), "windows": 7, "loss": 1.5,
                  "torch": torch.__version__}))
"""


@pytest.fixture
def fake_nanogpt(tmp_path, monkeypatch):
  checkout = tmp_path / "nanoGPT"
  files = {"train.py": FAKE_TRAIN, "model.py": "MODEL_OK = True\n", "configurator.py": "pass\n",
           "config/train_shakespeare_char.py": "eval_iters = 200\n",
           "data/shakespeare_char/prepare.py": FAKE_PREPARE}
  for name, text in files.items():
    (checkout / name).parent.mkdir(parents=True, exist_ok=True)
    (checkout / name).write_text(textwrap.dedent(text))
  fake_torch = tmp_path / "site" / "torch"
  fake_torch.mkdir(parents=True)
  (fake_torch / "__init__.py").write_text(FAKE_TORCH)
  monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
  data = tmp_path / "input.txt"
  data.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
  return checkout, data


def test_runs_train_py_unchanged_with_the_seed_shifted(experiment, fake_nanogpt):
  script = experiment("nanogpt_reference")
  script._SCORE = FAKE_SCORE
  checkout, data = fake_nanogpt
  for seed in (0, 2):
    run = script.run_nanogpt(checkout, data, seed, steps=500, python=sys.executable)
    assert run["torch_seed"] == 1337 + seed and run["torch"] == "0.0-fake"
    assert run["val_loss"] == pytest.approx(1 + 500 / 10000 + (1337 + seed) / 1e6, abs=1e-4)
    assert run["ms_per_step"] == 41.0  # iterations 0, 250 (evaluations) and 500 (the end) excluded
    assert list(run["val_curve"]) == [250, 500]
    assert run["val_loss_all_windows"] == 1.5 and run["val_windows"] == 7
  assert not (checkout / "data" / "shakespeare_char" / "train.bin").exists()  # the checkout is untouched


def test_parse_log_reads_the_last_evaluation_and_skips_evaluating_iterations(experiment):
  script = experiment("nanogpt_reference")
  log = "\n".join(["step 0: train loss 4.1, val loss 4.2", "iter 0: loss 4.1, time 7000.00ms, mfu -100.00%",
                   "iter 1: loss 3.0, time 30.00ms, mfu 0.01%", "iter 2: loss 3.0, time 50.00ms, mfu 0.01%",
                   "step 3: train loss 2.5, val loss 2.6", "iter 3: loss 2.0, time 900.00ms, mfu 0.01%"])
  parsed = script.parse_log(log, steps=3, eval_interval=3)
  assert parsed["val_loss"] == 2.6 and parsed["ms_per_step"] == 40.0
  with pytest.raises(ValueError, match="no evaluation at step 4"):
    script.parse_log(log, steps=4, eval_interval=3)


def test_a_directory_that_is_not_a_checkout_is_named(experiment, tmp_path):
  script = experiment("nanogpt_reference")
  with pytest.raises(FileNotFoundError, match=r"--nanogpt .* is not a nanoGPT checkout: missing train.py"):
    script.check_checkout(tmp_path)
  with pytest.raises(FileNotFoundError, match="--data"):
    for name in script.NANOGPT_FILES:
      (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
      (tmp_path / name).write_text("")
    script.run_nanogpt(tmp_path, tmp_path / "missing.txt", 0, 10)


def test_a_run_of_steps_not_a_multiple_of_250_evaluates_and_saves_at_its_last_step(experiment):
  """nanoGPT evaluates (and saves) every 250 iterations: a 120-step run had no checkpoint at step
  120 and failed; its command now sets --eval_interval=120. 2000 steps keep the published command."""
  script = experiment("nanogpt_reference")
  assert "--eval_interval=120" in script.nanogpt_command(120)
  assert not any(a.startswith("--eval_interval") for a in script.nanogpt_command(2000))
  assert script.eval_interval(120) == 120 and script.eval_interval(500) == 250
