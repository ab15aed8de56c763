"""et-prepare-data: messy image folders -> TFRecord splits the input_fns read.

The messy files are made here with Pillow: CMYK JPEG, 16-bit PNG, RGBA PNG,
grayscale, palette GIF, a truncated JPEG, a zero-byte file, a text file named
.jpg, a decompression bomb, .DS_Store, nested sub-folders.
"""
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from estimator_transfer.errors import ConfigError

from estimator_transfer.config import InputConfig
from estimator_transfer.data import images
from estimator_transfer.data import pipeline
from estimator_transfer.data import prepare
from estimator_transfer.data import sources

from conftest import run_cli

# The console script pip installed (proves the entry point is registered).
ET_PREPARE_DATA = os.path.join(os.path.dirname(sys.executable), "et-prepare-data")
# The colour each class is drawn in (RGB); conversions must keep it.
COLOURS = {"cats": (200, 30, 30), "dogs": (30, 200, 30)}


def _save(path, image, fmt, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, format=fmt, **kwargs)


def _rgb(cls, size=(20, 16)):
  return Image.new("RGB", size, COLOURS[cls])


def make_messy_folder(root, plain_per_class=6):
  """Returns {relpath: expected} with expected 'good' or 'bad' (+ ignored)."""
  expected = {}
  for cls in COLOURS:
    for i in range(plain_per_class):
      fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
      _save(os.path.join(root, cls, f"plain_{i}.{ext}"), _rgb(cls), fmt)
      expected[f"{cls}/plain_{i}.{ext}"] = "good"
  r, g, b = COLOURS["cats"]
  cmyk = Image.new("CMYK", (16, 16), (255 - r, 255 - g, 255 - b, 0))
  _save(os.path.join(root, "cats", "cmyk.jpg"), cmyk, "JPEG")
  sixteen = Image.fromarray(np.full((16, 16), 40000, np.uint16))  # 'I;16' grayscale
  _save(os.path.join(root, "cats", "nested", "deeper", "sixteen.png"), sixteen, "PNG")
  rgba = Image.new("RGBA", (16, 16), COLOURS["dogs"] + (128,))
  _save(os.path.join(root, "dogs", "rgba.png"), rgba, "PNG")
  _save(os.path.join(root, "dogs", "gray.jpg"), Image.new("L", (16, 16), 120), "JPEG")
  _save(os.path.join(root, "dogs", "palette.gif"), _rgb("dogs").convert("P", palette=Image.ADAPTIVE), "GIF")
  expected.update({"cats/cmyk.jpg": "good", "cats/nested/deeper/sixteen.png": "good",
                   "dogs/rgba.png": "good", "dogs/gray.jpg": "good",
                   "dogs/palette.gif": "good"})
  # Bad ones.
  buf = io.BytesIO()  # noise: the cut lands in the entropy-coded data
  noise = np.random.RandomState(0).randint(0, 255, (64, 64, 3)).astype(np.uint8)
  Image.fromarray(noise).save(buf, format="JPEG")
  with open(os.path.join(root, "cats", "truncated.jpg"), "wb") as f:
    f.write(buf.getvalue()[:len(buf.getvalue()) * 2 // 3])
  open(os.path.join(root, "cats", "empty.jpg"), "wb").close()
  with open(os.path.join(root, "dogs", "notes_renamed.jpg"), "w") as f:
    f.write("this is a text file, not an image\n")
  _save(os.path.join(root, "dogs", "huge.png"), Image.new("RGB", (300, 300)), "PNG")
  expected.update({"cats/truncated.jpg": "bad", "cats/empty.jpg": "bad",
                   "dogs/notes_renamed.jpg": "bad", "dogs/huge.png": "bad"})
  # Ignored ones.
  for rel in (".DS_Store", "cats/.DS_Store", "dogs/readme.txt", "cats/._plain_1.jpg"):
    with open(os.path.join(root, rel), "wb") as f:
      f.write(b"\x00\x01junk")
    expected[rel] = "ignored"
  return expected


def _config(image_dir, output_dir, **overrides):
  # max_image_pixels: the 300x300 PNG plays the decompression bomb.
  base = dict(image_dir=str(image_dir), output_dir=str(output_dir), num_shards=4,
              validation_percent=25, test_percent=0, max_bad_fraction=0.3,
              num_workers=2, max_image_pixels=200 * 200)
  base.update(overrides)
  return prepare.PrepareConfig(**base)


def _examples(split_dir):
  """relpath -> (label, text, decoded image) for every record of a split."""
  out = {}
  for path in sources.list_tfrecord_files(split_dir):
    for raw in tf.data.TFRecordDataset(path):
      ex = tf.train.Example.FromString(raw.numpy())
      f = ex.features.feature
      image = tf.io.decode_image(f["image/encoded"].bytes_list.value[0], channels=3,
                                 expand_animations=False).numpy()
      out[f["image/filename"].bytes_list.value[0].decode()] = (
          f["image/class/label"].int64_list.value[0],
          f["image/class/text"].bytes_list.value[0].decode(), image)
  return out


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
  root = tmp_path_factory.mktemp("messy")
  expected = make_messy_folder(str(root / "images"))
  out = root / "records"
  report = prepare.prepare(_config(root / "images", out), log=lambda m: None)
  return {"root": root, "images": str(root / "images"), "out": str(out),
          "expected": expected, "report": report}


def test_good_images_converted_bad_listed_with_reasons(messy):
  report, expected = messy["report"], messy["expected"]
  examples = {}
  for split in ("train", "validation"):
    examples.update(_examples(os.path.join(messy["out"], split)))
  good = {k for k, v in expected.items() if v == "good"}
  bad = {k for k, v in expected.items() if v == "bad"}
  assert set(examples) == good
  assert {e["path"] for e in report["bad_files"]} == bad
  assert report["bad"] == len(bad) == 4
  reasons = {e["path"]: e["reason"] for e in report["bad_files"]}
  assert "empty" in reasons["cats/empty.jpg"]
  assert "truncated" in reasons["cats/truncated.jpg"]
  assert "not an image" in reasons["dogs/notes_renamed.jpg"]
  assert "too large" in reasons["dogs/huge.png"]
  ignored = {e["path"] for e in report["ignored_files"]}
  assert {".DS_Store", "cats/.DS_Store", "dogs/readme.txt", "cats/._plain_1.jpg"} <= ignored
  assert sum(report["examples"].values()) == len(good)
  # Every record decodes in TF as 8-bit RGB with its class's colour.
  for rel, (label, text, image) in examples.items():
    assert image.dtype == np.uint8 and image.shape[-1] == 3
    assert text == rel.split("/")[0] and label == ["cats", "dogs"].index(text)
  np.testing.assert_allclose(examples["cats/cmyk.jpg"][2].mean((0, 1)), COLOURS["cats"],
                             atol=12)
  assert examples["cats/nested/deeper/sixteen.png"][2][0, 0, 0] == round(40000 * 255 / 65535)
  np.testing.assert_array_equal(examples["dogs/rgba.png"][2][0, 0], COLOURS["dogs"])
  np.testing.assert_array_equal(examples["dogs/palette.gif"][2][0, 0], COLOURS["dogs"])
  assert report["conversions"]["kept"] >= 12  # plain JPEG/PNG copied byte for byte
  with open(os.path.join(messy["out"], "labels.txt")) as f:
    assert f.read().split() == ["cats", "dogs"]


def test_output_feeds_the_input_fn(messy):
  fn = pipeline.build_input_fn(InputConfig(batch_size=64), os.path.join(messy["out"], "train"),
                               16, training=False)
  labels = np.concatenate([l.numpy() for _, l in fn()])
  assert len(labels) == messy["report"]["examples"]["train"]
  assert fn.bad_record_counter.numpy() == 0


def test_rerun_is_idempotent_and_adding_images_keeps_old_splits(messy, tmp_path):
  images = str(tmp_path / "images")
  shutil.copytree(messy["images"], images)
  out = str(tmp_path / "records")
  first = prepare.prepare(_config(images, out), log=lambda m: None)
  splits_before = {}
  for split in ("train", "validation"):
    splits_before.update({k: split for k in _examples(os.path.join(out, split))})
  shards = sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
                  if f.endswith(".tfrecord"))
  mtimes = {p: os.stat(p).st_mtime_ns for p in shards}

  again = prepare.prepare(_config(images, out), log=lambda m: None)
  assert again["shards_written"] == 0 and again["shards_unchanged"] == len(shards)
  assert {p: os.stat(p).st_mtime_ns for p in shards} == mtimes
  assert again["bad_files"] == first["bad_files"]

  for i in range(6):  # new images: old ones must stay in their split
    _save(os.path.join(images, "dogs", "new", f"n{i}.png"), _rgb("dogs"), "PNG")
  os.remove(shards[0])  # and a lost shard is rebuilt (resume)
  leftover = shards[1] + ".tmp-123-deadbeef"  # a shard an interrupted run was writing
  with open(leftover, "wb") as f:
    f.write(b"half a shard")
  assert leftover not in sources.list_tfrecord_files(os.path.dirname(leftover))
  third = prepare.prepare(_config(images, out), log=lambda m: None)
  assert os.path.exists(shards[0])
  assert not os.path.exists(leftover)
  splits_after = {}
  for split in ("train", "validation"):
    splits_after.update({k: split for k in _examples(os.path.join(out, split))})
  assert {k: splits_after[k] for k in splits_before} == splits_before
  assert len(splits_after) == len(splits_before) + 6
  assert 0 < third["shards_written"] < len(shards) + 1
  prepare.prepare(_config(images, out, num_shards=2), log=lambda m: None)
  left = sorted(f for _, _, fs in os.walk(out) for f in fs if ".tfrecord" in f)
  assert left == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord",
                  "validation-00000-of-00001.tfrecord"]  # the old shards are gone


