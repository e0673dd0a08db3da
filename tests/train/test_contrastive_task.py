"""The contrastive task: sharded loss inside the trainer's jit equals the dense loss (value and gradient),
zero-shot metrics against hand-computed cases, and config checks that name the key."""

from __future__ import annotations

import re

import jax
import numpy as np

import pytest
from jax.sharding import PartitionSpec as P

from jaxlab.configs import ConfigError, load_config
from jaxlab.train import contrastive_task as ct
from jaxlab.train import sharding

TINY = ["--config.model.image_width=16", "--config.model.image_layers=1", "--config.model.image_heads=2",
        "--config.model.text_width=16", "--config.model.text_layers=1", "--config.model.text_heads=2",
        "--config.model.embed_dim=8", "--config.data.text_len=24", "--config.data.batch_size=32",
        "--config.model.patch=4", "--config.eval.batch_size=512"]


SWIN = ["--config.model.image_encoder=swin", "--config.model.patch=1", "--config.model.image_window=4",
        "--config.model.image_stages=2", "--config.model.image_layers=2"]


@pytest.mark.parametrize("loss,tower", [("siglip", []), ("clip", []), ("siglip", SWIN)])
def test_sharded_task_loss_equals_dense(tfds_dir, loss, tower):
  """Chunked SigLIP / all-gathered CLIP inside the task's loss on a data 4 x fsdp 2 mesh (with the ViT
  tower, and with the Swin tower, whose parameters fsdp shards too)."""
  config = load_config("contrastive_digits", TINY + tower + [f"--config.data.data_dir={tfds_dir}",
                                                             f"--config.model.loss={loss}",
                                                             "--config.mesh.data=4",
                                                             "--config.mesh.fsdp=2"])
  task = ct.build(config)
  params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x),
                                  task.init_params(jax.random.PRNGKey(0)),
                                  is_leaf=lambda x: hasattr(x, "value"))
  batch = next(task.train_iterator())
  mesh = task.mesh()
  placed = sharding.place_batch(batch, mesh, task.batch_size)
  assert placed["images"].sharding.spec == P(("data", "fsdp"))
  value_grad = lambda t: jax.jit(jax.value_and_grad(
      lambda p, b: t.loss(p, b, jax.random.PRNGKey(0), train=True)[0]))
  # The sharded path is the one taken: its collective is in the program (the dense loss under jit on a
  # placed batch gives the same numbers, so the comparison alone would not show it).
  collective = "collective_permute" if loss == "siglip" else "all_gather"
  assert collective in value_grad(task).lower(params, placed).as_text()
  (v_sharded, g_sharded) = value_grad(task)(params, placed)
  config.model.loss_impl = "dense"
  assert collective not in value_grad(task).lower(params, batch).as_text()
  (v_dense, g_dense) = value_grad(task)(params, batch)
  np.testing.assert_allclose(v_sharded, v_dense, rtol=3e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g_sharded), jax.tree_util.tree_leaves(g_dense)):
    # relative to each leaf's scale: the sharded sums round differently with the core count
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
  if loss == "siglip" and not tower:
    report = task.finish(params)  # the zero-shot table (untrained: near chance, but complete)
    assert "zero_shot_accuracy" in report and "text_to_image_R@5" in report


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_batches_pair_each_image_with_its_caption_and_shared_captions_are_no_negatives(tfds_dir,
                                                                                       loss):
  """Row r of a batch is image n of the split with caption n's tokens (train and eval batches);
  caption_ids are equal exactly where the token rows are; and the task's loss leaves pairs of one
  caption out of each other's negatives (digits: 60 captions, so a batch of 32 repeats some)."""
  from jaxlab.losses import contrastive
  config = load_config("contrastive_digits", TINY + [f"--config.data.data_dir={tfds_dir}",
                                                     f"--config.model.loss={loss}",
                                                     "--config.model.loss_impl=dense"])
  task = ct.build(config)
  for pairs, batch in ((task.train_pairs, next(task.train_iterator())),
                       (task.test_pairs, next(task.eval_iterator()))):
    tokens_N = task.tokens(pairs.captions)
    for r in range(len(batch["images"])):
      same_image = np.flatnonzero((pairs.images_NHWC == batch["images"][r]).all(axis=(1, 2, 3)))
      assert any((tokens_N[n] == batch["tokens"][r]).all() for n in same_image), r
    same_tokens = (batch["tokens"][:, None] == batch["tokens"][None]).all(-1)
    np.testing.assert_array_equal(batch["caption_ids"][:, None] == batch["caption_ids"][None],
                                  same_tokens)
  assert (same_tokens.sum() - len(same_tokens)) > 0  # the eval batch does repeat captions
  params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x),
                                  task.init_params(jax.random.PRNGKey(0)),
                                  is_leaf=lambda x: hasattr(x, "value"))
  if loss == "siglip":  # at the init bias -10 a negative's term is ~5e-5: make them count
    params = {**params, "bias": np.float32(0.0)}
  image_BE, text_BE = task.model.apply({"params": params}, batch["images"], batch["tokens"])
  scalars = ([params["log_scale"]] if loss == "clip" else
             [params["log_temperature"], params["bias"]])
  fn = contrastive.clip_loss if loss == "clip" else contrastive.siglip_loss
  with_ids = fn(image_BE, text_BE, *scalars, text_ids_B=batch["caption_ids"])
  value = task.loss(params, batch, jax.random.PRNGKey(0), train=False)[0]
  np.testing.assert_allclose(value, with_ids, rtol=1e-6)
  assert not np.isclose(value, fn(image_BE, text_BE, *scalars), rtol=1e-3)


