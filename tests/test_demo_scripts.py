"""The offline demo data and demo backbone scripts behind `make demo`."""
import os
import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.model import backbones
from estimator_transfer.config import BackboneConfig
from estimator_transfer.data import sources
from estimator_transfer.data import labels as labels_lib


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
  assert count == 50  # 10 per class
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
  assert (hub.kind, hub.image_size) == ("hub_tf2", 32)
  keras = backbones.resolve(BackboneConfig(handle=os.path.join(bb, "keras_model.h5"),
                                           weights=os.path.join(bb, "weights.h5")))
  model = tf.keras.models.load_model(os.path.join(bb, "keras_model.h5"), compile=False)
  for loaded, expected in zip(keras.keras_weights, model.get_weights()):
    np.testing.assert_array_equal(loaded, expected)
  assert "held-out accuracy" in demo["stdout"]