def test_split_is_a_stable_function_of_the_path():
  paths = [f"c/{i}.jpg" for i in range(2000)]
  splits = [prepare.split_of(p, 10, 20) for p in paths]
  assert splits == [prepare.split_of(p, 10, 20) for p in paths]
  share = {s: splits.count(s) / len(paths) for s in prepare.SPLITS}
  assert abs(share["validation"] - 0.1) < 0.03 and abs(share["test"] - 0.2) < 0.03


def test_label_map_sets_ids_and_rejects_unknown_folders(tmp_path):
  root = tmp_path / "images"
  for cls in COLOURS:
    _save(str(root / cls / "a.png"), _rgb(cls), "PNG")
  label_map = tmp_path / "labels.txt"
  label_map.write_text("dogs\ncats\nbirds\n")
  out = tmp_path / "out"
  prepare.prepare(_config(root, out, validation_percent=0, label_map=str(label_map)),
                  log=lambda m: None)
  examples = _examples(str(out / "train"))
  assert examples["dogs/a.png"][0] == 0 and examples["cats/a.png"][0] == 1
  label_map.write_text("dogs\n")
  with pytest.raises(ConfigError, match="'cats' is not in --label_map"):
    prepare.prepare(_config(root, out, label_map=str(label_map)), log=lambda m: None)