def test_zero_shot_accuracy_and_recall_by_hand():
  e = np.eye(3)
  image_NE = np.array([e[0], e[1], e[2], e[0]])
  prompt_CTE = np.stack([np.stack([e[c], e[c]]) for c in range(3)])
  assert ct.zero_shot_accuracy(image_NE, prompt_CTE, [0, 1, 2, 1]) == 0.75
  # Classes are compared by direction: class 0's prompts average to 3 e0, class 1's to e1; the image
  # (0.4, 0.6) is closer in angle to e1, though its dot product with 3 e0 is larger.
  image = np.array([[0.4, 0.6, 0.0]]) / np.linalg.norm([0.4, 0.6])
  prompts = np.stack([np.stack([3 * e[0], 3 * e[0]]), np.stack([e[1], e[1]]),
                      np.stack([e[2], e[2]])])
  assert ct.zero_shot_accuracy(image, prompts, [1]) == 1.0
  # Text candidates: groups 10, 11, 12 embedded on axes 0, 1, 2. Image 3 (axis 0) belongs to group 11.
  groups_img = np.array([10, 11, 12, 11])
  text_CE, groups_txt = np.array([e[0], e[1], e[2] - 0.1 * e[0]]), np.array([10, 11, 12])
  assert ct.recall_at_k(image_NE, text_CE, groups_img, groups_txt, 1) == 0.75
  assert ct.recall_at_k(image_NE, text_CE, groups_img, groups_txt, 2) == 1.0  # image 3: 10, then 11
  # Caption 10 (axis 0) ties image 0 (group 10) with image 3 (group 11): a miss at k = 1 (a hit when
  # ties went to the lower index).
  assert ct.recall_at_k(text_CE, image_NE, groups_txt, groups_img, 1) == pytest.approx(2 / 3)
  assert ct.recall_at_k(text_CE, image_NE, groups_txt, groups_img, 2) == 1.0
  captions, groups, rows = ct.unique_captions(["a", "b", "a", "c"], [1, 2, 1, 3])
  assert captions == ["a", "b", "c"] and groups.tolist() == [1, 2, 3] and rows.tolist() == [1, 2, 1, 3]
  # Two emoji of one name (groups 5 and 7 share "x"; 7 and 9 share "y"): one group for recall, so an
  # image of 7 or 9 finds "x" (it was a miss: the caption kept group 5 only).
  captions, groups, rows = ct.unique_captions(["x", "y", "x", "y", "z"], [5, 7, 7, 9, 4])
  assert captions == ["x", "y", "z"] and groups.tolist() == [5, 5, 4]
  assert rows.tolist() == [5, 5, 5, 5, 4]
  image_NE = np.array([e[0], e[1], e[2]])  # images of groups 9, 5 and 4, on the caption axes
  text_CE = np.array([e[0], e[1], e[2]])  # "x", "y", "z"
  assert ct.recall_at_k(image_NE, text_CE, np.array([5, 5, 4]), groups, 1) == 1.0
  # A tie with another group's candidate is a miss at k = 1, whichever comes first (it was a hit
  # when the query's own candidate had the lower index); a query whose group has no candidate misses.
  for order in ([0, 1], [1, 0]):
    assert ct.recall_at_k(e[:1], np.array([e[0], e[0]]), [3], np.array([3, 8])[order], 1) == 0.0
    assert ct.recall_at_k(e[:1], np.array([e[0], e[0]]), [3], np.array([3, 8])[order], 2) == 1.0
  assert ct.recall_at_k(e[:1], e, [6], [0, 1, 2], 3) == 0.0


