"""A run interrupted and resumed gives the same losses and parameters as a straight run; a corrupt newest
checkpoint is reported, kept aside, and the previous one is used."""

import json
import shutil
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.train import trainer
from jaxlab.train.metrics import read_metrics


def _train_losses(workdir):
  by_step = {}
  for m in read_metrics(workdir):  # a resumed run appends; the last record of a step wins
    if "train_loss" in m:
      by_step[m["step"]] = m["train_loss"]
  return [by_step[s] for s in sorted(by_step)]


def _by_step(workdir, key) -> dict:
  return {m["step"]: m[key] for m in read_metrics(workdir) if key in m}  # the last record wins


def _params(result):
  return jax.device_get(result["state"]["params"])


# float16 with dynamic loss scaling: a first scale of 2**24 overflows at first, and the scale then
# doubles every 2 finite steps, so the run skips steps on both sides of the restart.
FLOAT16 = ("--config.model.dtype=float16", "--config.optim.loss_scale_init=16777216",
           "--config.optim.loss_scale_period=2")


TIMING = ("step_time_ms", "tokens_per_sec")


def _records(workdir) -> list[dict]:
  """metrics.jsonl as written, in order, without the timing fields."""
  return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(workdir)]


@pytest.mark.parametrize("extra", [(), FLOAT16], ids=["float32", "float16_loss_scaling"])
def test_resume_gives_identical_losses_and_params(tiny_lm_config, tmp_path, extra):
  """Stopped right after its checkpoint at step 10, which is also an evaluation step (the evaluation
  not yet run) and in the middle of a logging interval (log_every=4), the resumed run writes the very
  records of the straight run: the step-10 evaluation, the interval 9-12's mean loss, the best
  parameters at the same step."""
  common = ["--config.train.log_every=4", "--config.train.checkpoint_every=10",
            "--config.train.eval_every=5", "--config.train.keep_best=True",
            "--config.model.dropout=0.1", *extra]  # dropout makes the RNG part of what must resume
  straight = trainer.train(tiny_lm_config(*common, "--config.train.steps=20"), tmp_path / "a",
                           progress=False)
  # First half: the same 20-step run, stopped right after its checkpoint at step 10 (as if killed);
  # then a new run with fresh objects resumes from the workdir.
  assert _run_until(tiny_lm_config(*common, "--config.train.steps=20"), tmp_path / "b",
                    stop_after=10) == 10
  assert 10 not in _by_step(tmp_path / "b", "val_loss")
  resumed = trainer.train(tiny_lm_config(*common, "--config.train.steps=20"), tmp_path / "b",
                          progress=False)
  assert _records(tmp_path / "a") == _records(tmp_path / "b")
  assert sorted(_by_step(tmp_path / "a", "val_loss")) == [5, 10, 15, 20]
  assert sorted(_by_step(tmp_path / "a", "train_loss")) == [4, 8, 12, 16, 20]
  jax.tree.map(np.testing.assert_array_equal, _params(straight), _params(resumed))
  assert (straight["best_step"], straight["best_val_loss"]) == (resumed["best_step"],
                                                               resumed["best_val_loss"])
  if extra:  # the loss scale resumed too: the same scales and skipped steps, record for record
    skipped = _by_step(tmp_path / "a", "skipped_steps")
    assert sum(skipped[s] for s in (4, 8)) and sum(skipped[s] for s in (12, 16, 20)), skipped
  # The same command once more: nothing to train; it reports the val_loss on record, not NaN.
  again = trainer.train(tiny_lm_config(*common, "--config.train.steps=20"), tmp_path / "b",
                        progress=False)
  assert again["val_loss"] == straight["val_loss"]
  assert _records(tmp_path / "a") == _records(tmp_path / "b")


def _run_until(config, workdir, stop_after):
  """Trains with fresh objects and stops (like a kill) right after the checkpoint at `stop_after`."""
  from jaxlab.train import checkpoint as ckpt

  original_save = ckpt.Checkpointer.save

  class Stop(Exception):
    pass

  def save_then_stop(self, step, state, data_state, **kw):
    original_save(self, step, state, data_state, **kw)
    if step == stop_after:
      self.wait()
      raise Stop

  ckpt.Checkpointer.save = save_then_stop
  try:
    trainer.train(config, workdir, progress=False)
  except Stop:
    return stop_after
  finally:
    ckpt.Checkpointer.save = original_save
  return None


