"""Caption-pair data: tokenizer, the digits builder (embedded sklearn data) and the emoji source."""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
import pytest

from jaxlab.data import caption_pairs as cp

EMOJI = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "emoji_captions"


def test_tokenizer_round_trip_and_end_token():
  tok = cp.CharTokenizer()
  ids = tok.encode(["A handwritten 7", "x" * 20, "é"], 8)
  assert ids.shape == (3, 8) and ids.dtype == np.int32
  assert tok.decode(ids[0]) == "a handwr"[:7]  # 7 characters, then the end token
  assert ids[0, 7] == tok.END and ids[1, 7] == tok.END
  assert ids[2, 0] == tok.UNK and ids[2, 1] == tok.END and (ids[2, 2:] == tok.PAD).all()
  assert tok.decode(tok.encode(["the digit 3"], 16)[0]) == "the digit 3"
  with pytest.raises(ValueError, match="length must be >= 2"):
    tok.encode(["a"], 1)


def test_digit_pairs(tmp_path):
  from sklearn.datasets import load_digits
  cfg = ml_collections.ConfigDict(dict(name="digits", path="", data_dir=str(tmp_path)))
  train, test = cp.load_pairs(cfg, "train"), cp.load_pairs(cfg, "test")
  digits = load_digits()
  assert len(train) + len(test) == len(digits.target) and len(test) == 360
  np.testing.assert_array_equal(test.labels_N, digits.target[::5])
  np.testing.assert_allclose(test.images_NHWC[1, :, :, 0], digits.images[5] / 16 * 2 - 1)
  assert test.captions[1] == cp.digit_caption(5, int(digits.target[5]))
  assert cp.digit_caption(0, 7) == "a handwritten seven" and cp.digit_caption(1, 7) == "the digit 7"
  prompts = cp.class_prompts(test)
  assert len(prompts) == 10 and prompts[3][0] == "a handwritten three" and prompts[3][1] == "the digit 3"
  with pytest.raises(ValueError, match="split must be one of"):
    cp.load_pairs(cfg, "validation")


@pytest.mark.skipif(not EMOJI.is_dir(), reason="../shared/data/emoji_captions is not present")
def test_emoji_default_path_is_the_shared_folder_beside_the_checkout(tmp_path, monkeypatch):
  """contrastive_emoji's data.path "" is the shared folder beside the checkout, from any working
  directory (it was "../shared/..." relative to where the command ran)."""
  from jaxlab.configs import load_config
  monkeypatch.chdir(tmp_path)
  config = load_config("contrastive_emoji", check_devices=False)
  assert config.data.path == ""
  assert cp.builder_for(config.data).builder_config.root == str(EMOJI.resolve())


@pytest.mark.skipif(not EMOJI.is_dir(), reason="../shared/data/emoji_captions is not present")
def test_emoji_source_split_and_pixels():
  from PIL import Image
  entries = cp.emoji_entries(EMOJI)
  assert len(entries) == 3786
  assert len(cp.emoji_categories(entries)) == 10
  test_bases = {e["base"] for e in entries if cp.is_test_emoji(e["base"])}
  assert 0.05 < len(test_bases) / len({e["base"] for e in entries}) < 0.15
  skin = [e for e in entries if "skin tone" in e["caption"]]
  assert len(skin) == 1875
  # One cell against a direct crop: composite of RGBA over white.
  e = entries[100]
  x, y = e["cell"]
  img = cp._sheet_cells(EMOJI / "sheet_google_32_indexed256.png", [e["cell"]])[0]
  with Image.open(EMOJI / "sheet_google_32_indexed256.png") as im:
    crop = np.asarray(im.convert("RGBA").crop((x * 34 + 1, y * 34 + 1, x * 34 + 33, y * 34 + 33)),
                      np.float64)
  expect = crop[:, :, :3] * crop[:, :, 3:] / 255 + 255 * (1 - crop[:, :, 3:] / 255)
  assert np.abs(img.astype(np.float64) - expect).max() <= 0.5 + 1e-9


def test_split_keys_join_bases_drawn_alike_in_any_vendor():
  """a~b identical in vendor 0, b~c in vendor 1: one key (the smallest) for all three; d alone."""
  img = lambda k: np.full((2, 2, 3), k, np.uint8)
  vendor0 = [img(1), img(1), img(2), img(3)]
  vendor1 = [img(4), img(5), img(5), img(6)]
  assert cp.split_keys(["b", "a", "c", "d"], [vendor0, vendor1]) == ["a", "a", "a", "d"]
  assert cp.split_keys(["c", "b", "a"], [[img(1), img(2), img(2)], [img(3), img(3), img(4)]]) == \
      ["a", "a", "a"]
  assert cp.split_keys(["x", "y"], [[img(1), img(2)]]) == ["x", "y"]


