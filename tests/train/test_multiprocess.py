"""Multi-process runs through jax.distributed: 2 processes x 2 CPU devices (the `jaxlab` command, a
coordinator on localhost) train the same numbers as this process on a 4-device mesh, step for step;
they resume from a checkpoint saved by both processes, fall back together past one whose checksums do
not match, stop together on one they cannot read, and evaluate together."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from jaxlab.configs import flatten, load_config
from jaxlab.train import trainer
from jaxlab.train.metrics import read_metrics

PROCESSES = 2
DEVICES_PER_PROCESS = 2


def _free_port() -> int:
  """A free port below Linux's ephemeral range (32768-60999): a port the OS hands out (bind to 0)
  can be taken again, between this check and the coordinator's bind, by any outgoing connection,
  e.g. a concurrent multi-process test's; one chosen below that range only by another explicit bind."""
  rng = np.random.default_rng()
  for _ in range(100):
    port = int(rng.integers(20000, 32768))
    with socket.socket() as s:
      try:
        s.bind(("localhost", port))
      except OSError:
        continue
      return port
  raise RuntimeError("no free port in 20000-32767")


_PORT_TAKEN = "cannot be used on this host"  # process 0's error for a coordinator port in use
GRACE_S = 60  # how long the other processes may run on after one has failed


def _run_processes(args: list[str], timeout: int = 420, *, expect_rc: int = 0,
                   extra: tuple = (), devices: tuple = (DEVICES_PER_PROCESS,) * PROCESSES,
                   cwds: tuple = (None,) * PROCESSES, entry: tuple = ()) -> list[str]:
  """`jaxlab ARGS` in PROCESSES processes of `devices` CPU devices each (run in `cwds`; `entry`: a
  process's python -c program in place of `-m jaxlab.cli`); their stdouts (with `expect_rc` != 0:
  their stderrs)."""
  def env(count):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count="
                        f"{count}")  # the last count given wins
    env["JAX_PLATFORMS"] = "cpu"
    return env

  extra = list(extra) + [[]] * (PROCESSES - len(extra))  # per-process extra arguments
  entry = list(entry) + [None] * (PROCESSES - len(entry))

  def run_once():
    """(rc, stdout, stderr) of each process. Output goes to files, not pipes: a process blocked on
    a full pipe while its peer waits for it at a collective would hang both."""
    coordinator = f"localhost:{_free_port()}"
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(PROCESSES)]
    procs = [subprocess.Popen(
        [sys.executable, *(["-c", entry[i]] if entry[i] else ["-m", "jaxlab.cli"]), *args,
         *extra[i], "--coordinator", coordinator, "--num-processes", str(PROCESSES),
         "--process-id", str(i)],
        env=env(devices[i]), cwd=cwds[i], stdout=files[i][0], stderr=files[i][1], text=True)
        for i in range(PROCESSES)]
    try:
      # Until all have ended, `timeout` has passed, or GRACE_S after the first failure (the others
      # stop by themselves within seconds, or wait for a coordinator or peer that is gone): killed
      # below, their rc None, so the caller's assertion shows every process's output.
      deadline, first_failure = time.monotonic() + timeout, None
      while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if first_failure is None and any(p.returncode not in (None, 0) for p in procs):
          first_failure = now
          files[0][1].seek(0)
          if procs[0].returncode and _PORT_TAKEN in files[0][1].read():
            break  # the others would wait for a coordinator that never started
        if now > deadline or (first_failure is not None and now - first_failure > GRACE_S):
          break
        time.sleep(0.1)
      results = []
      for p, (out, err) in zip(procs, files):
        out.seek(0), err.seek(0)
        results.append((p.poll(), out.read(), err.read()))
      return results
    finally:
      for p in procs:
        p.kill()
      for out, err in files:
        out.close(), err.close()

  for attempt in range(3):  # the free port was taken before process 0 bound it: another port
    results = run_once()
    if _PORT_TAKEN not in results[0][2]:
      break
  outputs = []
  for i, (rc, out, err) in enumerate(results):
    assert rc == expect_rc, f"process {i}: rc {rc}:\n{out}\n{err[-3000:]}"
    outputs.append(out if expect_rc == 0 else err)
  return outputs


def _overrides(config) -> list[str]:
  """The config as --config.K=V overrides (the same run, on the command line)."""
  flat = flatten(json.loads(config.to_json_best_effort()))
  return [f"--config.{k}={v}" for k, v in flat.items() if not isinstance(v, (list, dict))]


def _by_step(workdir, key) -> dict:
  out = {}
  for m in read_metrics(workdir):  # a resumed run appends; the last record of a step wins
    if key in m:
      out[m["step"]] = m[key]
  return out