def test_corrupt_latest_checkpoint_falls_back_to_previous(tiny_lm_config, tmp_path, capsys):
  config = tiny_lm_config("--config.train.steps=6", "--config.train.checkpoint_every=3")
  trainer.train(config, tmp_path, progress=False)
  ckpt_dir = tmp_path / "checkpoints"
  assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ["3", "6"]
  # Truncate every data file of the newest checkpoint's state.
  damaged = 0
  for f in (ckpt_dir / "6" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
      damaged += 1
  assert damaged
  # Read-only (jaxlab eval / sample, perhaps beside a training run): step 3, and nothing moves.
  from jaxlab import cli
  capsys.readouterr()
  assert cli.main(["eval", str(tmp_path)]) == 0
  out, err = capsys.readouterr()
  assert '"step": 3' in out
  reports = [line for line in (out + err).splitlines() if "could not be read" in line]
  assert len(reports) == 1 and "left in place, read step 3" in reports[0], out + err  # once
  assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ["3", "6"]
  assert not (tmp_path / "corrupt_checkpoints").exists()
  run = trainer.setup(config, tmp_path)
  step, state, data_state = run.checkpointer.restore_latest(run.abstract_state)
  run.checkpointer.close()
  assert step == 3 and int(state["step"]) == 3
  assert data_state  # the iterator position came back too
  out, err = capsys.readouterr()
  reports = [line for line in (out + err).splitlines() if "could not be read" in line]
  assert len(reports) == 1 and "moved to" in reports[0], out + err  # once (it was also a WARNING)
  kept = list((tmp_path / "corrupt_checkpoints").iterdir())
  assert len(kept) == 1 and kept[0].name.startswith("6.")
  assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ["3"]


def test_run_files_written(tiny_lm_config, tmp_path, monkeypatch):
  """config.json and metrics.jsonl; the step time leaves out the first step of the process (where
  compilation happens: here it is made 1.5 s slower) and tokens/s is the batch's tokens over it."""
  import time
  make = trainer.make_train_step
  first = []

  def slow_first_step(run):
    step = make(run)

    def timed(state, batch):
      if not first:
        first.append(1)
        time.sleep(1.5)
      return step(state, batch)
    return timed

  monkeypatch.setattr(trainer, "make_train_step", slow_first_step)
  # The batch read after the checkpoint at step 3 (nothing is read ahead before a checkpoint) is
  # made 2.5 s slow too: reading data is not the step's time.
  from jaxlab.train.lm_task import LMTask
  make_iterator = LMTask.train_iterator

  def slow_fourth_read(task):
    return _SlowRead(make_iterator(task), slow_call=4, seconds=2.5)

  monkeypatch.setattr(LMTask, "train_iterator", slow_fourth_read)
  result = trainer.train(tiny_lm_config(), tmp_path, progress=False)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["width"] == 32
  records = read_metrics(tmp_path)
  assert all("step" in r for r in records)
  assert any("val_loss" in r for r in records)
  timing = [r for r in records if "step_time_ms" in r]
  assert [r["step"] for r in timing] == [2, 4, 6]  # log_every=2: the first interval's step 2 only
  tokens = result["run"].task.tokens_per_batch
  for r in timing:
    assert 0 < r["step_time_ms"] < 1000, r
    np.testing.assert_allclose(r["tokens_per_sec"], tokens / (r["step_time_ms"] / 1000), rtol=1e-6)


class _SlowRead:
  """A train iterator whose `slow_call`-th batch takes `seconds` longer to read."""

  def __init__(self, inner, *, slow_call, seconds):
    self.inner, self.slow_call, self.seconds, self.calls = inner, slow_call, seconds, 0

  def __next__(self):
    import time
    self.calls += 1
    if self.calls == self.slow_call:
      time.sleep(self.seconds)
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def test_a_checkpoint_saves_its_data_state_as_it_was_at_the_save(tmp_path, monkeypatch):
  """orbax writes the JSON item in the background: a list the caller changes after save() (the
  trainer's open logging interval) must not leak into the checkpoint, nor break its digest."""
  import orbax.checkpoint as ocp
  from jaxlab.train import checkpoint as ckpt
  handed = []
  real = ocp.args.JsonSave

  def recording(item):
    handed.append(item)
    return real(item)

  monkeypatch.setattr(ocp.args, "JsonSave", recording)
  checkpointer = ckpt.Checkpointer(tmp_path)
  losses = [1.0, 2.0]
  checkpointer.save(1, {"w": jnp.ones(3)}, {"next_index": 5, "interval": {"losses": losses}})
  losses.append(3.0)  # the training loop goes on
  checkpointer.wait()
  assert handed[0]["interval"]["losses"] == [1.0, 2.0]
  step, _, data = checkpointer.restore_latest({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
  checkpointer.close()
  assert step == 1 and data == {"next_index": 5, "interval": {"losses": [1.0, 2.0]}}


def test_read_metrics_skips_a_line_cut_short_by_a_kill(tmp_path):
  from jaxlab.train.metrics import MetricsWriter
  writer = MetricsWriter(tmp_path, tensorboard=False)
  writer.write(1, train_loss=2.0)
  writer.write(2, train_loss=1.5)
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 3, "train_lo')  # the process died mid-write
  assert read_metrics(tmp_path) == [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5}]


def test_resuming_with_a_different_model_is_refused_and_changes_nothing(tiny_lm_config, tmp_path):
  import pytest
  trainer.train(tiny_lm_config(), tmp_path, progress=False)
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
  with pytest.raises(ValueError, match="config.model.width=32"):
    trainer.train(tiny_lm_config("--config.model.width=64"), tmp_path, progress=False)
  after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
  assert before == after
  assert not (tmp_path / "corrupt_checkpoints").exists()


def _steps(ckpt_dir):
  return sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit())


def test_bytes_damaged_in_place_are_caught_by_checksums(tiny_lm_config, tmp_path, capsys):
  """Bytes overwritten inside a checkpoint's array files (same size, still decodable or not): the
  restored state would be wrong (NaN losses on resume); its checksums catch it and step 3 is used."""
  config = tiny_lm_config("--config.train.steps=6", "--config.train.checkpoint_every=3")
  trainer.train(config, tmp_path, progress=False)
  files = [f for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*")
           if f.is_file() and "/d/" in str(f)]
  assert files
  biggest = max(files, key=lambda f: f.stat().st_size)
  data = bytearray(biggest.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(range(64))
  biggest.write_bytes(bytes(data))
  run = trainer.setup(config, tmp_path)
  step, state, _ = run.checkpointer.restore_latest(run.abstract_state)
  run.checkpointer.close()
  assert step == 3 and int(state["step"]) == 3
  assert "could not be read" in capsys.readouterr().out


def test_a_damaged_data_iterator_state_is_caught_by_its_digest(tiny_lm_config, tmp_path, capsys):
  """The data item (the iterator's position, the open logging interval) is JSON that orbax reads
  whatever it says: one digit changed in place would shift every later batch. Its digest catches it
  and step 3 is used."""
  config = tiny_lm_config("--config.train.steps=6", "--config.train.checkpoint_every=3")
  trainer.train(config, tmp_path, progress=False)
  changed = 0
  for f in (tmp_path / "checkpoints" / "6" / "data").rglob("*"):
    if f.is_file() and '"_jaxlab_data_digest"' in f.read_text():
      data = json.loads(f.read_text())
      key = next(k for k, v in data.items() if not k.startswith("_jaxlab") and isinstance(v, int))
      data[key] += 1
      f.write_text(json.dumps(data))
      changed += 1
  assert changed == 1
  run = trainer.setup(config, tmp_path)
  step, state, _ = run.checkpointer.restore_latest(run.abstract_state)
  run.checkpointer.close()
  assert step == 3 and int(state["step"]) == 3
  assert "does not match its digest" in capsys.readouterr().out


def test_checksum_mismatch_alone_rejects_a_checkpoint(tiny_lm_config, tmp_path, monkeypatch, capsys):
  """A checkpoint that orbax reads without complaint but whose arrays differ from the checksums
  saved with it is not used."""
  from jaxlab.train import checkpoint as ckpt
  config = tiny_lm_config("--config.train.steps=6", "--config.train.checkpoint_every=3")
  honest = ckpt.state_checksums
  calls = []

  def off_by_one_at_step_6(state):
    sums = honest(state)
    calls.append(1)
    return [s + 1 for s in sums] if len(calls) == 2 else sums  # the second save (step 6)

  monkeypatch.setattr(ckpt, "state_checksums", off_by_one_at_step_6)
  trainer.train(config, tmp_path, progress=False)
  monkeypatch.setattr(ckpt, "state_checksums", honest)
  run = trainer.setup(config, tmp_path)
  step, _, _ = run.checkpointer.restore_latest(run.abstract_state)
  run.checkpointer.close()
  assert step == 3
  assert "differ from what was saved" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int32", "int8", "uint32", "bool"])
def test_state_checksums_are_exact_and_sharding_independent(dtype):
  """Sums on the devices (jax.Arrays, any sharding) equal the host's sums of the same bytes (numpy
  leaves, and the checksums saved by earlier versions), and one flipped bit changes them."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxlab.train import checkpoint as ckpt
  rng = np.random.default_rng(0)
  x = np.clip(rng.normal(size=(8, 6)) * 50, -120, 120).astype(jnp.dtype(dtype))
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  placed = [jax.device_put(x, NamedSharding(mesh, spec)) for spec in (P(), P("a"), P("a", "b"))]
  step = jax.device_put(np.int32(-3), jax.devices()[1])  # committed to another device than "w"
  sums = [ckpt.state_checksums({"w": p, "step": step}) for p in placed]
  assert sums[0] == sums[1] == sums[2] == ckpt.state_checksums({"w": x, "step": np.int32(-3)})
  flipped = x.copy()
  flipped.view(f"u{x.dtype.itemsize}")[5, 2] ^= 1  # one bit of one element
  assert ckpt.state_checksums({"w": jax.device_put(flipped), "step": step}) != sums[0]


def test_no_restorable_checkpoint_moves_nothing(tiny_lm_config, tmp_path):
  """Every checkpoint unreadable (or a state they do not fit): an error, and all of them stay."""
  import pytest
  from jaxlab.train.checkpoint import CheckpointError
  config = tiny_lm_config("--config.train.steps=6", "--config.train.checkpoint_every=3")
  trainer.train(config, tmp_path, progress=False)
  for step in ("3", "6"):
    for f in (tmp_path / "checkpoints" / step / "state").rglob("*"):
      if f.is_file():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  with pytest.raises(CheckpointError, match="Nothing was moved"):
    trainer.train(config, tmp_path, progress=False)
  assert _steps(tmp_path / "checkpoints") == ["3", "6"]
  assert not (tmp_path / "corrupt_checkpoints").exists()


def test_eval_with_a_shape_changing_override_is_refused(tiny_lm_config, tmp_path, as_saved_before_configs_were_recorded):
  """`jaxlab eval/sample WORKDIR --config.model.width=64` must not treat the run's good checkpoints
  as corrupt: setup names the key and changes nothing; so does a workdir missing config.json whose
  checkpoints do not record their config (saved by an older jaxlab)."""
  import pytest
  trainer.train(tiny_lm_config(), tmp_path, progress=False)
  as_saved_before_configs_were_recorded(tmp_path)
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
  with pytest.raises(ValueError, match="config.model.width=32"):
    trainer.setup(tiny_lm_config("--config.model.width=64"), tmp_path)
  (tmp_path / "config.json").rename(tmp_path / "config.json.bak")
  with pytest.raises(ValueError, match="no config.json"):
    trainer.train(tiny_lm_config(), tmp_path, progress=False)
  (tmp_path / "config.json.bak").rename(tmp_path / "config.json")
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


def test_checkpoints_record_their_config_and_an_edited_config_json_is_not_trusted(
    tiny_lm_config, tmp_path, capsys):
  """The resume check compared the run's config with WORKDIR/config.json only, so after an edit
  there (optim.lr) a resume with the edited value went on from checkpoints trained under another
  optimizer, and the run's own command was refused. Each checkpoint now records its run's config:
  the edited command is refused naming the key and the edit, the original one resumes (and writes
  config.json again), and so does a run whose config.json is gone."""
  config = tiny_lm_config("--config.train.steps=3")
  trainer.train(config, tmp_path, progress=False)
  run = trainer.setup(config, tmp_path)
  run.checkpointer.close()
  assert [s for s, _ in run.recorded_configs] == [3]
  assert run.recorded_configs[0][1]["optim"]["lr"] == config.optim.lr
  saved = json.loads((tmp_path / "config.json").read_text())
  saved["optim"]["lr"] = 0.5
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match=rf"config.optim.lr={config.optim.lr!r} \(recorded in "
                                       r"checkpoint 3\), but this run has 0.5 \(the workdir's "
                                       r"config.json says 0.5: it was edited"):
    trainer.train(tiny_lm_config("--config.train.steps=6", "--config.optim.lr=0.5"), tmp_path,
                  progress=False)
  from jaxlab import cli  # jaxlab eval reads config.json: refused the same way
  assert cli.main(["eval", str(tmp_path)]) == 2  # a config error
  assert "it was edited after the checkpoints were saved" in capsys.readouterr().err
  result = trainer.train(tiny_lm_config("--config.train.steps=6"), tmp_path, progress=False)
  assert result["step"] == 6
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == config.optim.lr
  (tmp_path / "config.json").unlink()
  result = trainer.train(tiny_lm_config("--config.train.steps=9"), tmp_path, progress=False)
  assert result["step"] == 9 and (tmp_path / "config.json").exists()


def test_the_schedule_note_reads_the_recorded_config(tiny_lm_config, tmp_path, capsys):
  """config.train.steps of the run that saved the checkpoints comes from the checkpoint, not from a
  config.json edited since."""
  trainer.train(tiny_lm_config("--config.train.steps=3"), tmp_path, progress=False)
  saved = json.loads((tmp_path / "config.json").read_text())
  saved["train"]["steps"] = 6
  (tmp_path / "config.json").write_text(json.dumps(saved))
  capsys.readouterr()
  trainer.train(tiny_lm_config("--config.train.steps=6"), tmp_path, progress=False)
  assert "config.train.steps changed from 3 to 6" in capsys.readouterr().err


def test_resume_rewrites_metrics_after_the_checkpoint(tiny_lm_config, tmp_path):
  """Records a killed run wrote after its last checkpoint are dropped on resume (one history)."""
  config = tiny_lm_config("--config.train.log_every=1", "--config.train.steps=6",
                          "--config.train.checkpoint_every=3")
  trainer.train(config, tmp_path, progress=False)
  straight = read_metrics(tmp_path)
  # As if killed after step 4's records (and mid-line), with checkpoints 3 only.
  import shutil
  shutil.move(str(tmp_path / "checkpoints" / "6"), str(tmp_path / "elsewhere"))
  lines = [json.dumps(r) for r in straight if r["step"] <= 4]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "train_l')
  trainer.train(config, tmp_path, progress=False)
  losses = lambda records: [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in records]
  assert losses(read_metrics(tmp_path)) == losses(straight)  # (timings differ)


def test_a_config_without_an_optional_key_resumes_its_own_run(tiny_lm_config, tmp_path):
  """A config file that leaves out a key the run can do without (it holds its default) resumes the
  run it wrote: both sides are compared with the task's defaults filled in."""
  import ml_collections
  config = tiny_lm_config("--config.train.steps=6", "--config.train.checkpoint_every=3")
  trimmed = config.to_dict()
  del trimmed["model"]["rope_scaling_factor"]
  trimmed = ml_collections.ConfigDict(trimmed)
  trainer.train(trimmed, tmp_path, progress=False)
  run = trainer.setup(trimmed, tmp_path)  # was refused: "rope_scaling_factor=1.0, but ... None"
  run.checkpointer.close()


def test_a_workdir_from_before_a_config_key_existed_resumes(tiny_lm_config, tmp_path, as_saved_before_configs_were_recorded):
  """config.json written by an older jaxlab (no model.attention_impl): resuming is not refused."""
  config = tiny_lm_config("--config.train.steps=6", "--config.train.checkpoint_every=3")
  trainer.train(config, tmp_path, progress=False)
  as_saved_before_configs_were_recorded(tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["model"]["attention_impl"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  run = trainer.setup(config, tmp_path)  # would raise ValueError naming the key
  run.checkpointer.close()
  # The missing key held its default in that run: a resume that sets it otherwise is refused.
  import pytest
  other = tiny_lm_config("--config.train.steps=6", "--config.train.checkpoint_every=3",
                         "--config.model.attention_impl=blockwise")
  with pytest.raises(ValueError, match=r"config.model.attention_impl='auto' \(from .*config.json\), "
                                       "but this run has 'blockwise'"):
    trainer.setup(other, tmp_path)
  assert "attention_impl" not in json.loads((tmp_path / "config.json").read_text())["model"]


def test_a_run_that_fails_to_build_leaves_no_workdir(tiny_lm_config, tmp_path):
  """The data cannot be loaded: the error comes before WORKDIR is created. (A path that does not
  exist is refused by load_config already; this one is set past it.)"""
  import pytest
  config = tiny_lm_config()
  with config.unlocked():
    config.data.path = "/nonexistent/corpus.txt"
  with pytest.raises(FileNotFoundError, match="corpus.txt"):
    trainer.train(config, tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()


def test_fewer_steps_than_the_checkpoint_is_refused(tiny_lm_config, tmp_path):
  import pytest
  trainer.train(tiny_lm_config(), tmp_path, progress=False)  # 6 steps
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(ValueError, match=r"step 6, beyond config.train.steps=3"):
    trainer.train(tiny_lm_config("--config.train.steps=3"), tmp_path, progress=False)
  assert (tmp_path / "config.json").read_text() == before


def test_edited_training_text_is_refused(tiny_lm_config, tmp_path):
  """The text at config.data.path changed its characters since the run: its token ids would be read
  with another vocabulary, so resume/eval/sample refuse."""
  import pytest
  corpus = tmp_path / "text.txt"
  corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
  config = tiny_lm_config(f"--config.data.path={corpus}")
  trainer.train(config, tmp_path / "run", progress=False)
  corpus.write_text("the quick brown fox jumps over the lazy cat! " * 200)
  with pytest.raises(ValueError, match="vocabulary differs"):
    trainer.setup(tiny_lm_config(f"--config.data.path={corpus}"), tmp_path / "run")


def test_a_vocab_json_damaged_in_place_is_named_not_the_text(tiny_lm_config, tmp_path):
  """A character of WORKDIR/vocab.json changed in place: resume blamed an edit of the training text
  (which had not changed); now the file is named, and deleting it lets the run go on."""
  import json
  import pytest
  corpus = tmp_path / "text.txt"
  corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
  config = tiny_lm_config(f"--config.data.path={corpus}")
  trainer.train(config, tmp_path / "run", progress=False)
  path = tmp_path / "run" / "vocab.json"
  saved = json.loads(path.read_text())
  path.write_text(json.dumps({**saved, "alphabet": saved["alphabet"].replace("z", "#")}))
  with pytest.raises(ValueError, match=r"vocab\.json is not a vocabulary that jaxlab wrote \(its "
                                       r"alphabet does not match its sha256"):
    trainer.setup(config, tmp_path / "run")
  path.unlink()
  trainer.train(config, tmp_path / "run", progress=False)  # resumes (at its last step)
  assert json.loads(path.read_text()) == saved  # written again from the data


def test_training_text_edited_within_its_alphabet_is_refused(tiny_lm_config, tmp_path):
  """The same characters in another order: the vocabulary matches, but a resume would not see the
  batches it would have seen and an evaluation would score other text: refused by the data's digest
  (WORKDIR/data_fingerprint.txt); sampling, which reads no data, still works."""
  import pytest
  corpus = tmp_path / "text.txt"
  corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
  config = tiny_lm_config(f"--config.data.path={corpus}")
  trainer.train(config, tmp_path / "run", progress=False)
  assert (tmp_path / "run" / "data_fingerprint.txt").read_text().strip() == \
      trainer.tasks.build_task(config).data_fingerprint()
  corpus.write_text("the lazy dog jumps over the quick brown fox. " * 200)
  with pytest.raises(ValueError, match="the data differs from the data .* was trained on"):
    trainer.setup(tiny_lm_config(f"--config.data.path={corpus}"), tmp_path / "run")
  from jaxlab.train import lm_task
  sampler = lm_task.build_for_sampling(config, tmp_path / "run")
  trainer.setup(config, tmp_path / "run", task=sampler).checkpointer.close()


def test_a_relative_data_path_is_saved_absolute_and_older_relative_ones_still_resume(
    tiny_lm_config, tiny_corpus, tmp_path, monkeypatch, as_saved_before_configs_were_recorded):
  """config.data.path as typed relative to the working directory is saved absolute, so `jaxlab eval`
  from elsewhere reads the same file; a run saved before (the path as typed) resumes from the same
  directory, whichever way the path is given now."""
  import json
  import shutil
  from jaxlab.configs import load_config
  shutil.copy(tiny_corpus, tmp_path / "corpus.txt")
  monkeypatch.chdir(tmp_path)
  config = tiny_lm_config("--config.data.path=corpus.txt", "--config.data.data_dir=tfds")
  assert config.data.path == str(tmp_path / "corpus.txt")
  assert config.data.data_dir == str(tmp_path / "tfds")
  trainer.train(config, tmp_path / "run", progress=False)
  as_saved_before_configs_were_recorded(tmp_path / "run")
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["data"]["path"] == str(tmp_path / "corpus.txt")
  saved["data"]["path"] = "corpus.txt"  # as an older jaxlab saved it
  (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
  trainer.setup(tiny_lm_config("--config.data.path=corpus.txt", "--config.data.data_dir=tfds",
                               "--config.train.steps=8"), tmp_path / "run").checkpointer.close()
  other = tmp_path / "elsewhere"
  other.mkdir()
  (other / "b.txt").write_text("b")
  monkeypatch.chdir(other)
  assert load_config("lm_char", [f"--config.data.path={tmp_path / 'corpus.txt'},b.txt"],
                     check_devices=False).data.path == f"{tmp_path / 'corpus.txt'},{other / 'b.txt'}"


def test_an_older_run_with_a_relative_path_keeps_its_best_record(tiny_lm_config, tiny_corpus,
                                                                 tmp_path, monkeypatch):
  """A keep_best run saved before paths were made absolute (config.json and WORKDIR/best's
  fingerprint hold the path as typed): resuming it with the path resolved keeps its best record (it
  was moved aside as "another config"), and --best still restores it."""
  import shutil
  shutil.copy(tiny_corpus, tmp_path / "corpus.txt")
  monkeypatch.chdir(tmp_path)
  flags = ("--config.data.path=corpus.txt", "--config.data.data_dir=tfds",
           "--config.train.keep_best=True")
  old = tiny_lm_config(*flags)
  with old.unlocked():
    old.data.path = "corpus.txt"  # as an older jaxlab kept it
  trainer.train(old, tmp_path / "run", progress=False)
  newer = tiny_lm_config(*flags, "--config.train.steps=9")
  result = trainer.train(newer, tmp_path / "run", progress=False)
  assert not (tmp_path / "run" / "corrupt_checkpoints").exists()
  assert result["best_step"] in (3, 6, 9)
  run = trainer.setup(tiny_lm_config(*flags, "--config.train.steps=9"), tmp_path / "run")
  run.checkpointer.close()
  step = trainer.restore_best_params(run).step
  assert step == result["best_step"]


def test_a_task_without_data_fingerprint_still_trains(tiny_lm_config, tmp_path):
  """data_fingerprint is optional for a task passed in by a library caller (nothing to compare)."""
  inner = trainer.tasks.build_task(tiny_lm_config())

  class Minimal:  # the task interface of jaxlab/train/tasks.py, without the optional methods
    tokens_per_batch = inner.tokens_per_batch
    init_params, loss = inner.init_params, inner.loss
    train_iterator, eval_iterator = inner.train_iterator, inner.eval_iterator

  result = trainer.train(tiny_lm_config(), tmp_path, task=Minimal(), progress=False)
  assert result["step"] == 6 and not (tmp_path / "data_fingerprint.txt").exists()


def test_a_second_trainer_in_the_same_workdir_is_refused(tiny_lm_config, tmp_path):
  import fcntl
  import pytest
  tmp_path.mkdir(exist_ok=True)
  with open(tmp_path / ".jaxlab.lock", "a+") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `jaxlab train` does
    with pytest.raises(RuntimeError, match="another `jaxlab train` is writing"):
      trainer.train(tiny_lm_config(), tmp_path, progress=False)
  assert not list((tmp_path / "checkpoints").iterdir())
  trainer.train(tiny_lm_config(), tmp_path, progress=False)  # released: it runs


def test_a_read_only_workdir_still_falls_back(tiny_lm_config, tmp_path, monkeypatch, capsys):
  """`jaxlab eval` on a workdir it cannot write: the damaged newest checkpoint cannot be moved aside,
  so it is left in place and the previous one is used all the same."""
  config = tiny_lm_config("--config.train.steps=6", "--config.train.checkpoint_every=3")
  trainer.train(config, tmp_path, progress=False)
  for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])

  def read_only(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  from jaxlab.train import checkpoint as ckpt
  monkeypatch.setattr(ckpt.shutil, "move", read_only)
  run = trainer.setup(config, tmp_path)
  step, _, _ = run.checkpointer.restore_latest(run.abstract_state)
  run.checkpointer.close()
  assert step == 3
  assert "left in place (Permission denied)" in capsys.readouterr().out
  assert _steps(tmp_path / "checkpoints") == ["3", "6"]


def test_a_longer_run_resumed_says_its_schedule_changed(tiny_lm_config, tmp_path, capsys):
  trainer.train(tiny_lm_config(), tmp_path, progress=False)  # 6 steps
  capsys.readouterr()
  trainer.train(tiny_lm_config("--config.train.steps=12"), tmp_path, progress=False)
  err = capsys.readouterr().err
  assert "config.train.steps changed from 6 to 12 since the checkpoints" in err
  trainer.train(tiny_lm_config("--config.train.steps=12"), tmp_path, progress=False)  # nothing to do
  assert "changed" not in capsys.readouterr().err


def test_an_evaluation_that_fails_keeps_the_checkpoint_of_its_step(tiny_lm_config, tmp_path,
                                                                    monkeypatch):
  """Checkpoint and evaluation fall on step 3: the checkpoint is written first, so the steps trained
  before a failing evaluation are not lost."""
  import pytest

  def failing(*args, **kwargs):
    raise RuntimeError("evaluation failed")

  monkeypatch.setattr(trainer, "evaluate", failing)
  with pytest.raises(RuntimeError, match="evaluation failed"):
    trainer.train(tiny_lm_config(), tmp_path, progress=False)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3]


def test_a_run_saved_with_the_earlier_training_stream(tiny_lm_config, tmp_path, monkeypatch):
  """Before 2026-12-04 grain shuffled with the run seed itself; the iterator's saved position would
  index another permutation now. A seed whose order changed is refused (nothing written); seed 0,
  whose order is the same, resumes."""
  import pytest
  from jaxlab.train.lm_task import LMTask
  monkeypatch.setattr(LMTask, "train_stream_version", None)  # saves no version, as jaxlab did
  trainer.train(tiny_lm_config("--config.seed=1", "--config.train.steps=3"), tmp_path / "s1",
                progress=False)
  trainer.train(tiny_lm_config("--config.train.steps=3"), tmp_path / "s0", progress=False)
  monkeypatch.undo()
  before = (tmp_path / "s1" / "config.json").read_text()
  with pytest.raises(ValueError, match=r"earlier training stream .* config.seed=1: resuming would "
                                       r"repeat and skip windows"):
    trainer.train(tiny_lm_config("--config.seed=1"), tmp_path / "s1", progress=False)
  assert (tmp_path / "s1" / "config.json").read_text() == before
  assert trainer.train(tiny_lm_config(), tmp_path / "s0", progress=False)["val_loss"] > 0
  saved = [json.loads(f.read_text()) for f in (tmp_path / "s0" / "checkpoints" / "6" / "data").rglob("*")
           if f.is_file() and '"_jaxlab_data_digest"' in f.read_text()]
  assert saved[0][trainer.STREAM_KEY] == 2  # a checkpoint written now carries the version


def test_a_damaged_config_json_beside_checkpoints_is_named(tiny_lm_config, tmp_path, as_saved_before_configs_were_recorded):
  """It gave JSON's bare message ('Expecting property name ...: line 1 column 2'), naming no file."""
  import pytest
  trainer.train(tiny_lm_config("--config.train.steps=3"), tmp_path, progress=False)
  as_saved_before_configs_were_recorded(tmp_path)
  (tmp_path / "config.json").write_text("{bad")
  with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*nothing was changed"):
    trainer.train(tiny_lm_config(), tmp_path, progress=False)
  assert (tmp_path / "config.json").read_text() == "{bad"


def test_a_best_record_folder_that_cannot_be_written_is_refused_first(tiny_lm_config, tmp_path,
                                                                       monkeypatch):
  """A read-only best/ (or a file there) let training run, then orbax's background save failed and
  waited minutes on its barriers; now one line before any step, nothing changed."""
  import os
  import pathlib
  import pytest
  config = tiny_lm_config("--config.train.steps=3", "--config.train.keep_best=True")
  trainer.train(config, tmp_path / "ro", progress=False)
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda path, mode: (
      False if pathlib.Path(path).name == "best" and mode == os.W_OK else real_access(path, mode)))
  with pytest.raises(PermissionError, match=r"best is not a writable folder; the best-params record"):
    trainer.train(tiny_lm_config("--config.train.keep_best=True"), tmp_path / "ro", progress=False)
  monkeypatch.undo()
  (tmp_path / "file").mkdir()
  (tmp_path / "file" / "best").write_text("not a folder")
  with pytest.raises(PermissionError, match="not a writable folder"):
    trainer.train(config, tmp_path / "file", progress=False)
  assert (tmp_path / "file" / "best").read_text() == "not a folder"


def _fail_background_save(monkeypatch, folder, step: int, error=None):
  """orbax's save of `step` under a manager of WORKDIR/`folder` (a name or a tuple of names) fails
  in the background, as on a full disk: nothing is written, and the next wait raises `error`
  (default: TensorStore's error)."""
  folders = (folder,) if isinstance(folder, str) else tuple(folder)
  import orbax.checkpoint as ocp
  real_save, real_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
  failing = []

  def save(self, at, *args, **kwargs):
    if at == step and pathlib.Path(self.directory).name in folders:
      failing.append(self)
      return True
    return real_save(self, at, *args, **kwargs)

  def wait(self):
    if self in failing:
      failing.remove(self)
      raise error or ValueError(
          'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database: Failed to write 4096 '
          "bytes to file 8: No space left on device [os_error_code='28']")
    return real_wait(self)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)


def test_a_failed_background_save_is_one_line_and_the_run_resumes_to_the_same_numbers(
    tiny_lm_config, tmp_path, monkeypatch):
  """A full disk made orbax's background save fail: it surfaced a checkpoint later as hundreds of
  log lines and a bare TensorStore error. Now one line names the checkpoint, the cause and the
  intact steps, and a rerun resumes to the straight run's numbers."""
  from jaxlab.train.checkpoint import CheckpointSaveError
  config = tiny_lm_config("--config.train.steps=9")  # checkpoints at 3, 6 and 9
  straight = trainer.train(config, tmp_path / "straight", progress=False)
  _fail_background_save(monkeypatch, "checkpoints", 6)
  with pytest.raises(CheckpointSaveError, match=r"^checkpoint 6 could not be written in .*"
                                                r"checkpoints \(No space left on device\); the "
                                                r"checkpoints before it are intact \(steps 3\): .*"
                                                r"resume from step 3$"):
    trainer.train(config, tmp_path / "run", progress=False)
  monkeypatch.undo()
  assert _steps(tmp_path / "run" / "checkpoints") == ["3"]
  resumed = trainer.train(config, tmp_path / "run", progress=False)
  assert _train_losses(tmp_path / "run") == _train_losses(tmp_path / "straight")
  jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(straight))


def test_a_failed_best_record_save_is_one_line(tiny_lm_config, tmp_path, monkeypatch):
  from jaxlab.train.checkpoint import CheckpointSaveError
  config = tiny_lm_config("--config.train.steps=9", "--config.train.keep_best=True")
  _fail_background_save(monkeypatch, "best", 6)
  with pytest.raises(CheckpointSaveError, match=r"^the best-params record of step 6 could not be "
                                                r"written in .*best \(No space left on device\); "
                                                r"the record before it is intact"):
    trainer.train(config, tmp_path, progress=False)


def test_the_cli_drops_orbax_reports_of_a_failed_background_save():
  """Each orbax thread logged the failure with its traceback (hundreds of lines, 2026-12-04); the
  `jaxlab` command filters those records (the error is raised as one line) and keeps others."""
  import logging
  from jaxlab import cli
  record = lambda path, msg: logging.LogRecord("absl", logging.ERROR, path, 1, msg, None, None)
  orbax = "/venv/site-packages/orbax/checkpoint/_src/futures/future.py"
  assert not cli._not_a_background_save_failure(record(
      orbax, "[process=0][thread=array_type_handler] _SignalingThread.run() raised an exception: x"))
  assert not cli._not_a_background_save_failure(record(
      orbax, "[process=0][wait_until_finished] Save Finalize thread (save_finalize) failed."))
  assert cli._not_a_background_save_failure(record(orbax, "another orbax error"))
  assert cli._not_a_background_save_failure(record("/x/mine.py", "Save Finalize thread failed"))


def test_a_workdir_that_cannot_be_written_is_one_line(tiny_lm_config, tmp_path, monkeypatch):
  """It was the bare `[Errno 13] Permission denied: '.../.jaxlab.lock'`."""
  import builtins
  config = tiny_lm_config("--config.train.steps=3")
  trainer.train(config, tmp_path, progress=False)
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

  def read_only(path, *args, **kwargs):
    if pathlib.Path(path).name == ".jaxlab.lock":
      raise PermissionError(13, "Permission denied", str(path))
    return builtins.open(path, *args, **kwargs)

  monkeypatch.setattr(trainer, "open", read_only, raising=False)
  with pytest.raises(PermissionError, match=rf"^{tmp_path} is not writable \(Permission denied: "
                                            r".*\.jaxlab\.lock\); a training run writes .*nothing "
                                            r"was changed"):
    trainer.train(tiny_lm_config("--config.train.steps=6"), tmp_path, progress=False)
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


def test_eval_may_change_the_batch_size_only(tiny_lm_config, tmp_path, capsys):
  """`jaxlab eval WORKDIR --config.data.batch_size=N` was refused as a different run (the batch
  size shapes the training stream, not the saved arrays); a resume still may not change it."""
  from jaxlab import cli
  trainer.train(tiny_lm_config(), tmp_path, progress=False)
  capsys.readouterr()
  assert cli.main(["eval", str(tmp_path), "--config.data.batch_size=2"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 6
  assert cli.main(["eval", str(tmp_path), "--config.data.seq_len=8"]) == 2  # a config error
  assert "only data.batch_size may be overridden here" in capsys.readouterr().err
  with pytest.raises(ValueError, match="config.data.batch_size=.*train a different config"):
    trainer.train(tiny_lm_config("--config.data.batch_size=2", "--config.train.steps=9"), tmp_path,
                  progress=False)


def test_a_failed_final_save_does_not_hide_what_stopped_the_run(tiny_lm_config, tmp_path,
                                                                  monkeypatch, capsys):
  """An evaluation failed while checkpoint 3's background save was failing too: the save error,
  raised while closing, replaced the evaluation's ("make room and run the same command")."""
  _fail_background_save(monkeypatch, "checkpoints", 3)
  monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: (_ for _ in ()).throw(
      FloatingPointError("the evaluation broke")))
  with pytest.raises(FloatingPointError, match="the evaluation broke"):
    trainer.train(tiny_lm_config(), tmp_path, progress=False)
  assert "jaxlab: also: checkpoint 3 could not be written" in capsys.readouterr().err


def test_both_final_saves_failing_name_the_checkpoint_first(tiny_lm_config, tmp_path, monkeypatch):
  """On a full disk the last checkpoint and the best record fail together: the best record's error
  replaced the checkpoint's, which says from which step a rerun resumes."""
  from jaxlab.train.checkpoint import CheckpointSaveError
  _fail_background_save(monkeypatch, ("checkpoints", "best"), 6,
                        OSError(28, "No space left on device"))
  with pytest.raises(CheckpointSaveError, match=r"^checkpoint 6 could not be written .* resume "
                                                r"from step 3; also: the best-params record of "
                                                r"step 6 could not be written"):
    trainer.train(tiny_lm_config("--config.train.keep_best=True"), tmp_path, progress=False)


def test_save_errors_that_are_not_the_file_systems_are_raised_as_they_are(tmp_path):
  """Every orbax error became "could not be written ... make room" (a step saved twice, too), and
  the failed step counted itself among the intact ones."""
  import orbax.checkpoint as ocp
  from jaxlab.train import checkpoint
  keeper = checkpoint.Checkpointer(tmp_path)
  state = {"w": jnp.ones(3)}
  keeper.save(1, state, {})
  keeper.wait()
  with pytest.raises(ocp.checkpoint_manager.StepAlreadyExistsError):
    keeper.save(1, state, {})
  keeper.close()
  assert "steps 1, 2" not in keeper._failure_message(2, "x") and "(steps 1)" in \
      keeper._failure_message(2, "x")
  assert "(steps 1)" not in keeper._failure_message(1, "x")


def test_a_failed_first_best_record_says_there_was_none(tiny_lm_config, tmp_path, monkeypatch):
  from jaxlab.train.checkpoint import CheckpointSaveError
  _fail_background_save(monkeypatch, "best", 3)
  with pytest.raises(CheckpointSaveError, match=r"best-params record of step 3 .* there was no "
                                                r"earlier record"):
    trainer.train(tiny_lm_config("--config.train.keep_best=True"), tmp_path, progress=False)


def test_moved_data_with_the_same_content_still_resumes_and_evaluates(tiny_lm_config, tiny_corpus,
                                                                       tmp_path, capsys):
  """The checkpoints record data.path, but the data's digest (data_fingerprint.txt) is what
  matters: a corpus moved elsewhere (or a workdir copied to another machine) still evaluates and
  resumes; other content is still refused."""
  import shutil
  from jaxlab import cli
  corpus = tmp_path / "corpus.txt"
  shutil.copy(tiny_corpus, corpus)
  trainer.train(tiny_lm_config(f"--config.data.path={corpus}"), tmp_path / "run", progress=False)
  moved = tmp_path / "moved.txt"
  corpus.rename(moved)
  capsys.readouterr()
  assert cli.main(["eval", str(tmp_path / "run"), f"--config.data.path={moved}"]) == 0
  result = trainer.train(tiny_lm_config(f"--config.data.path={moved}", "--config.train.steps=9"),
                         tmp_path / "run", progress=False)
  assert result["step"] == 9
  moved.write_text(moved.read_text()[::-1])
  with pytest.raises(ValueError, match="the data differs from the data"):
    trainer.setup(tiny_lm_config(f"--config.data.path={moved}"), tmp_path / "run")


def test_parameters_that_blow_up_stop_the_run_with_one_line(tiny_lm_config, tmp_path, capsys):
  """lr = 1e30: the last update made parameters ~1e30 (finite), the validation loss was NaN, and the
  run ended with exit status 0; non-finite parameters are not saved at all. `jaxlab eval` of the
  checkpoint it keeps printed {"val_loss": NaN} with exit 0, and `jaxlab sample` printed samples."""
  from jaxlab import cli
  with pytest.raises(FloatingPointError, match=r"the validation loss is nan at step 2; stopping"):
    trainer.train(tiny_lm_config("--config.optim.lr=1e30", "--config.train.steps=2",
                                 "--config.optim.warmup_steps=1", "--config.train.eval_every=2",
                                 "--config.train.checkpoint_every=2"), tmp_path, progress=False)
  capsys.readouterr()
  for command in (["eval", str(tmp_path)], ["sample", str(tmp_path), "--num-tokens", "4"]):
    assert cli.main(command) == 1
    out, err = capsys.readouterr()
    assert out == "" and "checkpoint 2 " in err and "validation loss of nan" in err, (out, err)
  # A checkpoint that no evaluation saw (saved at step 2, the loss NaN at step 3): the train loop
  # names it, and sampling checks the logits itself.
  other = tmp_path / "unevaluated"
  with pytest.raises(FloatingPointError, match=r"loss is nan at step 3; stopping \(checkpoint 2 .* "
                                               r"holds the parameters that gave it"):
    trainer.train(tiny_lm_config("--config.optim.lr=1e30", "--config.train.steps=3",
                                 "--config.optim.warmup_steps=1", "--config.train.eval_every=3",
                                 "--config.train.checkpoint_every=2"), other, progress=False)
  capsys.readouterr()
  assert cli.main(["sample", str(other), "--num-tokens", "4"]) == 1
  out, err = capsys.readouterr()
  assert out == "" and "non-finite logits for the prompt" in err, (out, err)
  assert bool(trainer._all_finite({"a": jnp.ones(2), "i": jnp.arange(2)}))
  assert not bool(trainer._all_finite({"a": jnp.array([1.0, jnp.inf]), "b": jnp.ones(2)}))


def test_the_schedule_note_counts_applied_updates(tiny_lm_config, tmp_path, capsys):
  """A float16 run skips steps whose gradients overflow, and its schedule counts applied updates
  only: the note quoted the learning rates at the step number instead."""
  from jaxlab.train import optim
  config = tiny_lm_config(*FLOAT16, "--config.train.steps=3")
  trainer.train(config, tmp_path, progress=False)
  run = trainer.setup(config, tmp_path)
  _, state, _ = run.checkpointer.restore_latest(run.abstract_state)
  run.checkpointer.close()
  skipped = int(state["loss_scale"]["skipped"])
  assert skipped > 0
  capsys.readouterr()
  longer = tiny_lm_config(*FLOAT16, "--config.train.steps=6")
  trainer.train(longer, tmp_path, progress=False)
  lr = lambda steps: float(optim.learning_rate_schedule(longer.optim, steps)(3 - skipped))
  assert lr(3) != float(optim.learning_rate_schedule(longer.optim, 3)(3))
  assert (f"at step 3: lr {lr(3):.3g} under the old schedule, {lr(6):.3g} under the new one"
          in capsys.readouterr().err)


def test_a_checkpoint_deleted_while_a_reader_reads_it_is_skipped_not_called_damaged(
    tiny_lm_config, tmp_path, monkeypatch, capsys):
  """`jaxlab eval`/`sample` beside a training run: its retention deletes the step being read. That
  step was reported as damaged ("move them away ... to start afresh", with one step kept); the reader
  now lists the steps again and reads what is there."""
  import shutil
  from jaxlab.train import checkpoint as checkpoint_lib
  config = tiny_lm_config("--config.train.steps=6", "--config.train.checkpoint_every=3")
  trainer.train(config, tmp_path, progress=False)
  run = trainer.setup(config, tmp_path, reading=True)
  read = checkpoint_lib.Checkpointer._read
  deleted = []

  def read_while_training_deletes(self, step, abstract_state):
    if not deleted:  # the newest step goes while it is read
      shutil.rmtree(self.directory / str(step))
      deleted.append(step)
      return None, "FileNotFoundError: gone"
    return read(self, step, abstract_state)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "_read", read_while_training_deletes)
  try:
    capsys.readouterr()
    step, _, _ = run.checkpointer.restore_latest(run.abstract_state, move_aside=False)
    assert (deleted, step) == ([6], 3)
    assert "could not be read" not in capsys.readouterr().out
    # The only checkpoint deleted as it is read: no checkpoint, not "damaged".
    deleted.clear()
    shutil.rmtree(tmp_path / "checkpoints" / "3")
    trainer.train(tiny_lm_config("--config.train.steps=3", "--config.train.checkpoint_every=3"),
                  tmp_path / "b", progress=False)
    run_b = trainer.setup(config, tmp_path / "b", reading=True)
    assert run_b.checkpointer.restore_latest(run_b.abstract_state, move_aside=False) is None
    run_b.checkpointer.close()
  finally:
    run.checkpointer.close()


def test_readers_read_again_what_a_training_run_replaced_meanwhile(tiny_lm_config, tmp_path,
                                                                   monkeypatch):
  """Beside a training run, `jaxlab eval/sample` failed now and then: orbax listing a step that
  retention deleted meanwhile ("No such file or directory: .../checkpoints/790"), or a best-params
  record replaced while it was read ("could not be restored ... nothing was changed"). Readers now
  try again; a writer, and a record that did not change, still fail at once."""
  from jaxlab.train import checkpoint as checkpoint_lib
  config = tiny_lm_config("--config.train.steps=4", "--config.train.checkpoint_every=2",
                          "--config.train.eval_every=2", "--config.train.keep_best=True")
  trainer.train(config, tmp_path, progress=False)
  manager = checkpoint_lib.ocp.CheckpointManager
  calls = []

  def listing_races_retention(*args, **kwargs):
    calls.append(kwargs["options"].create)
    if len(calls) == 1:
      raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "checkpoints" / "2"))
    return manager(*args, **kwargs)

  monkeypatch.setattr(checkpoint_lib.ocp, "CheckpointManager", listing_races_retention)
  checkpoint_lib.Checkpointer(tmp_path, create=False).close()
  assert calls == [False, False]
  calls.clear()
  with pytest.raises(FileNotFoundError):
    checkpoint_lib.Checkpointer(tmp_path)  # the writer
  monkeypatch.undo()

  run = trainer.setup(config, tmp_path, reading=True)
  run.checkpointer.close()
  restore = checkpoint_lib.BestParams.restore
  tries = []

  def replaced_while_read(self, abstract_params):
    tries.append(self.step)
    if len(tries) == 1:
      (self.directory / "999.orbax-checkpoint-tmp-1").mkdir()  # a new record being written
      raise FileNotFoundError("the best-params record could not be restored (Exception)")
    return restore(self, abstract_params)

  monkeypatch.setattr(checkpoint_lib.BestParams, "restore", replaced_while_read)
  step = trainer.restore_best_params(run).step
  assert len(tries) == 2 and step == tries[-1]
  (tmp_path / "best" / "999.orbax-checkpoint-tmp-1").rmdir()

  def damaged(self, abstract_params):
    tries.append(self.step)
    raise FileNotFoundError("the best-params record could not be restored (Exception)")

  tries.clear()
  monkeypatch.setattr(checkpoint_lib.BestParams, "restore", damaged)
  with pytest.raises(FileNotFoundError):
    trainer.restore_best_params(run)
  assert len(tries) == 1  # nothing changed in best/: no second try