def test_shared_names_need_distinct_short_names(tmp_path):
  """Two emoji of one Unicode name take their short names; one without a short name, or names that
  still collide, are refused naming the emoji (a caption two emoji share is a false negative)."""
  rec = lambda u, name, short=None: dict(unified=u, name=name, short_name=short)
  assert cp._emoji_names([rec("A", "X", "x_one"), rec("B", "X", "x_two"), rec("C", "Y")]) == \
      ["x one", "x two", "Y"]
  with pytest.raises(ValueError, match="emoji B shares the name 'X' .* no short_name"):
    cp._emoji_names([rec("A", "X", "x_one"), rec("B", "X")])
  with pytest.raises(ValueError, match="emoji B shares the name 'X' .* no short_name"):
    cp._emoji_names([rec("A", "X", "x_one"), rec("B", "X", None)])
  with pytest.raises(ValueError, match="emoji A and C would both be captioned 'solo'"):
    cp._emoji_names([rec("A", "X", "solo"), rec("B", "X", "x_two"), rec("C", "SOLO")])


def test_split_keys_refuses_a_vendor_with_fewer_images_than_bases():
  with pytest.raises(ValueError):
    cp.split_keys(["a", "b"], [[np.zeros((2, 2, 3), np.uint8)]])


def test_ascii_caption_folds_accents_and_quotes():
  assert cp.ascii_caption("Côte d’Ivoire, São Tomé & Príncipe, Åland") == \
      "Cote d'Ivoire, Sao Tome & Principe, Aland"
  assert cp.ascii_caption("a\u201cb\u201d") == "a'b'"  # the alphabet has no "


@pytest.mark.skipif(not EMOJI.is_dir(), reason="../shared/data/emoji_captions is not present")
def test_emoji_captions_are_unique_known_characters_and_no_drawing_straddles_the_split():
  """1.1.0: 11 non-ASCII characters were unknown tokens (the curly apostrophe although ' is in the
  alphabet), two base emoji were both 'man in tuxedo', and 9 groups of byte-identical drawings (the
  flags of France / St. Martin / Clipperton, Twemoji's families) had members on both sides."""
  entries = cp.emoji_entries(EMOJI)
  tokens = cp.CharTokenizer().encode([e["caption"] for e in entries], 128)
  assert not (tokens == cp.CharTokenizer.UNK).any()
  assert len({e["caption"] for e in entries}) == len(entries)
  tuxedo = {e["base"]: e["caption"] for e in entries if "tuxedo" in e["caption"] and "tone" not in e["caption"]}
  assert tuxedo["1F935"].startswith("person in tuxedo,")
  assert tuxedo["1F935-200D-2642-FE0F"].startswith("man in tuxedo,")
  assert any(e["caption"].startswith("cote d'ivoire flag,") for e in entries)
  images = cp.emoji_images(EMOJI, entries)
  keys = cp.split_keys([e["base"] for e in entries], images)
  for vendor_images in images:
    sides: dict = {}
    for key, image in zip(keys, vendor_images):
      sides.setdefault(image.tobytes(), set()).add(cp.is_test_emoji(key))
    assert all(len(s) == 1 for s in sides.values())
  # the split is still by base emoji (a key is a base), and the old split had straddling drawings
  assert sum(k != e["base"] for k, e in zip(keys, entries)) > 0
  old_sides: dict = {}
  for e, image in zip(entries, images[0]):
    old_sides.setdefault(image.tobytes(), set()).add(cp.is_test_emoji(e["base"]))
  assert sum(len(s) == 2 for s in old_sides.values()) == 5


def test_emoji_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.path should name the folder"):
    cp.emoji_config(str(tmp_path))