def test_two_processes_train_resume_and_skip_a_corrupt_checkpoint(tiny_lm_config, tmp_path):
  # data 2 x fsdp 2: parameters and optimizer state are sharded across the two processes.
  config = tiny_lm_config("--config.train.log_every=1", "--config.model.dropout=0.1",
                          "--config.sample.prompt=the ",
                          "--config.mesh.data=2", "--config.mesh.fsdp=2")
  single = trainer.train(config, tmp_path / "single", progress=False)  # 4 of this process's devices
  workdir = tmp_path / "multi"
  args = ["train", "lm_char", "--workdir", str(workdir), "--no-progress", *_overrides(config)]
  first, second = _run_processes(args)
  assert "val_loss" in first and "sample" in first  # process 0 reports and samples ...
  assert "jaxlab" not in second and "val_loss" not in second  # ... and only process 0 prints
  reference = _by_step(tmp_path / "single", "train_loss")
  assert sorted(reference) == [1, 2, 3, 4, 5, 6]
  # One record per step: process 0 alone writes metrics.jsonl (_by_step hides duplicates).
  steps = [m["step"] for m in read_metrics(workdir) if "train_loss" in m]
  assert steps == [1, 2, 3, 4, 5, 6], steps
  np.testing.assert_allclose([_by_step(workdir, "train_loss")[s] for s in reference],
                             [reference[s] for s in reference], rtol=2e-5)
  np.testing.assert_allclose(_by_step(workdir, "val_loss")[6], single["val_loss"], rtol=2e-5)

  # The newest checkpoint's arrays no longer match their saved checksums (steps 3 and 6 are kept):
  # every process sees it, they fall back together, process 0 moves it aside, and the run resumes
  # from step 3 to the same numbers.
  data_file = workdir / "checkpoints" / "6" / "data" / "metadata"
  saved = json.loads(data_file.read_text())
  saved["_jaxlab_state_checksums"][1] += 1
  data_file.write_text(json.dumps(saved))
  first, _ = _run_processes(args)
  assert "resumed from step 3" in first and "checksum" in first
  assert len(list((workdir / "corrupt_checkpoints").iterdir())) == 1
  resumed = _by_step(workdir, "train_loss")
  np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [reference[s] for s in (4, 5, 6)],
                             rtol=2e-5)
  # `jaxlab eval` across both processes: process 0 prints the same validation loss.
  first, second = _run_processes(["eval", str(workdir)])
  result = json.loads([line for line in first.splitlines() if line.startswith("{")][-1])
  assert result["step"] == 6 and "val_loss" not in second
  np.testing.assert_allclose(result["val_loss"], single["val_loss"], rtol=2e-5)
  # Files that a process cannot read: every process stops with one line naming the checkpoint (a
  # fallback taken by some processes only would hang the others); nothing is moved.
  for f in (workdir / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  errors = _run_processes(args, expect_rc=1)
  assert all("checkpoints/6 could not be read in process" in e for e in errors)
  assert (workdir / "checkpoints" / "6").is_dir()


def test_two_processes_contrastive_global_batch(tfds_dir, tmp_path):
  """Each process reads its own rows: the sharded SigLIP loss over both processes' devices sees the
  same global batch as one process does (duplicated rows would change every loss)."""
  tiny = ["--config.model.image_width=16", "--config.model.image_layers=1",
          "--config.model.image_heads=2", "--config.model.text_width=16",
          "--config.model.text_layers=1", "--config.model.text_heads=2", "--config.model.embed_dim=8",
          "--config.data.text_len=24", "--config.data.batch_size=16", "--config.model.patch=4",
          f"--config.data.data_dir={tfds_dir}", "--config.mesh.data=4", "--config.mesh.fsdp=1",
          "--config.train.steps=3", "--config.train.log_every=1", "--config.train.eval_every=3",
          "--config.train.eval_batches=2", "--config.train.checkpoint_every=3",
          "--config.train.tensorboard=False", "--config.optim.warmup_steps=1",
          "--config.eval.batch_size=512"]
  config = load_config("contrastive_digits", tiny)
  single = trainer.train(config, tmp_path / "single", progress=False)
  _run_processes(["train", "contrastive_digits", "--workdir", str(tmp_path / "multi"),
                  "--no-progress", *tiny])
  reference = _by_step(tmp_path / "single", "train_loss")
  assert sorted(reference) == [1, 2, 3]
  multi = _by_step(tmp_path / "multi", "train_loss")
  np.testing.assert_allclose([multi[s] for s in reference], [reference[s] for s in reference],
                             rtol=2e-5)
  np.testing.assert_allclose(_by_step(tmp_path / "multi", "val_loss")[3], single["val_loss"],
                             rtol=2e-5)


def test_two_processes_density_run_with_best_params_and_test_nll(tmp_path, capsys):
  """A keep_best run that evaluates where it checkpoints: the two background saves (checkpoints/,
  best/) met at one orbax barrier name across processes, and the run stopped ("...set_value_start
  is already ongoing") or hung, 3 times out of 3 at 40 steps. Also: the final test NLL (computed on
  process 0 alone) covers the whole test split, as in one process (it covered process 0's rows)."""
  from jaxlab import cli
  flags = ["--config.model.hidden=(32,)", "--config.data.batch_size=32", "--config.mesh.data=2",
           "--config.mesh.fsdp=2", "--config.train.steps=8", "--config.train.log_every=1",
           "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
           "--config.train.tensorboard=False", "--config.optim.warmup_steps=1",
           "--config.eval.batch_size=500", "--no-progress"]
  assert cli.main(["train", "made", "--workdir", str(tmp_path / "single"), *flags]) == 0
  single_out = capsys.readouterr().out
  first, _ = _run_processes(["train", "made", "--workdir", str(tmp_path / "multi"), *flags],
                            timeout=180)
  reference = _by_step(tmp_path / "single", "train_loss")
  multi = _by_step(tmp_path / "multi", "train_loss")
  np.testing.assert_allclose([multi[s] for s in reference], [reference[s] for s in reference],
                             rtol=2e-5)
  nll = lambda out: float(re.search(r"test NLL ([0-9.]+) nats", out).group(1))
  assert nll(first) == pytest.approx(nll(single_out), abs=2e-3)
  assert sorted(p.name for p in (tmp_path / "multi" / "best").iterdir()) == \
      sorted(p.name for p in (tmp_path / "single" / "best").iterdir())


@pytest.mark.parametrize("args, message", [
    (["--coordinator", "localhost:1"], "without --num-processes, --process-id"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"], "--process-id=2"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--distributed", "--process-id", "0"], "drop --process-id"),
])
def test_bad_process_options_are_named(args, message, capsys):
  from jaxlab import cli
  assert cli.main(["train", "lm_char", "--workdir", "unused", *args]) == 1
  assert message in capsys.readouterr().err