def test_listing_the_steps_again_survives_a_step_deleted_while_orbax_lists_them(
    tiny_lm_config, tmp_path, monkeypatch):
  """restore_latest's second listing (after every listed step vanished under a reader) met the same
  race as the first: orbax's reload raised FileNotFoundError for a step deleted meanwhile."""
  from jaxlab.train import checkpoint as checkpoint_lib
  config = tiny_lm_config("--config.train.steps=6", "--config.train.checkpoint_every=3")
  trainer.train(config, tmp_path, progress=False)
  run = trainer.setup(config, tmp_path, reading=True)
  ckpts = tmp_path / "checkpoints"
  read, reload = checkpoint_lib.Checkpointer._read, run.checkpointer._manager.reload
  events = []

  def training_rotates(self, step, abstract_state):
    if not events:  # the training run saves step 9 and deletes 3 and 6 while we read
      (ckpts / "6").rename(ckpts / "9")
      shutil.rmtree(ckpts / "3")
      events.append("rotated")
      return None, "FileNotFoundError: gone"
    return read(self, step, abstract_state)

  def reload_races_once():
    events.append("reload")
    if events.count("reload") == 1:
      raise FileNotFoundError(2, "No such file or directory", str(ckpts / "3"))
    return reload()

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "_read", training_rotates)
  monkeypatch.setattr(run.checkpointer._manager, "reload", reload_races_once)
  try:
    step, _, _ = run.checkpointer.restore_latest(run.abstract_state, move_aside=False)
    assert step == 9 and events == ["rotated", "reload", "reload"]
  finally:
    run.checkpointer.close()


