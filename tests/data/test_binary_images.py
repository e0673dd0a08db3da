"""Binary datasets: IDX reading (incl. MNIST's three-piece training file), binarisation protocols,
seeded splits, batch iterators that resume exactly, and the shared data files when present."""

import gzip
import pathlib

import numpy as np
import pytest

from jaxlab.data import binary_images as bi

SHARED = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _write_idx(path, array, compress):
  header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
  raw = header + array.astype(np.uint8).tobytes()
  path.write_bytes(gzip.compress(raw) if compress else raw)


def test_read_idx_and_three_piece_training_images(tmp_path):
  rng = np.random.default_rng(0)
  pieces = [rng.integers(0, 256, (n, 4, 3)) for n in (2, 3, 1)]
  for i, p in enumerate(pieces):
    _write_idx(tmp_path / f"train-images-idx3-ubyte.part{i}.gz", p, compress=True)
  test = rng.integers(0, 256, (5, 4, 3))
  _write_idx(tmp_path / "t10k-images-idx3-ubyte", test, compress=False)
  train, got_test = bi.mnist_grey(tmp_path)
  np.testing.assert_array_equal(train, np.concatenate(pieces))
  np.testing.assert_array_equal(got_test, test)
  (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00")
  with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
    bi.read_idx(tmp_path / "bad")
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    bi.mnist_grey(tmp_path / "missing")


def test_dynamic_binarisation_is_fresh_each_epoch_and_resumes_exactly():
  p = np.full((10, 50), 0.5, np.float32)
  batches = bi.TrainBatches(p, batch_size=10, seed=3, dynamic=True)
  first, second = next(batches)["x"], next(batches)["x"]  # epoch 0, epoch 1 (same rows)
  assert set(np.unique(first)) == {0.0, 1.0}
  assert not np.array_equal(np.sort(first, 0), np.sort(second, 0))
  assert abs(first.mean() - 0.5) < 0.1
  state = batches.get_state()
  expected = next(batches)["x"]
  fresh = bi.TrainBatches(p, batch_size=10, seed=3, dynamic=True)
  fresh.set_state(state)
  np.testing.assert_array_equal(next(fresh)["x"], expected)
  # Within an epoch each batch draws its own noise (the rows here are all alike, so a noise seed
  # shared by the batches of an epoch would give them equal pixels).
  halves = bi.TrainBatches(p, batch_size=5, seed=3, dynamic=True)
  assert not np.array_equal(next(halves)["x"], next(halves)["x"])
  # static data is passed through unchanged (a permutation of the rows)
  static = (np.arange(40).reshape(8, 5) % 2).astype(np.float32)
  rows = next(bi.TrainBatches(static, batch_size=8, seed=0, dynamic=False))["x"]
  np.testing.assert_array_equal(np.sort(rows.sum(1)), np.sort(static.sum(1)))


def test_batches_are_bernoulli_of_the_grey_levels_reshuffled_per_epoch_and_resume_mid_epoch():
  """At p = 0.5 everywhere (the test above) an inverted draw (U > p: the negative images) has the same
  distribution, one batch per epoch hid a permutation repeated every epoch, and a resume one batch
  late rolled over into the same next batch: all three passed."""
  grey = np.tile(np.array([0.0, 1.0, 0.9], np.float32), (10, 1))  # columns p = 0, 1, 0.9
  x = np.concatenate([next(bi.TrainBatches(grey, batch_size=10, seed=s, dynamic=True))["x"]
                      for s in range(20)])
  assert (x[:, 0] == 0).all() and (x[:, 1] == 1).all() and abs(x[:, 2].mean() - 0.9) < 0.05
  rows = np.eye(10, dtype=np.float32)  # row i identifies itself
  ids = lambda batch: np.argmax(batch["x"], axis=1).tolist()
  stream = bi.TrainBatches(rows, batch_size=5, seed=3, dynamic=False)
  epochs = [ids(next(stream)) + ids(next(stream)) for _ in range(2)]
  assert all(sorted(e) == list(range(10)) for e in epochs) and epochs[0] != epochs[1]
  mid = bi.TrainBatches(rows, batch_size=5, seed=3, dynamic=False)
  next(mid)
  state = mid.get_state()  # in the middle of epoch 0
  expected = [ids(next(mid)) for _ in range(3)]
  resumed = bi.TrainBatches(rows, batch_size=5, seed=3, dynamic=False)
  resumed.set_state(state)
  assert [ids(next(resumed)) for _ in range(3)] == expected


def test_fixed_binarisation_depends_only_on_the_seed():
  p = np.random.default_rng(0).random((20, 30)).astype(np.float32)
  np.testing.assert_array_equal(bi.binarize(p, [0, 2]), bi.binarize(p, [0, 2]))
  assert not np.array_equal(bi.binarize(p, [0, 2]), bi.binarize(p, [1, 2]))


def test_eval_batches_cover_the_split_once_with_padding_weighted_zero():
  """Distinct rows (all-ones data passed batches of wrong, repeated or reordered rows)."""
  data = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
  batches = list(bi.eval_batches(data, batch_size=4))
  assert [b["x"].shape for b in batches] == [(4, 3), (4, 3)]
  weights = np.concatenate([b["weights"] for b in batches])
  np.testing.assert_array_equal(weights, [1, 1, 1, 1, 1, 1, 1, 0])
  rows = np.concatenate([b["x"] for b in batches])
  np.testing.assert_array_equal(rows[weights > 0], data)  # every row once, in order


def test_digits_binarised_at_half_and_split():
  d = bi.load("digits")
  assert (len(d.train), len(d.valid), len(d.test)) == (1347, 225, 225) and d.dim == 64
  assert set(np.unique(d.train)) == {0.0, 1.0} and not d.dynamic
  from sklearn.datasets import load_digits
  raw = load_digits().data
  assert d.train.sum() + d.valid.sum() + d.test.sum() == (raw >= 8).sum()


def test_tfds_without_prepared_data_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match="not prepared"):
    bi.load("binarized_mnist", data_dir=str(tmp_path))


