"""The feature cache's keys: what they hash, and their pinned values.

Every hash here names files on disk: a refactoring that changes one silently
invalidates every existing cache (and recomputes it), so the values are
pinned. Update a pin only on purpose, together with FORMAT_VERSION.
"""
import os
import shutil
import types

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.feature_cache import key as key_lib
from estimator_transfer.model import backbones

import conftest

_NS = 1700000000000000000  # a fixed mtime for the unit keys
_AUGMENTATION = {"random_flip": "horizontal", "random_crop": False, "crop_min_area": 0.08,
                 "rotation_degrees": 0.0, "brightness": 0.0, "contrast": 0.0,
                 "saturation": 0.0}
_LABELS = {"image_key": "image/encoded", "label_key": "image/class/label", "text": False,
           "class_names": []}


def _resaved_with_other_weights(tiny_backbone, path):
  model = tf.keras.models.load_model(tiny_backbone["h5"], compile=False)
  weights = model.get_weights()
  weights[0] = weights[0] + 0.5
  model.set_weights(weights)
  model.save(path)
  return path


@pytest.mark.parametrize("change,same_key", [
    ("copied_file", True),
    ("other_head_and_schedule", True),
    ("changed_weights", False),
    ("value_range", False),
    ("output_layer", False),
])
def test_key_fingerprints_backbone_content_and_preprocessing(
    cache_config, tiny_backbone, tmp_path, change, same_key):
  base = cache_config()
  if change == "copied_file":
    overrides = dict(backbone__handle=str(tmp_path / "renamed.h5"))
    shutil.copy(tiny_backbone["h5"], overrides["backbone__handle"])
  elif change == "changed_weights":  # same architecture, one kernel moved
    overrides = dict(backbone__handle=_resaved_with_other_weights(
        tiny_backbone, str(tmp_path / "other.h5")))
  else:
    overrides = {
        "other_head_and_schedule": dict(head__dropout_rate=0.5, schedule__values=(1.0,)),
        "value_range": dict(backbone__value_range="minus_one_one"),
        "output_layer": dict(backbone__output_layer="relu1"),
    }[change]
  key, _ = key_lib.fingerprint(base, backbones.resolve(base.backbone))
  other = base.replace(**overrides)
  other_key, details = key_lib.fingerprint(other, backbones.resolve(other.backbone))
  assert (key == other_key) == same_key, details


def test_preprocessing_version_is_pinned():
  # A changed decode_and_resize or to_value_range must change this on
  # purpose: it re-keys every cache.
  assert key_lib.preprocessing_version() == "fb79506afdb1"


def _documented(images, value_range):
  """A docstring."""
  # A comment.
  return images * value_range


def _bare(images, value_range):
  return images * value_range


def _changed(images, value_range):
  return images + value_range


def test_preprocessing_code_ignores_comments_and_docstrings():
  # pylint: disable=protected-access
  assert key_lib._code(_documented) == key_lib._code(_bare).replace("_bare", "_documented")
  assert key_lib._code(_changed).replace("_changed", "_bare") != key_lib._code(_bare)


def _fixed_files(tmp_path):
  """A weights/model file and a module directory of known bytes."""
  weights = tmp_path / "w.weights.h5"
  weights.write_bytes(b"fixed weights bytes")
  hub = tmp_path / "hub"
  (hub / "variables").mkdir(parents=True)
  (hub / "saved_model.pb").write_bytes(b"pb bytes")
  (hub / "variables" / "variables.index").write_bytes(b"idx")
  return str(weights), str(hub)