def test_multi_process_run_needs_a_workdir(capsys):
  from jaxlab import cli
  assert cli.main(["train", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "0"]) == 1
  assert "needs --workdir" in capsys.readouterr().err


def test_processes_given_different_configs_stop_with_one_line(tiny_lm_config, tmp_path):
  """A typo in one host's command (here its learning rate) must not train a silently mixed run."""
  config = tiny_lm_config("--config.mesh.data=4", "--config.sample.prompt=the ")
  args = ["train", "lm_char", "--workdir", str(tmp_path / "run"), "--no-progress",
          *_overrides(config)]
  errors = _run_processes(args, expect_rc=1, extra=([], ["--config.optim.lr=0.5"]))
  assert all("given different configs or workdirs" in e for e in errors)
  assert not (tmp_path / "run").exists()


# Process 1 reads other data under the same config (as hosts with their own copies of a file, or other
# Python installs for the stdlib corpus, would): simulated by changing its task's data digest.
OTHER_DATA = """import sys
from jaxlab.train import lm_task
digest = lm_task.LMTask.data_fingerprint
lm_task.LMTask.data_fingerprint = lambda self: digest(self) + "-other"
from jaxlab import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_processes_that_read_different_data_stop_with_one_line(tiny_lm_config, tmp_path):
  config = tiny_lm_config("--config.mesh.data=4", "--config.sample.prompt=the ")
  args = ["train", "lm_char", "--workdir", str(tmp_path / "run"), "--no-progress",
          *_overrides(config)]
  errors = _run_processes(args, expect_rc=1, entry=(None, OTHER_DATA))
  assert all("given different data" in e for e in errors), errors
  assert not (tmp_path / "run").exists()


def test_a_relative_data_path_means_each_process_s_own_file_and_is_refused(tiny_lm_config,
                                                                           tiny_corpus, tmp_path):
  """The same relative config.data.path in two working directories names two files: the saved
  (absolute) configs differ, so the processes stop before reading anything twice."""
  cwds = [tmp_path / "host0", tmp_path / "host1"]
  for cwd in cwds:
    cwd.mkdir()
    shutil.copy(tiny_corpus, cwd / "corpus.txt")
  overrides = [o for o in _overrides(tiny_lm_config("--config.mesh.data=4",
                                                    "--config.sample.prompt=the "))
               if not o.startswith(("--config.data.path=", "--config.data.data_dir="))]
  args = ["train", "lm_char", "--workdir", str(tmp_path / "run"), "--no-progress", *overrides,
          "--config.data.path=corpus.txt", "--config.data.data_dir=tfds"]
  errors = _run_processes(args, expect_rc=1, cwds=tuple(cwds))
  assert all("given different configs or workdirs" in e for e in errors), errors
  assert not any((cwd / "tfds").exists() for cwd in cwds)  # refused before any data was read


@pytest.mark.parametrize("devices", [(1, 3), (1, 2)])
def test_processes_with_different_device_counts_stop_with_one_line(devices, tiny_lm_config,
                                                                    tmp_path):
  """1 + 3 CPU devices: the mesh would fit the 4, but the processes cannot hold equal shares of the
  batch (it failed inside JAX at the first batch); 1 + 2: named before the batch (8) is found not
  to split over 3."""
  config = tiny_lm_config("--config.mesh.data=-1", "--config.sample.prompt=the ")
  args = ["train", "lm_char", "--workdir", str(tmp_path / "run"), "--no-progress",
          *_overrides(config)]
  errors = _run_processes(args, expect_rc=2, devices=devices)  # a config error
  assert all("config.mesh.cpu_devices: the processes have different numbers of devices "
             f"{list(devices)}" in e for e in errors), errors


# Process 0 cannot build the task (its data, say); process 1 could.
BROKEN_ON_PROCESS_0 = """import sys
from jaxlab.train import distributed, tasks
build = tasks.build_task
def build_or_fail(config):
  if distributed.is_primary():
    raise ValueError("no data on this host (a test)")
  return build(config)
