"""TFDS text builders (array_record, no TensorFlow), vocabularies and the grain window pipeline."""

import itertools
import os
import pathlib
import sysconfig

import numpy as np
import pytest

import ml_collections

from jaxlab.data import pipeline, text, text_builders
from jaxlab.data.vocab import Vocab, make_vocab


def data_cfg(**kw):
  c = dict(name="text_files", path="", data_dir="", vocab="char", train_fraction=0.9)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_text_files_split_and_vocab(tiny_corpus, tfds_dir):
  corpus = text.load_corpus(data_cfg(path=str(tiny_corpus), data_dir=str(tfds_dir)))
  raw = tiny_corpus.read_text()
  cut = int(len(raw) * 0.9)
  assert corpus.vocab.alphabet == "".join(sorted(set(raw)))
  assert corpus.vocab.decode(corpus.train) == raw[:cut]
  assert corpus.vocab.decode(corpus.validation) == raw[cut:]
  byte_corpus = text.load_corpus(data_cfg(path=str(tiny_corpus), data_dir=str(tfds_dir),
                                          vocab="byte"))
  assert byte_corpus.vocab.size == 256 and len(byte_corpus.train) == cut


def test_building_a_dataset_leaves_no_temporary_directories(tiny_corpus, tfds_dir, tmp_path,
                                                            monkeypatch):
  # TFDS's builder looks up pre-computed metadata in its GCS bucket (off by default) through a fresh
  # temporary directory that it never removes; jaxlab's builders skip the lookup.
  import tempfile
  temp_root = tmp_path / "temp_root"
  temp_root.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
  text.load_corpus(data_cfg(path=str(tiny_corpus), data_dir=str(tfds_dir)))
  assert list(temp_root.iterdir()) == []


def test_python_stdlib_corpus_is_split_by_file(tfds_dir):
  """The default corpus: every file is in exactly the split its path hashes to."""
  cfg = data_cfg(name="python_stdlib", data_dir=str(tfds_dir), vocab="byte")
  a = text.load_corpus(cfg)
  train, validation = a.vocab.decode(a.train), a.vocab.decode(a.validation)
  base = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = text_builders.stdlib_files()
  val_files = [f for f in files if text_builders.is_validation_file(str(f.relative_to(base)))]
  assert 0.05 < len(a.validation) / (len(a.train) + len(a.validation)) < 0.2
  assert len(a.train) > 1_000_000 and val_files
  big = lambda fs: [f.read_bytes().decode("utf-8", errors="replace") for f in fs
                    if f.stat().st_size > 2000][:5]  # whole files long enough to be unique
  for source in big(val_files):
    assert source in validation and source not in train
  for source in big([f for f in files if f not in val_files]):
    assert source in train and source not in validation


def _python_tree(root, sources):
  for name, source in sources.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(source)


def test_a_python_source_tree_is_deterministic_split_by_file_and_rebuilt_when_edited(tmp_path):
  """data.path = a source tree: the same arrays from two separate builds, each file in the split its
  path hashes to, and an edit that keeps a file's size is read (it was served from the old build)."""
  names = [f"pkg/m{i}.py" for i in range(40)]
  val = [n for n in names if text_builders.is_validation_file(n)]
  assert val and len(val) < len(names)
  root = tmp_path / "src"
  sources = {n: f"# {n}\nvalue_{i} = {i * 7919}\n" for i, n in enumerate(names)}
  _python_tree(root, sources)
  cfg = lambda d: data_cfg(name="python_stdlib", path=str(root), data_dir=str(tmp_path / d),
                           vocab="byte")
  a, b = text.load_corpus(cfg("one")), text.load_corpus(cfg("two"))
  np.testing.assert_array_equal(a.train, b.train)
  np.testing.assert_array_equal(a.validation, b.validation)
  train, validation = a.vocab.decode(a.train), a.vocab.decode(a.validation)
  for n in names:
    assert (f"# {n}\n" in validation) == (n in val) and (f"# {n}\n" in train) == (n not in val)
  # Exactly: the files in sorted order, joined by a blank line (a single newline passed).
  assert train == "\n\n".join(sources[n] for n in sorted(set(names) - set(val)))
  assert validation == "\n\n".join(sources[n] for n in sorted(val))
  first = root / names[0]
  edited = first.read_text().replace("value_0", "VALUE_0")
  mtime = first.stat().st_mtime_ns
  first.write_text(edited)  # same size
  os.utime(first, ns=(mtime + 10**9, mtime + 10**9))  # later, even where timestamps are coarse
  again = text.load_corpus(cfg("one"))
  assert "VALUE_0" in again.vocab.decode(np.concatenate([again.train, again.validation]))