@pytest.mark.parametrize("case,expected", [
    ("random", "ffb57863026faa5d"),
    ("weights", "c33d89c2cf67a133"),
    ("model", "40b95410b895aa15"),
    ("hub", "d3a56a0b6821fde4"),
])
def test_fingerprint_values_are_pinned(make_config, tmp_path, monkeypatch, case, expected):
  """Existing caches stay valid: the key of a fixed backbone never moves."""
  monkeypatch.setattr(key_lib, "preprocessing_version", lambda: "fb79506afdb1")
  weights, hub = _fixed_files(tmp_path)
  cfg = make_config(backbone__handle="mobilenet_v2(alpha=0.35)", backbone__weights="none",
                    freeze__spec="all")
  # What the key reads of a resolved backbone (any kind).
  resolved = types.SimpleNamespace(
      kind="keras", description="keras application mobilenet_v2(alpha=0.35)",
      image_size=32, value_range="minus_one_one", hub_path="")
  if case == "weights":
    cfg = cfg.replace(backbone__weights=weights)
  elif case == "model":
    cfg = cfg.replace(backbone__weights="", backbone__output_layer="relu1")
    resolved = types.SimpleNamespace(kind="keras", description="Keras model " + weights,
                                     image_size=32, value_range="minus_one_one", hub_path="")
  elif case == "hub":
    cfg = cfg.replace(backbone__weights="", run__mixed_precision="mixed_float16")
    resolved = types.SimpleNamespace(kind="hub_tf2", description="hub", image_size=32,
                                     value_range="minus_one_one", hub_path=hub)
  key, details = key_lib.fingerprint(cfg, resolved)
  assert key == expected, details
  assert details["format"] == key_lib.FORMAT_VERSION == 1


@pytest.mark.parametrize("copy,augmentation,expected", [
    (-1, None, "1b925c6362a0bf4597fb6302"),
    (0, _AUGMENTATION, "cab6b153c3de7ef332b8f191"),
    (1, _AUGMENTATION, "188983948423a6878aa36f8a"),
])
def test_unit_key_values_are_pinned(copy, augmentation, expected):
  base = {"kind": "tfrecord", "labels": _LABELS, "label_ids": [],
          "files": [["/data/train-00000-of-00002.tfrecord", 1234, _NS]]}
  # The seed base depends on the input only: every copy draws from it.
  assert key_lib.unit_keys(base, copy, augmentation) == (expected, 173130325956072)


def test_tfrecord_units_hash_path_size_and_mtime(cache_config, tmp_path):
  data = conftest.write_tfrecord_split(str(tmp_path / "data"), 12, seed=1)
  paths = sorted(os.path.join(data, n) for n in os.listdir(data) if n.endswith(".tfrecord"))
  for path in paths:
    os.utime(path, ns=(_NS, _NS))
  cfg = cache_config(input__random_flip="horizontal",
                     input__cache_features_with_augmentation=2)
  plain = key_lib.list_units(cfg, data, False, conftest.CLASS_NAMES)
  train = key_lib.list_units(cfg, data, True, conftest.CLASS_NAMES)
  assert [u.files for u in plain] == [(p,) for p in paths]
  assert [u.copy for u in plain] == [-1, -1] and [u.copy for u in train] == [0, 1, 0, 1]
  settings = key_lib.augmentation_settings(cfg)
  for units in (plain, train):
    for unit in units:
      base = {"kind": "tfrecord", "labels": _LABELS, "label_ids": [],
              "files": [[unit.files[0], os.path.getsize(unit.files[0]), _NS]]}
      assert (unit.key, unit.seed) == key_lib.unit_keys(
          base, unit.copy, settings if unit.copy >= 0 else None)
  # Touching a file re-keys its unit only.
  os.utime(paths[1], ns=(_NS + 10**9, _NS + 10**9))
  again = key_lib.list_units(cfg, data, False, conftest.CLASS_NAMES)
  assert again[0].key == plain[0].key and again[1].key != plain[1].key


def test_folder_units_are_runs_of_one_class(cache_config, tmp_path, monkeypatch):
  monkeypatch.setattr(key_lib, "FOLDER_UNIT", 2)
  folder = tmp_path / "folder"
  for name, count in (("blue", 1), ("green", 3), ("red", 2)):
    (folder / name).mkdir(parents=True)
    for k in range(count):
      (folder / name / f"{k}.png").write_bytes(
          conftest.encode(conftest.make_image(0, np.random.RandomState(k))))
  cfg = cache_config()
  units = key_lib.list_units(cfg, str(folder), False, ())
  sizes = [(len(u.files), set(u.labels)) for u in units]
  assert sorted(len(u.files) for u in units) == [1, 1, 2, 2]
  assert all(len(labels) == 1 for _, labels in sizes)  # a unit never mixes classes
  assert len({u.key for u in units}) == 4 and all(u.kind == "folder" for u in units)
  assert all(u.describe.startswith(f"{len(u.files)} images in ") for u in units)