def test_cli_converts_and_too_many_bad_files_fail_in_one_line(messy, tmp_path):
  out = str(tmp_path / "cli_out")
  ok = run_cli(ET_PREPARE_DATA, f"--image_dir={messy['images']}", f"--output_dir={out}",
               "--num_shards=2", "--validation_percent=20", "--test_percent=10",
               "--max_image_pixels=40000", "--max_bad_fraction=0.5")
  assert ok.returncode == 0, ok.stderr
  assert "4 bad" in ok.stdout and "cats/empty.jpg" in ok.stdout
  with open(os.path.join(out, prepare.REPORT_FILENAME)) as f:
    assert json.load(f)["bad"] == 4
  for split in ("train", "validation", "test"):
    assert os.path.exists(os.path.join(out, split, "labels.txt"))
  failed = run_cli(ET_PREPARE_DATA, f"--image_dir={messy['images']}",
                   f"--output_dir={tmp_path / 'strict'}", "--max_image_pixels=40000",
                   "--max_bad_fraction=0.05")
  assert failed.returncode == 1
  assert failed.stderr.startswith("et-prepare-data: error: more than --max_bad_fraction")
  assert len(failed.stderr.strip().splitlines()) == 1
  with open(tmp_path / "strict" / prepare.REPORT_FILENAME) as f:
    partial = json.load(f)
  assert partial["status"].startswith("failed") and partial["bad"] >= 2


@pytest.mark.parametrize("fmt, mode, expect_fmt", [("JPEG", "RGB", "jpeg"),
                                                   ("PNG", "RGBA", "png")])
def test_huge_images_are_downscaled_keeping_jpeg_or_png(tmp_path, fmt, mode, expect_fmt):
  path = str(tmp_path / f"big.{fmt.lower()}")
  Image.new(mode, (64, 32), (10, 120, 240, 255)[:len(mode)]).save(path, format=fmt)
  encoded, out_fmt, height, width, note = images.convert_image(path, max_image_side=16)
  assert (out_fmt, height, width) == (expect_fmt, 8, 16)
  assert note == ("resized" if mode == "RGB" else "converted from PNG RGBA")
  image = Image.open(io.BytesIO(encoded))
  assert image.size == (16, 8) and image.mode == "RGB" and image.format == fmt
