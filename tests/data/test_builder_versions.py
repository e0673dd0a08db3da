"""Each of jaxlab's TFDS builders writes, for fixed inputs, exactly the examples and metadata pinned
here for its VERSION. TFDS keeps a build under its version and reuses it, so a change to what a
builder writes must come with a new VERSION (and RELEASE_NOTES entry): else a machine with a build
prepared by an earlier jaxlab goes on reading the old examples. When this test fails after such a
change, raise the builder's VERSION, say what changed in RELEASE_NOTES, and pin the new digest."""

import hashlib
import json

import numpy as np
import pytest

from jaxlab.data import caption_pairs as cp
from jaxlab.data import text_builders as tb

PINNED = {  # builder class name: (VERSION, digest of its examples and metadata for the inputs below)
    "JaxlabTextFiles": ("1.0.0", "07b70ecbb6a9848c"),
    "JaxlabPythonStdlib": ("1.1.0", "9ade83d59f5673b5"),
    "JaxlabDigitCaptions": ("1.0.0", "3805d35359728e96"),
    "JaxlabEmojiCaptions": ("1.1.0", "7431a66c5507ea77"),
}


def _text_files(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("".join(f"line {i}: the quick brown fox {'é' * (i % 3)}\n" for i in range(300)))
  return tb.JaxlabTextFiles(config=tb.text_files_config([str(path)]), data_dir=str(tmp_path / "tfds"),
                             file_format="array_record")


def _python_stdlib(tmp_path):
  root = tmp_path / "src"
  for i in range(30):
    (root / "pkg").mkdir(parents=True, exist_ok=True)
    # one line each, no newline: the blank line that joins them must still be in the alphabet (1.1.0)
    (root / "pkg" / f"m{i}.py").write_text(f"value_{i} = {i * 7919}  # module {i}")
  return tb.JaxlabPythonStdlib(config=tb.stdlib_config(str(root)), data_dir=str(tmp_path / "tfds"),
                             file_format="array_record")


def _digit_captions(tmp_path):
  return cp.JaxlabDigitCaptions(data_dir=str(tmp_path / "tfds"),
                             file_format="array_record")


def _emoji_captions(tmp_path):
  from PIL import Image
  root = tmp_path / "emoji"
  root.mkdir()
  # 16 emoji in a 4 x 4 grid of 34-px cells; 1F60D and 1F610 fall in the test split
  records = [dict(unified=f"1F6{i:02X}", name=f"face {i}", category=("Smileys", "Animals")[i % 2],
                  subcategory="face", sheet_x=(i - 5) % 4, sheet_y=(i - 5) // 4)
             for i in range(5, 21)]
  records[0]["skin_variations"] = {"1F3FB": dict(sheet_x=3, sheet_y=3)}
  # 1.1.0: folded to ASCII; a shared Unicode name gives way to the short names; 1F609 drawn as the
  # test emoji 1F60D (same cell), so it joins the test split
  records[1]["name"] = "Caf\u00e9 worker\u2019s face"
  for k, short in ((2, "twin_a"), (3, "twin_b")):
    records[k].update(name="TWIN FACE", short_name=short)
  records[4].update(sheet_x=records[8]["sheet_x"], sheet_y=records[8]["sheet_y"])
  (root / "emoji.json").write_text(json.dumps(records))
  ramp = np.arange(136 * 136 * 4, dtype=np.uint32).reshape(136, 136, 4)
  for k, name in enumerate(cp.EMOJI_FILES[1:]):
    Image.fromarray(((ramp * (k + 3)) % 251).astype(np.uint8), "RGBA").save(root / name)
  return cp.JaxlabEmojiCaptions(config=cp.emoji_config(str(root)), data_dir=str(tmp_path / "tfds"),
                             file_format="array_record")


def _digest(builder) -> str:
  """sha256 over every split's examples in order (each field's values) and the metadata."""
  builder = tb.prepare(builder)
  digest = hashlib.sha256(json.dumps(dict(builder.info.metadata), sort_keys=True).encode())
  for split in sorted(builder.info.splits):
    source = builder.as_data_source(split=split)
    digest.update(f"{split}:{len(source)}".encode())
    for i in range(len(source)):
      for key, value in sorted(source[i].items()):
        value = np.asarray(value)
        digest.update(f"{key}:{value.dtype.str}:{value.shape}:".encode())
        digest.update(value.tobytes() if value.dtype != object else str(value).encode())
  return digest.hexdigest()[:16]


@pytest.mark.parametrize("make", [_text_files, _python_stdlib, _digit_captions, _emoji_captions],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_builder_s_output_changes_only_with_its_version(make, tmp_path):
  builder = make(tmp_path)
  name = type(builder).__name__
  version, digest = PINNED[name]
  assert str(builder.version) == str(type(builder).VERSION), "the config's version is the builder's"
  assert str(type(builder).VERSION) in type(builder).RELEASE_NOTES
  got = _digest(builder)
  assert (str(builder.version), got) == (version, digest), (
      f"{name} writes other examples or metadata than its VERSION {builder.version} did (a change "
      f"to the builder, or to a library it reads with: TFDS, numpy, Pillow, scikit-learn): raise "
      f"its VERSION (with a RELEASE_NOTES entry) and pin ({str(builder.version)!r}, {got!r}) here")
