"""Unusable data files fail with one line that names the file and config.data.path, before TFDS builds."""

import ml_collections
import pytest

from jaxlab.data import binary_images, text


def data_cfg(path, tfds_dir):
  return ml_collections.ConfigDict(dict(name="text_files", path=str(path), data_dir=str(tfds_dir),
                                        vocab="char", train_fraction=0.9))


def test_empty_text_file_is_reported_in_one_line(tmp_path, tfds_dir):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(ValueError, match=r"config\.data\.path=.*empty\.txt.*is empty") as info:
    text.load_corpus(data_cfg(empty, tfds_dir))
  assert "\n" not in str(info.value)
  assert not any(tfds_dir.rglob("*empty*"))  # TFDS was never asked to build it


def test_text_too_short_to_split_is_reported(tmp_path, tfds_dir):
  short = tmp_path / "short.txt"
  short.write_text("a")
  with pytest.raises(ValueError, match=r"config\.data\.path=.*short\.txt.*1 characters are too few"):
    text.load_corpus(data_cfg(short, tfds_dir))


def test_missing_text_file_names_the_key(tmp_path, tfds_dir):
  with pytest.raises(FileNotFoundError, match=r"config\.data\.path=.*nope\.txt"):
    text.load_corpus(data_cfg(tmp_path / "nope.txt", tfds_dir))



def test_a_directory_given_as_a_text_file_is_named_as_one(tmp_path, tfds_dir):
  """It was reported as 'text file not found' although the path exists."""
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "a.txt").write_text("some text\n" * 20)
  with pytest.raises(ValueError, match=r"config\.data\.path=.*texts.*is a directory; text_files "
                                       r"reads text files"):
    text.load_corpus(data_cfg(tmp_path / "texts", tfds_dir))


def stdlib_cfg(root, tfds_dir):
  return ml_collections.ConfigDict(dict(name="python_stdlib", path=str(root), data_dir=str(tfds_dir),
                                        vocab="char", train_fraction=0.9))


@pytest.mark.parametrize("names,split", [(("a.py", "b.py", "c.py"), "training"), (("v.py",),
                                                                                   "validation")])
def test_a_source_tree_whose_files_all_fall_in_one_split_is_refused(tmp_path, tfds_dir, names,
                                                                     split):
  """crc32 puts a.py, b.py, c.py in training and v.py in validation: TFDS failed with an
  AssertionError about an empty split that named no key."""
  for name in names:
    (tmp_path / name).write_text("x = 1\n" * 30)
  with pytest.raises(ValueError, match=rf"config\.data\.path=.*all {len(names)} \.py files fall in "
                                       rf"the {split} split") as info:
    text.load_corpus(stdlib_cfg(tmp_path, tfds_dir))
  assert "\n" not in str(info.value)


def test_sources_without_a_newline_load(tmp_path, tfds_dir):
  """The files are joined by a blank line, which was missing from a vocabulary built from sources
  that have no newline ("character '\\n' is not in the vocabulary")."""
  for name in ("a.py", "b.py", "v.py"):
    (tmp_path / name).write_text("x=1;" * 40)
  corpus = text.load_corpus(stdlib_cfg(tmp_path, tfds_dir))
  assert "\n" in corpus.vocab.decode(corpus.train)

@pytest.mark.parametrize("content", [b"this is not a mat file, just some text\n" * 8, b"x"])
def test_caltech_non_mat_file_names_the_file_and_key(tmp_path, content):
  bad = tmp_path / "silhouettes.txt"
  bad.write_bytes(content)
  with pytest.raises(ValueError, match=r"silhouettes\.txt \(config\.data\.path\) is not a "
                                       r"Caltech-101 Silhouettes") as info:
    binary_images.load("caltech", path=str(bad))
  assert "\n" not in str(info.value)


def test_a_data_dir_that_cannot_hold_builds_names_the_key(tmp_path):
  """TFDS's error named only the path ('[Errno 20] Not a directory')."""
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("some text to split\n" * 20)
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(OSError, match=r"config\.data\.data_dir='.*a_file/sub' cannot hold the dataset "
                                    r"builds: Not a directory"):
    text.load_corpus(data_cfg(corpus, blocker / "sub"))