@pytest.mark.parametrize("override,key", [
    ("--config.model.patch=3", "config.model.patch"),
    ("--config.model.loss=triplet", "config.model.loss"),
    ("--config.model.text_heads=5", "config.model.text_heads"),
    ("--config.data.text_len=1", "config.data.text_len"),
    ("--config.data.text_len=200000", "config.data.text_len=200000 must be <= 4096"),
    ("--config.data.batch_size=1", "config.data.batch_size"),
    ("--config.eval.recall_at=(5, 1)", "config.eval.recall_at"),
    ("--config.train.keep_best=True", "config.train.keep_best"),
    ("--config.eval.recall_at=(1.5,)", "config.eval.recall_at"),
    ("--config.eval.recall_at=(1, 'a')", "config.eval.recall_at"),
])
def test_config_errors_name_the_key(override, key):
  with pytest.raises(ConfigError) as err:
    load_config("contrastive_digits", [override], check_devices=False)
  assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,problem", [
    (["--config.model.image_window=3"], "window=3 does not divide stage 0's 4x4 map"),
    (["--config.model.patch=1", "--config.model.image_stages=5"], "stage 4 would merge an odd 1x1"),
    (["--config.model.image_stages=0"], "config.model.image_stages=0 must be a positive int"),
])
def test_swin_geometry_errors_name_the_keys(overrides, problem):
  with pytest.raises(ConfigError) as err:
    load_config("contrastive_digits", ["--config.model.image_encoder=swin"] + overrides,
                check_devices=False)
  assert problem in str(err.value) and "\n" not in str(err.value)
  if "positive" not in problem:
    assert "config.model.image_encoder='swin'" in str(err.value)


def test_mixed_precision_towers_give_float32_embeddings_and_float32s_loss(tfds_dir):
  """model.dtype: the towers compute in bfloat16/float16 from the same float32 parameters; the
  embeddings (and so the loss) are float32, and the loss is float32's to low precision. float16
  turns on loss scaling (auto)."""
  import dataclasses
  from jaxlab.train import loss_scale
  config = load_config("contrastive_digits", TINY + [f"--config.data.data_dir={tfds_dir}",
                                                     "--config.model.loss_impl=dense"])
  task = ct.build(config)
  params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x),
                                  task.init_params(jax.random.PRNGKey(0)),
                                  is_leaf=lambda x: hasattr(x, "value"))
  batch = next(task.train_iterator())
  losses = {}
  for dtype in ("float32", "bfloat16", "float16"):
    override = load_config("contrastive_digits", TINY + [f"--config.model.dtype={dtype}"])
    assert loss_scale.enabled(override) is (dtype == "float16")
    model_config = ct.model_config(override, task.tokenizer.size)
    assert model_config == dataclasses.replace(task.model.config, dtype=np.dtype(dtype))
    task.model = task.model.clone(config=model_config)  # the task of that config, same data
    image_NE, text_NE = jax.eval_shape(
        lambda p, b: task.model.apply({"params": p}, b["images"], b["tokens"]), params, batch)
    assert image_NE.dtype == text_NE.dtype == np.float32
    losses[dtype] = float(jax.jit(lambda p, b: task.loss(p, b, jax.random.PRNGKey(0),
                                                           train=False)[0])(params, batch))
  assert losses["bfloat16"] != losses["float32"] != losses["float16"]  # they did compute in them
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
  np.testing.assert_allclose(losses["float16"], losses["float32"], rtol=5e-3)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_trainer_optimizer_clips_clip_log_scale_in_place(tfds_dir, tmp_path, loss):
  """The trainer's optimizer for CLIP keeps log_scale at or below log 100 after a step that pushes it
  up, whatever Adam's step (OpenCLIP's clamp_ after each step); SigLIP's parameters are not bounded."""
  from jaxlab.losses import contrastive
  from jaxlab.train import trainer
  config = load_config("contrastive_digits", TINY + [f"--config.data.data_dir={tfds_dir}",
                                                     f"--config.model.loss={loss}",
                                                     "--config.optim.lr=1.0"])
  run = trainer.setup(config, tmp_path / "run")
  try:
    params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x),
                                    run.task.init_params(jax.random.PRNGKey(0)),
                                    is_leaf=lambda x: hasattr(x, "value"))
    bound = contrastive.CLIP_MAX_LOG_SCALE
    name = "log_scale" if loss == "clip" else "log_temperature"
    params[name] = jax.numpy.float32(bound - 1e-3)
    grads = jax.tree_util.tree_map(jax.numpy.zeros_like, params)
    grads[name] = jax.numpy.float32(-1.0)  # descent pushes the parameter up
    state = run.tx.init(params)
    for _ in range(3):
      updates, state = run.tx.update(grads, state, params)
      params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    if loss == "clip":
      assert float(params[name]) == pytest.approx(bound)
    else:
      assert float(params[name]) > bound  # only CLIP's scale has a bound
  finally:
    run.checkpointer.close()