def test_mnist_reads_a_given_tfds_data_dir_before_the_shared_idx_files(tmp_path):
  # A data_dir the user gave is read (here: nothing prepared in it), not silently replaced by the
  # IDX files in ../shared/data/mnist.
  with pytest.raises(FileNotFoundError, match=f"not prepared in {tmp_path}"):
    bi.load("mnist", data_dir=str(tmp_path))


@pytest.mark.skipif(not (SHARED / "nade_uci_binary").is_dir(), reason="../shared/data absent")
def test_shared_uci_and_caltech_files():
  sizes = {"dna": (1400, 600, 1186, 180), "mushrooms": (2000, 500, 5624, 112),
           "nips": (400, 100, 1240, 500)}
  for name, (a, b, c, dim) in sizes.items():
    d = bi.load(name)
    assert (len(d.train), len(d.valid), len(d.test), d.dim) == (a, b, c, dim)
    assert set(np.unique(d.test)) <= {0.0, 1.0}
  cal = bi.load("caltech")
  assert (len(cal.train), len(cal.valid), len(cal.test)) == bi.CALTECH_SPLIT
  images = cal.train.reshape(-1, 28, 28)
  assert images[:, 0, :].mean() < 0.1 < images[:, 10:18, 10:18].mean()  # object = 1, centred
  # Upright, not transposed (the file stores images column-major): objects stand on the ground,
  # so the bottom half holds more of them than the top (0.48 vs 0.43 over the file), while the
  # left and right halves are alike (0.453 vs 0.460). Transposed or upside down, both fail.
  every = np.concatenate([cal.train, cal.valid, cal.test]).reshape(-1, 28, 28)
  assert every[:, 14:].mean() - every[:, :14].mean() > 0.03
  assert abs(every[:, :, 14:].mean() - every[:, :, :14].mean()) < 0.02


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="../shared/data/mnist absent")
def test_shared_mnist_protocol():
  d = bi.load("mnist")
  assert d.dynamic and d.train.shape == (50000, 784) and d.valid.shape == d.test.shape == (10000, 784)
  assert 0.0 <= d.train.min() and d.train.max() <= 1.0 and len(np.unique(d.train)) > 2  # grey
  assert set(np.unique(d.test)) == {0.0, 1.0}
  grey_test = bi.read_idx(SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").reshape(10000, -1) / 255.0
  np.testing.assert_array_equal(d.test, bi.binarize(grey_test.astype(np.float32), [0, 2]))  # seeded
  assert abs(d.test.mean() - d.train.mean()) < 0.01
  # Train = the first 50,000 training images, valid = the last 10,000 (no image in both).
  grey_train = bi.mnist_grey(SHARED / "mnist")[0].reshape(60000, -1).astype(np.float32) / 255.0
  np.testing.assert_array_equal(d.train, grey_train[:50000])
  np.testing.assert_array_equal(d.valid, bi.binarize(grey_train[50000:], [0, 1]))


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="../shared/data/mnist absent")
def test_shared_mnist_static_protocol_binarises_the_training_images_once():
  """static=True: the published protocol, one seeded draw for the training images too; valid and test
  are the same as with dynamic training, and another seed gives another draw."""
  dynamic, static = bi.load("mnist"), bi.load("mnist", static=True)
  assert not static.dynamic and set(np.unique(static.train)) == {0.0, 1.0}
  np.testing.assert_array_equal(static.train, bi.binarize(dynamic.train, [0, 0]))
  np.testing.assert_array_equal(static.train, bi.load("mnist", static=True).train)  # fixed
  assert not np.array_equal(static.train, bi.load("mnist", static=True, binarize_seed=1).train)
  np.testing.assert_array_equal(static.valid, dynamic.valid)
  np.testing.assert_array_equal(static.test, dynamic.test)
  assert "binarised once" in static.note.split(";")[0]
  with pytest.raises(ValueError, match="mnist only"):
    bi.load("dna", static=True)


