"""BestParams (WORKDIR/best, train.keep_best): only a lower validation loss replaces the record, a step
replayed after a resume can replace its own record, and unreadable or foreign records are moved aside
(never trusted, never deleted)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.train import checkpoint
from jaxlab.train.checkpoint import BestParams


def _params(value):
  return {"w": jnp.full((3, 2), value, jnp.float32), "b": jnp.full((2,), value, jnp.float32)}


def _restore(keeper):
  return jax.tree.map(np.asarray, keeper.restore(jax.eval_shape(lambda: _params(0.0))))


def test_only_a_lower_loss_replaces_the_record_and_it_survives_reopening(tmp_path):
  keeper = BestParams(tmp_path, fingerprint="a")
  assert keeper.offer(10, 5.0, _params(1.0))
  assert not keeper.offer(20, 5.5, _params(2.0))
  assert not keeper.offer(25, 5.0, _params(9.0))  # a tie does not beat it (a plateau keeps 10)
  assert (keeper.step, keeper.val_loss) == (10, 5.0)
  np.testing.assert_array_equal(_restore(keeper)["w"], 1.0)
  assert keeper.offer(30, 4.0, _params(3.0))
  keeper.close()
  keeper = BestParams(tmp_path, fingerprint="a")
  assert (keeper.step, keeper.val_loss) == (30, 4.0)
  np.testing.assert_array_equal(_restore(keeper)["w"], 3.0)
  assert not keeper.offer(40, 4.5, _params(4.0))
  keeper.close()


def test_a_discarded_record_leaves_no_folder_until_the_next_one(tmp_path):
  """discard moves the record aside and does not make an empty best/ again (it looked like a record
  to come); discarding twice is fine; the next record makes the folder again."""
  keeper = BestParams(tmp_path, fingerprint="a")
  keeper.offer(10, 5.0, _params(1.0))
  keeper.discard("is tested")
  assert not (tmp_path / "best").exists() and list((tmp_path / "corrupt_checkpoints").iterdir())
  keeper.discard("is tested again")  # AttributeError on a closed manager once
  assert keeper.offer(20, 6.0, _params(2.0))  # any loss beats no record
  keeper.close()
  keeper = BestParams(tmp_path, fingerprint="a")
  assert (keeper.step, keeper.val_loss) == (20, 6.0)
  np.testing.assert_array_equal(_restore(keeper)["w"], 2.0)
  keeper.close()


def test_a_step_replayed_after_a_resume_replaces_its_own_record(tmp_path):
  keeper = BestParams(tmp_path)
  keeper.offer(800, 1.0, _params(1.0))
  keeper.close()
  keeper = BestParams(tmp_path)  # the run resumed from step 0..799 and evaluates step 800 again
  keeper.val_loss = float("inf")  # e.g. a different eval split size: the replayed loss is lower
  assert keeper.offer(800, 0.99, _params(2.0))
  keeper.close()
  keeper = BestParams(tmp_path)
  assert (keeper.step, keeper.val_loss) == (800, 0.99)
  np.testing.assert_array_equal(_restore(keeper)["w"], 2.0)
  keeper.close()



def test_a_failed_replacement_leaves_the_earlier_record_whole(tmp_path):
  """A replacement that fails to save (here: parameters that cannot be checksummed or written)
  loses nothing: the earlier record was deleted before the new one was written. (That orbax removes
  the old slot only after committing the new one is orbax's own order, CheckpointManager._finalize.)"""
  keeper = BestParams(tmp_path)
  keeper.offer(800, 1.0, _params(1.0))
  keeper.close()
  keeper = BestParams(tmp_path)
  keeper.val_loss = float("inf")  # the replayed step 800 evaluates lower
  with pytest.raises(Exception):
    keeper.offer(800, 0.5, {"w": object()})
  keeper = BestParams(tmp_path)
  assert (keeper.step, keeper.val_loss) == (800, 1.0)
  np.testing.assert_array_equal(_restore(keeper)["w"], 1.0)
  keeper.close()


def test_a_lower_step_replayed_with_a_lower_loss_is_kept(tmp_path):
  """Best at step 800; the run resumed from 600 and step 700 now evaluates lower (a nondeterministic
  device): the new record replaces the other one."""
  keeper = BestParams(tmp_path)
  keeper.offer(800, 1.0, _params(1.0))
  assert keeper.offer(700, 0.9, _params(2.0))
  keeper.close()
  keeper = BestParams(tmp_path)
  assert (keeper.step, keeper.val_loss) == (700, 0.9)
  np.testing.assert_array_equal(_restore(keeper)["w"], 2.0)
  assert len([p for p in (tmp_path / "best").iterdir() if p.name.isdigit()]) == 1
  keeper.close()

def _corrupt(tmp_path, item):
  """Overwrites every file of one item ('meta' or 'params') of the saved record with garbage."""
  files = [p for p in (tmp_path / "best").rglob("*") if p.is_file() and item in p.parts]
  assert files, f"no {item} files found"
  for f in files:
    f.write_bytes(b"\x00garbage")


def test_unreadable_meta_is_moved_aside_not_trusted(tmp_path, capsys):
  keeper = BestParams(tmp_path)
  keeper.offer(5, 2.0, _params(1.0))
  keeper.close()
  _corrupt(tmp_path, "meta")
  keeper = BestParams(tmp_path)
  assert keeper.step is None and keeper.val_loss == float("inf")
  assert "is unreadable" in capsys.readouterr().out
  assert [p.name.split(".")[0] for p in (tmp_path / "corrupt_checkpoints").iterdir()] == ["best"]
  assert keeper.offer(5, 3.0, _params(2.0))  # a fresh record can be written at the same step
  keeper.close()


def test_unreadable_params_raise_file_not_found_and_are_moved_aside(tmp_path):
  keeper = BestParams(tmp_path)
  keeper.offer(5, 2.0, _params(1.0))
  keeper.close()
  _corrupt(tmp_path, "params")
  keeper = BestParams(tmp_path)
  with pytest.raises(FileNotFoundError, match="could not be read"):
    keeper.restore(jax.eval_shape(lambda: _params(0.0)))
  assert keeper.step is None
  assert (tmp_path / "corrupt_checkpoints").is_dir()
  keeper.close()


def test_a_record_of_another_config_is_moved_aside(tmp_path, capsys):
  keeper = BestParams(tmp_path, fingerprint="model-a")
  keeper.offer(5, 2.0, _params(1.0))
  keeper.close()
  keeper = BestParams(tmp_path, fingerprint="model-b")
  assert keeper.step is None
  assert "different model/data/optimizer config" in capsys.readouterr().out
  assert [p.name.split(".")[0] for p in (tmp_path / "set_aside_checkpoints").iterdir()] == ["best"]
  assert not (tmp_path / "corrupt_checkpoints").exists()  # intact: set aside, not called corrupt
  keeper.close()


def test_asking_for_a_record_that_was_never_saved_creates_nothing(tmp_path):
  with pytest.raises(FileNotFoundError, match="keep_best"):
    BestParams(tmp_path, create=False)
  assert not (tmp_path / "best").exists()


def test_params_damaged_in_place_are_caught_by_checksums(tmp_path):
  """Bytes of the saved parameters changed on disk, still readable: the checksums saved in its meta
  catch it (as for the train checkpoints); the record is moved aside."""
  import json
  keeper = BestParams(tmp_path)
  keeper.offer(5, 2.0, _params(1.0))
  keeper.close()
  meta_files = [p for p in (tmp_path / "best").rglob("metadata") if "meta" in p.parts]
  assert len(meta_files) == 1
  meta = json.loads(meta_files[0].read_text())
  meta["_jaxlab_state_checksums"][0] += 1  # as if the array's bytes had changed
  digest = meta.pop(checkpoint.DATA_DIGEST_KEY)  # (the meta itself stays consistent)
  meta[checkpoint.DATA_DIGEST_KEY] = checkpoint.data_digest(meta)
  assert meta[checkpoint.DATA_DIGEST_KEY] != digest
  meta_files[0].write_text(json.dumps(meta))
  keeper = BestParams(tmp_path)
  with pytest.raises(FileNotFoundError, match="checksums do not match"):
    keeper.restore(jax.eval_shape(lambda: _params(0.0)))
  assert (tmp_path / "corrupt_checkpoints").is_dir()
  keeper.close()


@pytest.mark.parametrize("field,value", [("val_loss", 0.5), ("step", 7)])
def test_a_step_or_val_loss_edited_in_place_is_caught_by_the_meta_digest(tmp_path, capsys, field,
                                                                        value):
  """The record's val_loss decides which parameters a run reports: one edited in place (12.28 for
  42.28, same size) was trusted and no later evaluation could replace it."""
  import json
  keeper = BestParams(tmp_path)
  keeper.offer(5, 2.0, _params(1.0))
  keeper.close()
  meta_file, = [p for p in (tmp_path / "best").rglob("metadata") if "meta" in p.parts]
  meta = json.loads(meta_file.read_text())
  meta[field] = value
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(FileNotFoundError, match="does not match its digest"):
    BestParams(tmp_path, create=False)  # eval/sample --best: refused, left in place
  assert (tmp_path / "best").is_dir()
  keeper = BestParams(tmp_path)  # train: moved aside
  assert keeper.step is None and "does not match its digest" in capsys.readouterr().out
  assert (tmp_path / "corrupt_checkpoints").is_dir()
  keeper.close()


@pytest.mark.parametrize("name,added", [
    ("lm_char", ("model.mtp_heads", "model.medusa_heads", "model.heads_loss_decay",
                 "model.heads_stop_gradient", "optim.loss_scale", "optim.loss_scale_init",
                 "optim.loss_scale_period")),
    ("contrastive_digits", ("model.dtype", "optim.loss_scale", "optim.loss_scale_init",
                            "optim.loss_scale_period", "model.image_encoder", "model.image_window",
                            "model.image_stages", "model.image_rope_theta")),
    ("made", ("data.static_binarization",)),
])
def test_keys_added_later_keep_older_runs_fingerprints(name, added):
  """A WORKDIR/best record matches its run by a fingerprint of the config: keys added to jaxlab after
  the run was saved, at their defaults, leave it as it was; any other value changes it."""
  import json
  import ml_collections
  from jaxlab.configs import load_config
  from jaxlab.train import trainer
  config = load_config(name, [], check_devices=False)
  older = json.loads(config.to_json_best_effort())
  for key in added:
    section, leaf = key.split(".")
    del older[section][leaf]
  assert trainer.config_fingerprint(ml_collections.ConfigDict(older)) == \
      trainer.config_fingerprint(config)
  fingerprint = lambda *overrides: trainer.config_fingerprint(load_config(name, list(overrides),
                                                                          check_devices=False))
  if name == "made":  # no model.dtype, no loss scaling
    assert fingerprint("--config.data.name=mnist", "--config.data.static_binarization=True") != \
        fingerprint("--config.data.name=mnist")
    return
  # Loss scaling counts as on or off (auto on float32 = none = as before; auto on float16 = dynamic).
  assert fingerprint("--config.optim.loss_scale=none") == fingerprint()
  assert fingerprint("--config.optim.loss_scale=dynamic") != fingerprint()
  assert fingerprint("--config.model.dtype=float16") == fingerprint(
      "--config.model.dtype=float16", "--config.optim.loss_scale=dynamic")
  assert fingerprint("--config.model.dtype=bfloat16") != fingerprint()
  if name == "lm_char":
    assert fingerprint("--config.model.medusa_heads=1") != fingerprint()


def test_every_key_added_since_fingerprints_began_is_registered():
  """The fingerprint of a WORKDIR/best record covers the config keys of RESUME_MUST_MATCH. Keys that
  configs gain later must be registered in trainer.ADDED_(TASK_)KEYS_AT_DEFAULT, at the value that
  means "as before", or every older record stops matching its run. fingerprint_keys.json holds the
  keys the fingerprint covered when it was introduced (commit 49c8e89); a key in neither fails here."""
  import json
  import pathlib
  from jaxlab.configs import available_configs, flatten, load_config
  from jaxlab.train import loss_scale, trainer
  known = json.loads((pathlib.Path(__file__).parent / "fingerprint_keys.json").read_text())
  assert sorted(known) == sorted(available_configs())
  for name in available_configs():
    config = json.loads(load_config(name, [], check_devices=False).to_json_best_effort())
    flat = flatten({k: v for k, v in config.items() if k in trainer.RESUME_MUST_MATCH})
    added = {**trainer.ADDED_KEYS_AT_DEFAULT,
             **trainer.ADDED_TASK_KEYS_AT_DEFAULT.get(config["task"], {})}
    unregistered = set(flat) - set(known[name]) - set(added) - set(loss_scale.KEYS) - {"data.data_dir"}
    assert not unregistered, (f"{name}: config keys {sorted(unregistered)} are new since WORKDIR/best "
                              "fingerprints began; add them to trainer.ADDED_TASK_KEYS_AT_DEFAULT "
                              "at the value that means 'as before'")
    for key, default in added.items():
      if key in flat:
        assert flat[key] == default, (name, key)


def test_reading_for_eval_or_sample_never_moves_a_record(tmp_path):
  """create=False (jaxlab eval/sample --best) refuses a record it cannot use and leaves it: moving it
  aside took a valid record from a training run that was replacing it, or from a workdir whose
  config.json had been edited."""
  keeper = BestParams(tmp_path, fingerprint="model-a")
  keeper.offer(5, 2.0, _params(1.0))
  keeper.close()
  with pytest.raises(FileNotFoundError, match="different model/data/optimizer config; nothing was "
                                              "changed"):
    BestParams(tmp_path, fingerprint="model-b", create=False)
  _corrupt(tmp_path, "params")
  reader = BestParams(tmp_path, fingerprint="model-a", create=False)
  with pytest.raises(FileNotFoundError, match="could not be restored .*nothing was changed"):
    reader.restore(jax.eval_shape(lambda: _params(0.0)))
  reader.close()
  assert not (tmp_path / "corrupt_checkpoints").exists()
  reader = BestParams(tmp_path, fingerprint="model-a", create=False)
  assert reader.step == 5
  reader.close()
