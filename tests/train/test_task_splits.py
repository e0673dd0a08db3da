"""Each task evaluates and reports on the split it says it does: the LM's validation windows come
from the validation text, the contrastive zero-shot and recall metrics from the held-out test pairs
with class labels, the CPC probe fits on training digits and scores test digits, its untrained
baseline is the run's own start. (Mutations reading the other split passed every other test.)"""

import jax
import numpy as np

from jaxlab.train import lm_task


def _occurs(window, tokens) -> bool:
  views = np.lib.stride_tricks.sliding_window_view(tokens, len(window))
  return bool((views == window).all(axis=1).any())


def test_lm_evaluation_reads_the_validation_text(tiny_lm_config, tmp_path):
  text = tmp_path / "numbers.txt"  # every 16-character window occurs once in the whole text
  text.write_text(" ".join(f"{i:05d}" for i in range(3000)))
  task = lm_task.build(tiny_lm_config(f"--config.data.path={text}"))
  train, validation = np.asarray(task.corpus.train), np.asarray(task.corpus.validation)
  windows = [row for batch in task.eval_iterator() for row in np.asarray(batch["inputs"])]
  assert len(windows) == 16  # eval_batches 2 x batch 8
  assert all(_occurs(w, validation) and not _occurs(w, train) for w in windows)


def test_contrastive_zero_shot_and_recall_score_the_test_pairs_by_class(tfds_dir, monkeypatch):
  """zero_shot_accuracy gets the test images' embeddings and their class labels, recall@k the test
  captions' groups (training pairs, or caption indices as labels, passed the other tests)."""
  from jaxlab.configs import load_config
  from jaxlab.train import contrastive_task as ct
  tiny = ["--config.model.image_width=16", "--config.model.image_layers=1",
          "--config.model.image_heads=2", "--config.model.text_width=16",
          "--config.model.text_layers=1", "--config.model.text_heads=2",
          "--config.model.embed_dim=8", "--config.data.text_len=24", "--config.model.patch=4",
          "--config.eval.batch_size=512", f"--config.data.data_dir={tfds_dir}"]
  task = ct.build(load_config("contrastive_digits", tiny, check_devices=False))
  params = jax.tree.map(lambda a: getattr(a, "value", a), task.init_params(jax.random.key(0)),
                        is_leaf=lambda a: hasattr(a, "value"))
  seen = {}
  accuracy, recall = ct.zero_shot_accuracy, ct.recall_at_k
  monkeypatch.setattr(ct, "zero_shot_accuracy", lambda image_NE, prompt_PE, labels: seen.update(
      zero_shot=(image_NE, np.asarray(labels))) or accuracy(image_NE, prompt_PE, labels))
  monkeypatch.setattr(ct, "recall_at_k", lambda *args: seen.setdefault("recall", []).append(args)
                      or recall(*args))
  metrics = task.zero_shot_metrics(params)
  test = task.test_pairs
  image_NE, labels = seen["zero_shot"]
  np.testing.assert_allclose(image_NE, task.embed_images(params, test.images_NHWC), rtol=1e-6)
  np.testing.assert_array_equal(labels, test.labels_N)
  assert set(labels.tolist()) == set(range(10)) and len(labels) == len(test) == 360
  _, caption_groups, image_groups = ct.unique_captions(test.captions, test.groups_N)
  first = seen["recall"][0]  # image -> text at the first k
  np.testing.assert_array_equal(first[2], image_groups)
  np.testing.assert_array_equal(first[3], caption_groups)
  assert metrics["zero_shot_accuracy"] == accuracy(image_NE, *[
      task.embed_texts(params, [p for c in ct.caption_pairs.class_prompts(test) for p in c])
      .reshape(10, -1, image_NE.shape[-1])], test.labels_N)
  # the unseen-prompts accuracy: prompts that are no caption of either split, the same images
  unseen = ct.caption_pairs.class_prompts(test, ct.caption_pairs.DIGIT_UNSEEN_TEMPLATES)
  flat = [p for c in unseen for p in c]
  assert not set(flat) & (set(test.captions) | set(task.train_pairs.captions))
  assert set(ct.caption_pairs.class_prompts(test)[7]) <= set(task.train_pairs.captions)
  assert unseen[7] == ["a drawing of a seven", "the numeral 7", "a seven, handwritten"]
  assert metrics["zero_shot_accuracy_unseen_prompts"] == accuracy(
      image_NE, task.embed_texts(params, flat).reshape(10, -1, image_NE.shape[-1]), test.labels_N)


def test_the_cpc_probe_fits_on_training_digits_and_its_baseline_is_the_run_s_start(monkeypatch):
  """Each probe is fit on the 1,347 training digits with their labels and scored on the 225 test
  digits; the untrained features are those of initial_params() (fitting on the test split, or a
  baseline drawn from another key, passed the other tests)."""
  from jaxlab.configs import load_config
  from jaxlab.train import cpc_task
  tiny = ["--config.model.latent_dim=8", "--config.model.context_dim=16",
          "--config.model.encoder_hidden=16", "--config.data.batch_size=16"]
  task = cpc_task.build(load_config("cpc_digits", tiny, check_devices=False))
  trained = jax.tree.map(lambda a: a * 1.5, task.initial_params())  # not the start
  calls = []
  probe = cpc_task._linear_probe
  monkeypatch.setattr(cpc_task, "_linear_probe",
                      lambda *args: calls.append(args) or probe(*args))
  accuracies = task.probe_accuracies(trained)
  assert list(accuracies) == ["cpc", "untrained_cpc", "pixels"] and len(calls) == 3
  data = task.data
  wanted = {"cpc": trained, "untrained_cpc": task.initial_params()}
  for name, (fit_x, fit_y, score_x, score_y) in zip(accuracies, calls):
    assert len(fit_x) == 1347 and len(score_x) == 225, name
    np.testing.assert_array_equal(fit_y, data["train_labels"])
    np.testing.assert_array_equal(score_y, data["test_labels"])
    if name in wanted:
      np.testing.assert_allclose(fit_x, task.features(wanted[name], data["train"]), rtol=1e-6)
      np.testing.assert_allclose(score_x, task.features(wanted[name], data["test"]), rtol=1e-6)
  assert accuracies["pixels"] == probe(data["train"].reshape(1347, -1), data["train_labels"],
                                       data["test"].reshape(225, -1), data["test_labels"])
