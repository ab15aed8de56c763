"""The offline demo data, the demo backbone and the strategies demo behind `make demo`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.model import backbones
from estimator_transfer.config import BackboneConfig
from estimator_transfer.data import sources
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.evaluation import tb_images

from conftest import ROOT


@pytest.fixture(scope="module")
def demo(demo_assets):
  return demo_assets


def test_digits_are_split_into_old_and_new_classes(demo):
  finetune = os.path.join(demo["data"], "finetune")
  assert labels_lib.read_labels_file(os.path.join(finetune, "train", "labels.txt")) == \
      ["5", "6", "7", "8", "9"]
  assert labels_lib.read_labels_file(
      os.path.join(demo["data"], "pretrain", "train", "labels.txt")) == ["0", "1", "2", "3", "4"]
  records = sources.list_tfrecord_files(os.path.join(finetune, "train"))
  count = sum(1 for f in records for _ in tf.data.TFRecordDataset(f))
  assert count == 15  # 3 per class
  folders = sorted(os.listdir(os.path.join(demo["data"], "images", "train")))
  assert folders == ["5", "6", "7", "8", "9"]


def test_demo_images_are_rgb_digits(demo):
  path = os.path.join(demo["data"], "images", "eval", "7")
  image = tf.io.decode_png(open(os.path.join(path, sorted(os.listdir(path))[0]), "rb").read())
  assert image.shape == (16, 16, 3)
  assert int(tf.reduce_max(image)) > 100  # ink, not a blank image


def test_backbone_saved_as_hub_handle_keras_model_and_weights(demo):
  bb = demo["backbone"]
  assert os.path.exists(os.path.join(bb, "saved_model", "saved_model.pb"))
  hub = backbones.resolve(BackboneConfig(handle=os.path.join(bb, "saved_model")))
  assert (hub.kind, hub.image_size) == ("hub_tf2", 16)  # the size of the demo images
  keras = backbones.resolve(BackboneConfig(handle=os.path.join(bb, "keras_model.h5"),
                                           weights=os.path.join(bb, "weights.h5")))
  model = tf.keras.models.load_model(os.path.join(bb, "keras_model.h5"), compile=False)
  for loaded, expected in zip(keras.keras_weights, model.get_weights()):
    np.testing.assert_array_equal(loaded, expected)
  assert "held-out accuracy" in demo["stdout"]


def test_quick_demo_prints_the_table_and_writes_picture_and_results(demo, tmp_path):
  # `make demo` end to end with 4 steps per strategy: every strategy trains
  # through et-train and evaluates twice; the numbers are not the point here.
  out = tmp_path / "demo"
  result = subprocess.run(
      [sys.executable, "scripts/demo.py", "--quick", f"--data_dir={demo['data']}",
       f"--backbone_dir={demo['backbone']}", f"--runs_dir={tmp_path / 'runs'}",
       f"--out_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  header = [i for i, line in enumerate(lines) if line.split()[:2] == ["strategy", "accuracy"]]
  assert header, result.stdout
  rows = lines[header[0] + 2:header[0] + 7]
  names = ["from scratch", "feature extraction", "fine-tune top blocks", "full fine-tune",
           "gradual unfreezing"]
  for name, row in zip(names, rows):
    assert row.strip().startswith(name), (name, row)
    accuracy, seconds, rate, parameters = row.split()[-4:]
    assert 0.0 <= float(accuracy) <= 1.0 and float(seconds) > 0 and float(rate) > 0
    assert int(parameters.replace(",", "")) > 0
  # Feature extraction trains the head only; full fine-tuning trains everything.
  counts = [int(row.split()[-1].replace(",", "")) for row in rows]
  assert counts[1] < counts[2] < counts[3] == counts[0] == counts[4], counts
  assert "beats scratch by" in result.stdout
  # The last lines: where the pictures are, and the tour's first command.
  assert "strategies.png" in lines[-3] and lines[-1].strip().startswith("et-prepare-data")
  png = tf.io.decode_png((out / "strategies.png").read_bytes())
  assert png.shape[0] > 300 and png.shape[1] > 600
  with open(out / "demo.json") as f:
    saved = json.load(f)
  assert saved["command"] == "python scripts/demo.py --quick" and len(saved["rows"]) == 5
  assert saved["columns"] == ["strategy", "accuracy", "train s", "examples/s",
                              "trained parameters"]
  # Each strategy's curve has both evaluations, and each evaluation its image.
  eval_dir = tmp_path / "runs" / "seed1" / "full_fine_tune" / "eval"
  steps = sorted(e.step for p in eval_dir.glob("events.*")
                 for e in tf.compat.v1.train.summary_iterator(str(p))
                 for v in e.summary.value if v.tag == tb_images.IMAGE_TAG and v.HasField("image"))
  assert steps == [2, 4], steps
  assert saved["data"]["seeds"] == [1]