tasks.build_task = build_or_fail
from jaxlab import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_task_that_process_0_cannot_build_stops_every_process(tiny_lm_config, tmp_path):
  """all_agree is every process's verdict: process 1 hears that process 0 failed and stops with one
  line instead of training on alone (all_agree taking any process's True passed every other test)."""
  config = tiny_lm_config("--config.mesh.data=4", "--config.sample.prompt=the ")
  args = ["train", "lm_char", "--workdir", str(tmp_path / "run"), "--no-progress",
          *_overrides(config)]
  errors = _run_processes(args, timeout=120, expect_rc=1, entry=(BROKEN_ON_PROCESS_0, None))
  assert "no data on this host (a test)" in errors[0], errors[0][-2000:]
  assert "process 0 could not load the data" in errors[1], errors[1][-2000:]


# Process 1 reaches the device-count check 3 s after process 0 (a slower host).
SLOW_PEER = """import sys, time
from jaxlab.train import distributed
counts = distributed.local_device_counts
def slow_counts():
  time.sleep(3)
  return counts()
distributed.local_device_counts = slow_counts
from jaxlab import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_slower_process_still_stops_with_its_own_line(tiny_lm_config, tmp_path):
  """Process 0 hosts the coordination service: had it left at once after finding the error, the
  slower process would crash (SIGABRT) on the lost coordinator instead of naming the error."""
  config = tiny_lm_config("--config.mesh.data=-1", "--config.sample.prompt=the ")
  args = ["train", "lm_char", "--workdir", str(tmp_path / "run"), "--no-progress",
          *_overrides(config)]
  errors = _run_processes(args, expect_rc=2, devices=(1, 2), entry=(None, SLOW_PEER))
  assert all("the processes have different numbers of devices [1, 2]" in e for e in errors), errors


# Process 1 writes a file 3 s late, then meets process 0 at a barrier; process 0 looks for the file
# after the barrier. Each process sees its own arguments, then --coordinator ... --process-id I.
AT_A_BARRIER = """import pathlib, sys, time
args = sys.argv[1:]
option = lambda name: args[args.index(name) + 1]
from jaxlab.train import distributed
distributed.initialize(coordinator=option("--coordinator"), process_id=int(option("--process-id")),
                       num_processes=int(option("--num-processes")))
flag = pathlib.Path(args[0])
if not distributed.is_primary():
  time.sleep(3)
  flag.write_text("written before the barrier")
distributed.barrier("jaxlab_test_barrier")
print(f"after the barrier the flag {'exists' if flag.exists() else 'is missing'}")
"""


def test_barrier_waits_for_every_process(tmp_path):
  """distributed.barrier is what makes process 0's moves of bad checkpoints visible to the others
  before they reload; a barrier that returns at once (a no-op) passed every other test."""
  outputs = _run_processes([str(tmp_path / "flag")], entry=(AT_A_BARRIER, AT_A_BARRIER))
  assert all("after the barrier the flag exists" in out for out in outputs), outputs