def test_data_that_is_not_binary_is_refused():
  """0/255 pixels would be scored as log p > 0 by every model."""
  ones = np.ones((4, 3), np.float32)
  with pytest.raises(ValueError, match="the valid split must hold 0/1 values"):
    bi.BinaryDataset("x", ones, 255 * ones, ones, None, False, "")
  with pytest.raises(ValueError, match="the train split must hold probabilities"):
    bi.BinaryDataset("x", 2 * ones, ones, ones, None, True, "")
  bi.BinaryDataset("x", 0.5 * ones, ones, 0 * ones, None, True, "")  # grey training data, dynamic


def test_bad_data_files_are_one_error_naming_the_file(tmp_path):
  """A truncated or foreign .npz, a missing array, 1-D arrays, splits of different widths and a
  truncated .gz were tracebacks (BadZipFile, KeyError, IndexError, EOFError), or failed only at the
  first evaluation after training."""
  ones = np.ones((6, 4), np.float32)
  with pytest.raises(ValueError, match=r"splits must be non-empty \[examples, dimensions\] arrays "
                                       r"of one width; got shapes train \(6, 4\), valid \(6, 3\)"):
    bi.BinaryDataset("x", ones, ones[:, :3], ones, None, False, "")
  good = tmp_path / "good.npz"
  np.savez(good, train_data=ones, valid_data=ones, test_data=ones)
  assert bi.load_uci("dna", str(good)).dim == 4
  cases = {"truncated.npz": good.read_bytes()[:200], "text.npz": b"not an npz at all\n"}
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
  np.savez(tmp_path / "keys.npz", a=ones)
  np.savez(tmp_path / "flat.npz", train_data=np.ones(4), valid_data=np.ones(4), test_data=np.ones(4))
  np.savez(tmp_path / "widths.npz", train_data=ones, valid_data=ones[:, :3], test_data=ones)
  for name, detail in (("truncated.npz", ""), ("text.npz", ""), ("keys.npz", "an array is missing .*train_data"),
                       ("flat.npz", "one width"), ("widths.npz", "one width")):
    with pytest.raises(ValueError, match=rf"{tmp_path / name} \(config\.data\.path\) is not a "
                                         rf"NADE/MADE UCI \.npz.*{detail}"):
      bi.load_uci("dna", str(tmp_path / name))
  import gzip
  (tmp_path / "cut.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + bytes(range(256)) * 4)[:40])
  with pytest.raises(ValueError, match=r"cut\.gz is not a readable gzip file"):
    bi.read_idx(tmp_path / "cut.gz")


def test_bad_mnist_files_name_the_file_or_folder(tmp_path):
  """A truncated IDX header was NumPy's "offset must be non-negative ..."; a missing piece of the
  training file silently gave fewer images (then "splits must be non-empty ... valid (0, 784)"),
  pieces of other image sizes NumPy's concatenate error."""
  (tmp_path / "short").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 5, 0, 0]))
  with pytest.raises(ValueError, match=r"short: IDX header cut short \(10 bytes; 3 dimensions need 16\)"):
    bi.read_idx(tmp_path / "short")
  rng = np.random.default_rng(0)
  gap = tmp_path / "gap"
  gap.mkdir()
  for i in (0, 2):
    _write_idx(gap / f"train-images-idx3-ubyte.part{i}.gz", rng.integers(0, 256, (2, 28, 28)), True)
  _write_idx(gap / "t10k-images-idx3-ubyte", rng.integers(0, 256, (2, 28, 28)), False)
  with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.part1 is missing"):
    bi.mnist_grey(gap)
  _write_idx(gap / "train-images-idx3-ubyte.part1.gz", rng.integers(0, 256, (2, 32, 32)), True)
  with pytest.raises(ValueError, match=r"part1\.gz: images of shape \(32, 32\), but "
                                       r"train-images-idx3-ubyte\.part0\.gz has \(28, 28\)"):
    bi.mnist_grey(gap)
  _write_idx(gap / "train-images-idx3-ubyte.part1.gz", rng.integers(0, 256, (2, 28, 28)), True)
  with pytest.raises(ValueError, match=r"the MNIST training images in .*gap must be \(60000, 28, "
                                       r"28\), got \(6, 28, 28\)"):
    bi.load("mnist", path=str(gap))