@pytest.mark.skipif(not EMOJI.is_dir(), reason="../shared/data/emoji_captions is not present")
def test_emoji_pairs_end_to_end_through_load_pairs(tmp_path):
  cfg = ml_collections.ConfigDict(dict(name="emoji", path=str(EMOJI), data_dir=str(tmp_path)))
  train, test = cp.load_pairs(cfg, "train"), cp.load_pairs(cfg, "test")
  entries = cp.emoji_entries(EMOJI)
  keys = cp.split_keys([e["base"] for e in entries], cp.emoji_images(EMOJI, entries))
  n_test = sum(cp.is_test_emoji(k) for k in keys)
  assert (n_test, len(entries) - n_test) == (440, 3346)
  # Every emoji drawn by both vendors: two images per group, groups disjoint across the split.
  assert len(train) == 2 * 3346 and len(test) == 2 * 440
  assert train.images_NHWC.shape == (6692, 32, 32, 3) and train.images_NHWC.dtype == np.float32
  assert -1.0 <= train.images_NHWC.min() and train.images_NHWC.max() <= 1.0
  for pairs, n in ((train, 3346), (test, 440)):
    groups, counts = np.unique(pairs.groups_N, return_counts=True)
    assert len(groups) == n and (counts == 2).all()
  assert not set(train.groups_N.tolist()) & set(test.groups_N.tolist())
  # The two vendor images of one emoji share the group, caption and label, and are different images.
  g = int(test.groups_N[0])
  rows = np.flatnonzero(test.groups_N == g)
  assert len(rows) == 2 and test.captions[rows[0]] == test.captions[rows[1]]
  assert test.labels_N[rows[0]] == test.labels_N[rows[1]]
  assert not np.array_equal(test.images_NHWC[rows[0]], test.images_NHWC[rows[1]])
  assert test.captions[rows[0]] == entries[g]["caption"]
  assert all(not cp.is_test_emoji(keys[k]) for k in train.groups_N)
  assert all(cp.is_test_emoji(keys[k]) for k in test.groups_N)
  # no drawing is in both splits
  as_bytes = lambda pairs: {np.asarray(i).tobytes() for i in pairs.images_NHWC}
  assert not as_bytes(train) & as_bytes(test)
  # Held-out captions are unseen in training; labels index the 10 categories.
  assert not set(test.captions) & set(train.captions)
  assert len(train.class_names) == 10 and train.class_names == test.class_names
  assert train.class_names[int(train.labels_N[0])] == entries[int(train.groups_N[0])]["category"]
  assert cp.class_prompts(test)[0] == ["activities", "an emoji of activities"]


@pytest.mark.skipif(not EMOJI.is_dir(), reason="../shared/data/emoji_captions is not present")
def test_an_edited_sheet_of_the_same_size_gets_its_own_build(tmp_path):
  """The config name hashed emoji.json's bytes but only the sheets' sizes: an edit that kept a
  sheet's size was served the old build."""
  import shutil
  for name in cp.EMOJI_FILES:
    shutil.copy(EMOJI / name, tmp_path / name)
  before = cp.emoji_config(str(tmp_path)).name
  sheet = tmp_path / cp.EMOJI_FILES[1]
  data = bytearray(sheet.read_bytes())
  data[len(data) // 2] ^= 0xFF
  sheet.write_bytes(bytes(data))
  assert cp.emoji_config(str(tmp_path)).name != before


def _fake_emoji_folder(root: pathlib.Path, records=None, sheet_px: int = 68) -> pathlib.Path:
  """emoji.json with two emoji in cells (0, 0) and (1, 1) and two sheet_px-square sheets."""
  import json
  from PIL import Image
  root.mkdir(parents=True, exist_ok=True)
  if records is None:
    records = [dict(unified=f"1F60{i}", name=f"face {i}", category="Smileys", subcategory="face",
                    sheet_x=i, sheet_y=i) for i in range(2)]
  (root / "emoji.json").write_text(records if isinstance(records, str) else json.dumps(records))
  for name in cp.EMOJI_FILES[1:]:
    Image.new("RGBA", (sheet_px, sheet_px), (10, 20, 30, 255)).save(root / name)
  return root


@pytest.mark.parametrize("break_it,message", [
    (lambda root: (root / "emoji.json").write_text("{'name': 1}"), "is not emoji-datasource's JSON"),
    (lambda root: (root / "emoji.json").write_text('{"name": 1}'), "must hold a non-empty JSON list"),
    (lambda root: (root / "emoji.json").write_text('[]'), r"must hold a non-empty JSON list of emoji records, got \[\]"),
    (lambda root: _fake_emoji_folder(root, records=[dict(
        unified="1F600", name="x", category="C", subcategory="s", sheet_x=-1, sheet_y=0)]),
     "sheet_x and sheet_y must be >= 0"),
    (lambda root: (root / "emoji.json").write_text('[{"name": "x"}]'), "has no field 'unified'"),
    (lambda root: (root / cp.EMOJI_FILES[1]).write_bytes(b"not a png"), "is not a readable image"),
    (lambda root: _fake_emoji_folder(root, sheet_px=40), "is 40x40 px, too small"),
])
def test_malformed_emoji_files_are_named(tmp_path, break_it, message):
  """Each was a traceback (KeyError 'unified', a numpy broadcast error) or blamed
  config.data.data_dir (PIL's error carries no file name), through the real TFDS build."""
  root = _fake_emoji_folder(tmp_path / "emoji")
  assert [e["caption"] for e in cp.emoji_entries(root)] == ["face 0, smileys, face",
                                                            "face 1, smileys, face"]
  break_it(root)
  cfg = ml_collections.ConfigDict(dict(name="emoji", path=str(root), data_dir=str(tmp_path / "t")))
  with pytest.raises(ValueError, match=message) as info:
    cp.load_pairs(cfg, "train")
  assert "data_dir" not in str(info.value) and str(root) in str(info.value)