def test_non_finite_parameters_are_never_saved(tiny_lm_config, tmp_path):
  """lr = 1e39 overflows the first update to inf/NaN parameters: the run stops before saving them
  (a guard that no test reached: lr 1e30 left the parameters huge but finite)."""
  with pytest.raises(FloatingPointError, match=r"the parameters are not finite after step 1 .*"
                                               r"stopping before saving them"):
    trainer.train(tiny_lm_config("--config.optim.lr=1e39", "--config.optim.warmup_steps=0",
                                 "--config.train.steps=2", "--config.train.checkpoint_every=1",
                                 "--config.train.eval_every=2"), tmp_path, progress=False)
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_logged_learning_rate_is_the_one_applied(tiny_lm_config, tmp_path, monkeypatch, dtype):
  """With Adam's b1 = b2 = 0 and no weight decay or clipping, an update moves each parameter by
  lr * |g| / (|g| + eps): the largest move of a step is its learning rate. Each logged
  learning_rate equals it (the schedule over train.steps, counting only applied updates: float16's
  first steps overflow at loss scale 2**24 and are skipped). No test read the logged value: one step ahead, counting skipped steps, or an optimizer scheduled over
  twice the steps all passed."""
  moves = {}
  make = trainer.make_train_step

  def recording(run):
    step_fn = make(run)

    def step(state, batch):
      before = jax.tree.map(np.asarray, state["params"])
      number = int(state["step"]) + 1
      state, metrics = step_fn(state, batch)
      moves[number] = max(float(np.abs(np.asarray(a) - b).max())
                          for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before)))
      return state, metrics
    return step

  monkeypatch.setattr(trainer, "make_train_step", recording)
  extra = ["--config.model.dtype=float16", "--config.optim.loss_scale_init=16777216.0"] \
      if dtype == "float16" else []
  config = tiny_lm_config("--config.optim.b1=0.0", "--config.optim.b2=0.0",
                          "--config.optim.weight_decay=0.0", "--config.optim.grad_clip=0.0",
                          "--config.optim.lr=0.01", "--config.optim.min_lr=0.001",
                          "--config.optim.warmup_steps=2", "--config.train.steps=12",
                          "--config.train.log_every=1", "--config.train.eval_every=12",
                          "--config.train.checkpoint_every=12", *extra)
  trainer.train(config, tmp_path, progress=False)
  records = {r["step"]: r for r in read_metrics(tmp_path) if "learning_rate" in r}
  assert sorted(records) == sorted(moves) == list(range(1, 13))
  skipped = [s for s in records if records[s].get("skipped_steps", 0)]
  assert (len(skipped) >= 3) == (dtype == "float16"), skipped
  for s in sorted(records):
    if s in skipped:
      assert moves[s] == 0, s
    else:  # (the first applied update has lr 0: warmup starts at 0)
      np.testing.assert_allclose(moves[s], records[s]["learning_rate"], rtol=1e-4, atol=1e-12,
                                 err_msg=f"step {s}")
  n = 11 - len(skipped)  # updates applied before the last one: warmup 2, cosine over 10
  np.testing.assert_allclose(records[12]["learning_rate"],
                             0.001 + 0.009 * 0.5 * (1 + np.cos(np.pi * (n - 2) / 10)), rtol=1e-5)