def test_a_file_of_several_chunks_reads_back_in_order(tfds_dir, tmp_path):
  """Files are stored in CHUNK_CHARS pieces: the split must join them in file order (TFDS shuffles
  examples unless told not to), so the train and validation text are the file's own."""
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(1, 9))) for _ in range(200)]
  raw = " ".join(f"{i}:{words[i % 200]}" for i in range(3 * text_builders.CHUNK_CHARS // 8))
  assert len(raw) > 2 * text_builders.CHUNK_CHARS  # three chunks at least
  path = tmp_path / "long.txt"
  path.write_text(raw)
  corpus = text.load_corpus(data_cfg(path=str(path), data_dir=str(tfds_dir)))
  cut = int(len(raw) * 0.9)
  assert corpus.vocab.decode(corpus.train) == raw[:cut]
  assert corpus.vocab.decode(corpus.validation) == raw[cut:]


def test_shared_tiny_shakespeare_split_matches_the_usual_one(tfds_dir):
  from conftest import SHARED_DATA
  path = SHARED_DATA / "tinyshakespeare" / "input.txt"
  if not path.exists():
    pytest.skip("../shared/data is not beside the repo")
  corpus = text.load_corpus(data_cfg(name="tiny_shakespeare", path=str(path),
                                     data_dir=str(tfds_dir)))
  assert corpus.vocab.size == 65
  assert (len(corpus.train), len(corpus.validation)) == (1003854, 111540)


def test_missing_file_is_reported(tfds_dir):
  with pytest.raises(FileNotFoundError, match="no_such.txt"):
    text.load_corpus(data_cfg(path="/nonexistent/no_such.txt", data_dir=str(tfds_dir)))


def test_a_path_that_is_not_a_regular_file_is_named_as_such(tfds_dir):
  """/dev/null was reported as "text file not found"."""
  with pytest.raises(ValueError, match="/dev/null is not a regular file"):
    text.load_corpus(data_cfg(path="/dev/null", data_dir=str(tfds_dir)))


def test_spaces_after_the_commas_of_several_paths_are_dropped(tiny_corpus, tfds_dir):
  """"a.txt, b.txt" looked for the file " b.txt" (made absolute: "CWD/ b.txt")."""
  from jaxlab.configs import absolute_data_path
  spaced = f"{tiny_corpus}, {tiny_corpus}"
  assert absolute_data_path(spaced, "lm") == f"{tiny_corpus},{tiny_corpus}"
  corpus = text.load_corpus(data_cfg(path=spaced, data_dir=str(tfds_dir)))
  assert len(corpus.train) + len(corpus.validation) == 2 * len(tiny_corpus.read_text())


def test_several_text_files_are_read_in_the_order_given(tfds_dir, tmp_path):
  """The order of data.path decides which text falls in the last 10% (validation): b then a, not
  sorted (one file given twice could not tell)."""
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  a.write_text("aaa, the first file by name. " * 20)
  b.write_text("BBB, the second file by name. " * 20)
  corpus = text.load_corpus(data_cfg(path=f"{b},{a}", data_dir=str(tfds_dir)))
  whole = corpus.vocab.decode(np.concatenate([corpus.train, corpus.validation]))
  assert whole == b.read_text() + a.read_text()


def test_a_damaged_prepared_dataset_names_its_folder(tiny_corpus, tmp_path):
  """A truncated array_record file gave "ArrayRecord file should be at least 64KB big" alone."""
  own_dir = str(tmp_path / "tfds")  # not the session's shared tfds_dir: this test damages it
  text.load_corpus(data_cfg(path=str(tiny_corpus), data_dir=own_dir))
  shard = next(pathlib.Path(own_dir).rglob("*train.array_record*"))
  shard.write_bytes(shard.read_bytes()[:100])
  with pytest.raises(ValueError, match=f"the prepared dataset in {shard.parent} could not be read "
                                       r"\(.*\); delete that folder"):
    text.load_corpus(data_cfg(path=str(tiny_corpus), data_dir=own_dir))


def test_vocab_round_trip_and_errors():
  v = make_vocab("char", ["hello world"])
  assert v.decode(v.encode("hello")) == "hello"
  with pytest.raises(ValueError, match="'z'"):
    v.encode("zz")
  b = Vocab(None)
  assert b.decode(b.encode("héllo")) == "héllo"
  assert b.decode([0xFF, 0x41]) == "\ufffdA"  # invalid UTF-8 shows (errors="ignore" dropped it)
  assert v.alphabet == " dehlorw"  # the sorted set (token ids the same in every process)


def test_windows_are_deterministic_and_resumable():
  tokens = np.arange(1000, dtype=np.int32)
  it = pipeline.train_batches(tokens, seq_len=8, batch_size=4, seed=3)
  first = [next(it) for _ in range(5)]
  for batch in first:
    assert batch["inputs"].shape == (4, 8)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
  state = it.get_state()
  rest = [next(it)["inputs"] for _ in range(3)]
  again = pipeline.train_batches(tokens, seq_len=8, batch_size=4, seed=3)
  np.testing.assert_array_equal(next(again)["inputs"], first[0]["inputs"])
  again.set_state(state)
  for want in rest:
    np.testing.assert_array_equal(next(again)["inputs"], want)
  other_seed = pipeline.train_batches(tokens, seq_len=8, batch_size=4, seed=4)
  assert not np.array_equal(next(other_seed)["inputs"], first[0]["inputs"])



def test_neighbouring_seeds_do_not_share_an_order_one_epoch_apart():
  """grain shuffles epoch e with its seed + e: with the run seed passed as it is, seed 0's second
  epoch was seed 1's first, window for window (a seed sweep saw shifted copies of one order)."""
  tokens = np.arange(40, dtype=np.int32)  # 33 windows of 8: 11 batches of 3 per epoch
  starts = lambda seed, n: np.stack([next_batch["inputs"][:, 0] for next_batch in
                                     itertools.islice(pipeline.train_batches(
                                         tokens, seq_len=7, batch_size=3, seed=seed), n)])
  seed0, seed1 = starts(0, 22), starts(1, 11)
  assert sorted(seed0[11:].ravel()) == sorted(seed1.ravel()) == list(range(33))  # whole epochs
  assert not np.array_equal(seed0[11:], seed1)
  assert not np.array_equal(seed0[:11], seed0[11:])  # and each epoch is reshuffled

def test_windows_are_the_source_s_and_resume_across_epochs():
  """Each row is tokens[s : s + seq_len + 1] split into inputs and targets; an epoch visits every
  start once; a state saved just before an epoch boundary resumes to the same batches after it."""
  tokens = (np.arange(44, dtype=np.int32) * 7) % 101  # not a range: a window must come from the source
  seq_len, batch = 8, 4
  starts = len(tokens) - seq_len  # windows of seq_len + 1 tokens
  it = pipeline.train_batches(tokens, seq_len=seq_len, batch_size=batch, seed=5)
  seen, batches = [], []
  for i in range(2 * starts // batch + 2):
    b = next(it)
    batches.append(b["inputs"])
    for row_in, row_tg in zip(b["inputs"], b["targets"]):
      s = int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(tokens, seq_len) ==
                              row_in).all(axis=1))[0])
      np.testing.assert_array_equal(row_tg, tokens[s + 1:s + seq_len + 1])
      seen.append(s)
    if i == starts // batch - 1:
      state = it.get_state()  # the last batch of the first epoch (starts // batch of them)
  assert sorted(seen[:starts // batch * batch]) == sorted(set(seen[:starts // batch * batch]))
  assert set(seen) == set(range(starts))
  again = pipeline.train_batches(tokens, seq_len=seq_len, batch_size=batch, seed=5)
  again.set_state(state)
  for want in batches[starts // batch:]:
    np.testing.assert_array_equal(next(again)["inputs"], want)


def test_eval_batches_are_fixed():
  tokens = np.arange(500, dtype=np.int32)
  a = list(pipeline.eval_batches(tokens, seq_len=8, batch_size=4, num_batches=3, seed=0))
  b = list(pipeline.eval_batches(tokens, seq_len=8, batch_size=4, num_batches=3, seed=0))
  assert len(a) == 3
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  # The seed chooses the windows (a shuffled sample of the split, not its first windows in order).
  c = list(pipeline.eval_batches(tokens, seq_len=8, batch_size=4, num_batches=3, seed=1))
  assert not all(np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c))
  starts = np.concatenate([x["inputs"][:, 0] for x in a])
  assert not np.array_equal(starts, np.sort(starts))
  np.testing.assert_array_equal(np.concatenate([x["targets"] for x in a]),
                                np.concatenate([x["inputs"] for x in a]) + 1)


def test_too_short_split_is_reported():
  with pytest.raises(ValueError, match="too short"):
    pipeline.train_batches(np.arange(5, dtype=np.int32), seq_len=8, batch_size=2, seed=0)


def test_tfds_tiny_shakespeare_offline_fails_at_once_naming_the_way_out(tfds_dir, monkeypatch):
  """No local path and no network: one error within seconds (TFDS alone retries for minutes)."""
  import time

  def no_network(*args, **kwargs):
    raise OSError("network is unreachable")

  monkeypatch.setattr(text.socket, "create_connection", no_network)
  start = time.perf_counter()
  with pytest.raises(RuntimeError, match="--config.data.path=") as error:
    text.load_corpus(data_cfg(name="tiny_shakespeare", path="", data_dir=str(tfds_dir)))
  assert "not reachable" in str(error.value)
  assert time.perf_counter() - start < 30


def test_prepare_reads_the_files_another_process_just_finished():
  """Two processes preparing one dataset: the later rename fails with FileExistsError; the dataset
  is there all the same, so that process goes on (any other failure still raises)."""
  class Racing:
    def __init__(self, prepared):
      self.prepared = prepared

    def download_and_prepare(self):
      raise FileExistsError("Cannot rename ...incomplete...: 1.0.0 already exists")

    def is_prepared(self):
      return self.prepared

  racing = Racing(prepared=True)
  assert text_builders.prepare(racing) is racing
  with pytest.raises(FileExistsError):
    text_builders.prepare(Racing(prepared=False))


def test_prepare_blames_data_dir_only_for_its_own_paths(tmp_path):
  """An OS error with no file name (PIL's unreadable image) was reported as config.data.data_dir
  failing to hold the builds."""
  class Failing:
    def __init__(self, error):
      self.error = error

    def download_and_prepare(self):
      raise self.error

  import errno
  with pytest.raises(OSError, match=r"^\[Errno None\] cannot identify image file$"):
    text_builders.prepare(Failing(OSError(None, "cannot identify image file")), str(tmp_path))
  with pytest.raises(OSError, match=r"config\.data\.data_dir=.* cannot hold the dataset builds"):
    text_builders.prepare(Failing(OSError(errno.EACCES, "denied", str(tmp_path / "x"))),
                          str(tmp_path))
  with pytest.raises(OSError, match=r"^\[Errno 2\] gone: '/elsewhere'$"):
    text_builders.prepare(Failing(OSError(errno.ENOENT, "gone", "/elsewhere")), str(tmp_path))