def test_a_caltech_file_with_x_transposed_or_not_binary_is_refused(tmp_path):
  """X stored [784, N] (MATLAB's other layout) loaded as noise; only x.size % 784 was checked."""
  import scipy.io
  x = (np.random.default_rng(0).random((30, 784)) < 0.5).astype(np.uint8)
  for name, array, detail in (("t.mat", x.T, r"X array of shape \(784, 30\) is not \[N, 784\]"),
                              ("grey.mat", 255 * x, r"values other than 0 and 1 \(range \[0, 255\]\)")):
    scipy.io.savemat(tmp_path / name, {"X": array})
    with pytest.raises(ValueError, match=rf"{name} \(config\.data\.path\) is not a Caltech.*{detail}"):
      bi.load("caltech", path=str(tmp_path / name))
  scipy.io.savemat(tmp_path / "ok.mat", {"X": np.tile(x, (300, 1))})  # > 4100 + 2264 rows
  assert bi.load("caltech", path=str(tmp_path / "ok.mat")).dim == 784


def test_a_tfds_build_without_random_access_says_how_to_prepare_it(tmp_path, monkeypatch):
  """A tfrecord build (`tfds build`'s default) raised TFDS's multi-line NotImplementedError."""
  import tensorflow_datasets as tfds

  class Builder:
    data_dir = str(tmp_path)
    info = type("Info", (), {"file_format": tfds.core.FileFormat.TFRECORD})()
    def is_prepared(self):
      return True
    def as_data_source(self, split):
      raise NotImplementedError("Random access data source for file format FileFormat.TFRECORD is "
                                "not supported.\nPossible values are: ...")

  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Builder())
  with pytest.raises(ValueError, match=r"stored as tfrecord, which has no random access: prepare it "
                                       r"with `tfds build binarized_mnist --file_format=array_record`") as e:
    bi.load("binarized_mnist", data_dir=str(tmp_path))
  assert "\n" not in str(e.value)
