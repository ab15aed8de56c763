"""TFRecords written the way slim's build_image_data.py writes them (labels 1..N with 0
reserved for background, JPEG bytes, the same feature keys and types, shards named
train-00000-of-00002) train correctly with --label_offset=1."""
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import pipeline
from estimator_transfer.training import experiment as runner

import conftest


def _bytes(value: bytes):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64(value: int):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def slim_example(filename: str, image_buffer: bytes, label: int, text: str,
                 height: int, width: int) -> tf.train.Example:
  """build_image_data.py's _convert_to_example, feature for feature."""
  return tf.train.Example(features=tf.train.Features(feature={
      "image/height": _int64(height),
      "image/width": _int64(width),
      "image/colorspace": _bytes(b"RGB"),
      "image/channels": _int64(3),
      "image/class/label": _int64(label),
      "image/class/text": _bytes(text.encode()),
      "image/format": _bytes(b"JPEG"),
      "image/filename": _bytes(os.path.basename(filename).encode()),
      "image/encoded": _bytes(image_buffer)}))


def write_slim_split(out_dir: str, name: str, count: int, shards: int, seed: int):
  """`name-0000i-of-0000n` shards; the labels file build_image_data.py read.

  build_image_data.py gives the class on line i of --labels_file the label
  i + 1; that same file (one name per line) is the labels.txt here.
  """
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.RandomState(seed)
  ids = []
  writers = [tf.io.TFRecordWriter(os.path.join(out_dir, f"{name}-{s:05d}-of-{shards:05d}"))
             for s in range(shards)]
  for i in range(count):
    class_id = i % len(conftest.CLASS_NAMES)
    image = conftest.make_image(class_id, rng)
    example = slim_example(f"/data/{conftest.CLASS_NAMES[class_id]}/img_{i}.JPEG",
                           conftest.encode(image, "jpg"), class_id + 1,
                           conftest.CLASS_NAMES[class_id], *image.shape[:2])
    writers[i % shards].write(example.SerializeToString())
    ids.append(class_id)
  for w in writers:
    w.close()
  labels_lib.write_labels_file(os.path.join(out_dir, "labels.txt"), conftest.CLASS_NAMES)
  return ids


@pytest.fixture(scope="module")
def slim_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("slim")
  train = str(root / "train")
  evaluation = str(root / "validation")
  write_slim_split(train, "train", 24, 2, seed=1)
  eval_ids = write_slim_split(evaluation, "validation", 12, 1, seed=2)
  return {"train": train, "eval": evaluation, "eval_ids": eval_ids}


def _labels_and_texts(cfg, data):
  fn = pipeline.build_input_fn(cfg.input, data, conftest.IMAGE_SIZE, training=False,
                               class_names=conftest.CLASS_NAMES)
  labels = []
  for _, batch_labels in fn():
    labels.extend(batch_labels.numpy().tolist())
  return labels


def test_label_offset_maps_slim_labels_to_class_ids_and_trains(make_config, slim_data,
                                                               tmp_path):
  cfg = make_config(input__train_data=slim_data["train"],
                    input__eval_data=slim_data["eval"], input__label_offset=1,
                    input__shuffle_buffer=0, run__max_steps=2)
  # Every label is the id of its image/class/text in labels.txt, in record order.
  assert _labels_and_texts(cfg, slim_data["eval"]) == slim_data["eval_ids"]
  experiment = runner.Experiment(cfg)
  experiment.train()
  experiment.evaluate()
  # The confusion matrix rows count the true classes: 4 of each, none lost.
  confusion = np.asarray(experiment.last_report["confusion_matrix"]).reshape(3, 3)
  assert confusion.sum(axis=1).tolist() == [4, 4, 4]


def test_without_the_offset_the_top_class_is_out_of_range(make_config, slim_data):
  cfg = make_config(input__train_data=slim_data["train"], input__eval_data=slim_data["eval"],
                    input__shuffle_buffer=0, run__max_steps=1)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"has label 3, outside \[0, 3\)"):
    _labels_and_texts(cfg, slim_data["eval"])


def test_label_offset_applies_to_the_feature_cache(cache_config, slim_data):
  # Cached ids are the class ids (offset applied at extraction), and the
  # offset is part of the units' keys: a changed offset recomputes them.
  from estimator_transfer.feature_cache import cache as feature_cache  # pylint: disable=import-outside-toplevel
  cfg = cache_config(input__train_data=slim_data["eval"], input__label_offset=1)
  cached = feature_cache.FeatureCache(cfg).prepare(slim_data["eval"], False,
                                                   conftest.CLASS_NAMES)
  labels = [tf.train.Example.FromString(raw).features.feature["label"].int64_list.value[0]
            for path in cached.files for raw in tf.compat.v1.io.tf_record_iterator(path)]
  assert labels == slim_data["eval_ids"]
  plain = cache_config(input__train_data=slim_data["eval"])
  with pytest.raises(Exception, match="label 3, outside"):  # top class out of range unshifted
    feature_cache.FeatureCache(plain).prepare(slim_data["eval"], False, conftest.CLASS_NAMES)


def test_label_offset_applies_to_export_evaluation_and_retrain_shards(make_config, slim_data):
  from estimator_transfer.evaluation import export_eval  # pylint: disable=import-outside-toplevel
  from estimator_transfer.retrain import shards  # pylint: disable=import-outside-toplevel
  data = slim_data["eval"]
  labels = [label for _, label in export_eval.labelled_images(
      data, "image/encoded", "image/class/label", label_offset=1)]
  assert labels == slim_data["eval_ids"]
  cfg = make_config(input__label_offset=1).input
  shard = os.path.join(data, "validation-00000-of-00001")
  records = shards.read_unit(shard, shards.TFRECORD, cfg, conftest.CLASS_NAMES)
  assert records.names == [conftest.CLASS_NAMES[i] for i in slim_data["eval_ids"]]
  unshifted = make_config().input
  with pytest.raises(shards.NotReady, match="class id 3, beyond"):
    shards.read_unit(shard, shards.TFRECORD, unshifted, conftest.CLASS_NAMES)