def test_metric_inputs_of_the_wrong_length_are_named():
  """A labels or groups array that would broadcast (length 1) or not line up is refused by name."""
  e = np.eye(3)
  image_NE, prompt_CTE = np.array([e[0], e[1], e[2], e[0]]), np.stack([e[None, c] for c in range(3)])
  for labels in ([0], [0, 1, 2]):
    with pytest.raises(ValueError, match="labels_N"):
      ct.zero_shot_accuracy(image_NE, prompt_CTE, labels)
  with pytest.raises(ValueError, match="query_groups_Q"):
    ct.recall_at_k(image_NE, e, [0], [0, 1, 2], k=1)
  with pytest.raises(ValueError, match="candidate_groups_C"):
    ct.recall_at_k(image_NE, e, [0, 1, 2, 0], [0, 1], k=1)
  with pytest.raises(ValueError, match="query_QE"):
    ct.recall_at_k(e[0], e, [0], [0, 1, 2], k=1)


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_sharded_training_equals_single_device_step_for_step(tfds_dir, loss,
                                                          assert_sharded_training_matches):
  """Three trainer steps on a data 4 x fsdp 2 mesh (chunked SigLIP / all-gathered CLIP, parameters
  sharded by fsdp) give the 1-device run's losses and parameters."""
  assert_sharded_training_matches("contrastive_digits", TINY + [
      f"--config.data.data_dir={tfds_dir}", f"--config.model.loss={loss}",
      "--config.train.eval_batches=1"])


@pytest.mark.parametrize("overrides,key", [
    (["--config.model.image_rope_theta=5.0"], "config.model.image_rope_theta=5.0 applies to"),
    (["--config.model.image_window=2"], "config.model.image_window=2 applies to"),
    (["--config.model.image_stages=5"], "config.model.image_stages=5 applies to"),
    (["--config.model.image_encoder=swin", "--config.model.image_position=rope2d"],
     "config.model.image_position='rope2d' applies to config.model.image_encoder='vit'"),
    (["--config.data.path=/nowhere"], "config.data.path='/nowhere' applies to config.data.name="
                                      "'emoji', not 'digits'"),
])
def test_image_options_of_the_other_encoder_are_refused_for_a_new_run(overrides, key):
  """They trained without a word (ignored): Swin's window with the ViT, the ViT's positions with
  Swin, a RoPE base without rope2d, a data path with the digits."""
  from jaxlab.configs import ConfigError
  with pytest.raises(ConfigError, match=re.escape(key)):
    load_config("contrastive_digits", overrides, check_devices=False)
  load_config("contrastive_digits", ["--config.model.image_position=rope2d",
                                     "--config.model.image_rope_theta=5.0"], check_devices=False)



def test_embedding_in_batches_cuts_a_batch_larger_than_the_input():
  """eval.batch_size=10**8 trained the whole run and then padded the test images to 10**8 rows."""
  x = np.arange(10, dtype=np.float32)[:, None]
  calls = []
  def fn(params, chunk):
    calls.append(len(chunk))
    return chunk * 2
  np.testing.assert_array_equal(ct._in_batches(fn, None, x, 10**8), x * 2)
  np.testing.assert_array_equal(ct._in_batches(fn, None, x, 4), x * 2)
  assert calls == [10, 4, 4, 4]
