"""input_fns: TFRecords (any keys, text labels), folders, CSV, arrays; bad records
skipped and counted (or failing with the file's name); labels checked; worker
shards disjoint; seeded order repeatable; eval pixels identical to the export's.
"""
import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.training import experiment as runner
from estimator_transfer.errors import ConfigError
from estimator_transfer.config import InputConfig
from estimator_transfer.data import bad_records
from estimator_transfer.data import arrays
from estimator_transfer.data import pipeline
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import preprocessing
from estimator_transfer.data import sources

from conftest import CLASS_NAMES, ROOT, encode, make_image, run_cli

SIZE = 16


def _example(image_bytes, label, image_key="image/encoded", label_key="image/class/label"):
  label_feature = (tf.train.Feature(bytes_list=tf.train.BytesList(value=[label.encode()]))
                   if isinstance(label, str) else
                   tf.train.Feature(int64_list=tf.train.Int64List(value=[label])))
  return tf.train.Example(features=tf.train.Features(feature={
      image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
      label_key: label_feature})).SerializeToString()


def _write(path, records):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
  return path


def _good_records(n, seed=0, **keys):
  rng = np.random.RandomState(seed)
  return [_example(encode(make_image(i % 3, rng)), i % 3, **keys) for i in range(n)]


def _collect(input_fn):
  """All (images, labels) of a finite input_fn, concatenated."""
  images, labels = [], []
  for features, batch_labels in input_fn():
    images.append(features["image"].numpy())
    labels.append(batch_labels.numpy())
  return np.concatenate(images), np.concatenate(labels)


def _config(**kwargs):
  return InputConfig(**dict(dict(batch_size=8, shuffle_buffer=16), **kwargs))


def test_eval_pixels_are_exactly_the_export_preprocessing(tiny_data):
  files = sources.list_tfrecord_files(tiny_data["eval"])
  raw = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(files[0])]
  fn = pipeline.build_input_fn(_config(batch_size=64), files[0], SIZE, training=False)
  images, labels = _collect(fn)
  assert images.dtype == np.float32 and images.shape == (len(raw), SIZE, SIZE, 3)
  assert labels.dtype == np.int32
  for i, example in enumerate(raw):
    encoded = example.features.feature["image/encoded"].bytes_list.value[0]
    np.testing.assert_array_equal(images[i], preprocessing.decode_and_resize(encoded, SIZE))
    assert labels[i] == example.features.feature["image/class/label"].int64_list.value[0]


def test_custom_keys_and_text_labels_use_the_label_map(tmp_path):
  names = ["zebra", "apple", "mango"]
  records = [_example(encode(make_image(0, np.random.RandomState(i))), names[i % 3],
                      image_key="img/bytes", label_key="image/class/text")
             for i in range(6)]
  path = _write(str(tmp_path / "custom.tfrecord"), records)
  cfg = _config(image_key="img/bytes", label_key="image/class/text")
  fn = pipeline.build_input_fn(cfg, path, SIZE, training=False, class_names=names)
  _, labels = _collect(fn)
  np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2])
  # An unknown name is an error naming the record, not a silent class.
  bad = _write(str(tmp_path / "unknown.tfrecord"), records[:2] + [
      _example(encode(make_image(0, np.random.RandomState(9))), "pear",
               image_key="img/bytes", label_key="image/class/text")])
  fn = pipeline.build_input_fn(cfg, bad, SIZE, training=False, class_names=names)
  with pytest.raises(tf.errors.InvalidArgumentError) as info:
    _collect(fn)
  message = bad_records.user_error_message(info.value.message)
  assert message == (f"bad data: record 2 of {bad} has label 'pear', which is not in the "
                     "label map; add it to --label_map / labels.txt or fix the data.")


@pytest.mark.parametrize("overrides, match", [
    (dict(image_key="image/jpeg"), r"no bytes feature 'image/jpeg' \(their features: "
     r"image/class/label, image/encoded\); set --image_key"),
    (dict(label_key="label"), r"no int64 or text label 'label'.*set --label_key"),
])
def test_wrong_keys_are_a_clear_config_error(tmp_path, overrides, match):
  path = _write(str(tmp_path / "r.tfrecord"), _good_records(2))
  with pytest.raises(ConfigError, match=match):
    pipeline.build_input_fn(_config(**overrides), path, SIZE, training=True)


def test_several_labels_per_record_are_a_clear_config_error(tmp_path):
  example = tf.train.Example.FromString(_good_records(1)[0])
  example.features.feature["image/class/label"].int64_list.value.append(2)
  path = _write(str(tmp_path / "multi.tfrecord"), [example.SerializeToString()])
  with pytest.raises(ConfigError, match=r"1 image\(s\) and 2 label\(s\)"):
    pipeline.build_input_fn(_config(), path, SIZE, training=True)


def _messy_records_dir(root):
  """Two shards: 3 corrupt records in one, a truncated tail in the other."""
  good = _good_records(20)
  first = good[:10]
  first[2] = _example(b"definitely not an image", 1)  # undecodable image
  first[5] = b"\xff\xfe not a tf.Example"  # unparsable record
  first[9] = _example(encode(make_image(0, np.random.RandomState(1)))[:40], 0)  # cut PNG
  _write(os.path.join(root, "d-00000-of-00002.tfrecord"), first)
  second = _write(os.path.join(root, "d-00001-of-00002.tfrecord"), good[10:])
  with open(second, "rb") as f:
    data = f.read()
  with open(second, "wb") as f:
    f.write(data[:-25])  # the last record loses its end: DataLoss in TF
  return root, 7 + 9  # readable examples


@pytest.mark.parametrize("training", [False, True])
def test_corrupt_records_are_skipped_and_counted_exactly(tmp_path, training, capfd):
  data, readable = _messy_records_dir(str(tmp_path / "messy"))
  fn = pipeline.build_input_fn(_config(), data, SIZE, training=training, seed=1,
                               num_epochs=1)
  _, labels = _collect(fn)
  assert len(labels) == readable
  assert int(fn.bad_record_counter.numpy()) == 4
  logged = capfd.readouterr().err
  assert "skipped" in logged and "d-00000-of-00002.tfrecord" in logged
  assert "the rest of " in logged and \
      "d-00001-of-00002.tfrecord after its first 9 record(s)" in logged


def test_on_bad_record_fail_names_the_record(tmp_path):
  data, _ = _messy_records_dir(str(tmp_path / "messy"))
  fn = pipeline.build_input_fn(_config(on_bad_record="fail"), data, SIZE, training=False)
  with pytest.raises(tf.errors.InvalidArgumentError) as info:
    _collect(fn)
  message = bad_records.user_error_message(info.value.message)
  assert message.startswith(f"bad data: record 2 of {data}/d-00000-of-00002.tfrecord "
                            "cannot be read or decoded")
  assert "--on_bad_record=skip" in message


def test_label_outside_the_label_map_names_the_record(tmp_path):
  records = _good_records(4)
  records[3] = _example(encode(make_image(0, np.random.RandomState(5))), 7)
  path = _write(str(tmp_path / "labels.tfrecord"), records)
  fn = pipeline.build_input_fn(_config(), path, SIZE, training=False, num_classes=3)
  with pytest.raises(tf.errors.InvalidArgumentError) as info:
    _collect(fn)
  assert bad_records.user_error_message(info.value.message) == (
      f"bad data: record 3 of {path} has label 7, outside [0, 3); fix the data, "
      "--label_map or --num_classes.")


def test_image_folder_with_label_map_bad_files_and_hidden_files(tmp_path, monkeypatch,
                                                               capfd):
  monkeypatch.setattr(pipeline, "FOLDER_CHUNK", 2)  # several units, as with many files
  root = tmp_path / "folder"
  rng = np.random.RandomState(0)
  for i, name in enumerate(["b_class", "a_class"]):
    (root / name / "sub").mkdir(parents=True)
    for j in range(3):
      (root / name / "sub" / f"{j}.png").write_bytes(encode(make_image(i, rng)))
  (root / "a_class" / "broken.jpg").write_bytes(b"not a jpeg at all")
  (root / "b_class" / "sub" / "zz_broken.png").write_bytes(b"")
  (root / "a_class" / ".hidden.png").write_bytes(b"junk")
  (root / ".DS_Store").write_bytes(b"junk")
  fn = pipeline.build_input_fn(_config(), str(root), SIZE, training=False,
                               class_names=["b_class", "a_class"])
  images, labels = _collect(fn)
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
  assert int(fn.bad_record_counter.numpy()) == 2
  logged = capfd.readouterr().err
  assert "broken.jpg" in logged and "zz_broken.png" in logged
  # Colour tells the class: b_class was drawn red (channel 0), a_class green.
  for image, label in zip(images, labels):
    assert image.mean((0, 1)).argmax() == label
  with pytest.raises(ConfigError, match="'a_class' is not in the label map"):
    pipeline.build_input_fn(_config(), str(root), SIZE, training=False,
                            class_names=["b_class"])


def test_csv_numeric_features_with_named_labels_and_a_bad_row(tmp_path):
  path = tmp_path / "data.csv"
  path.write_text("x1,species,x2\n1.5,cat,2\n3,dog,4.25\noops,cat,1\n5,cat,6\n")
  fn = pipeline.build_input_fn(_config(csv_label_column="species"), str(path), 0,
                               training=False, class_names=["dog", "cat"])
  batches = list(fn())
  features = np.concatenate([f["features"].numpy() for f, _ in batches])
  labels = np.concatenate([l.numpy() for _, l in batches])
  np.testing.assert_allclose(features, [[1.5, 2], [3, 4.25], [5, 6]])
  np.testing.assert_array_equal(labels, [1, 0, 1])
  assert int(fn.bad_record_counter.numpy()) == 1


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_array_input_fn_images_and_label_checks(dtype):
  rng = np.random.RandomState(0)
  images = np.stack([make_image(i % 3, rng, size=20) for i in range(10)])
  if dtype == np.float32:
    images = images.astype(np.float32) / 255.0
  labels = np.arange(10) % 3
  fn = arrays.build_array_input_fn(_config(batch_size=4), images, labels, training=False,
                                   image_size=SIZE, num_classes=3)
  got_images, got_labels = _collect(fn)
  assert got_images.shape == (10, SIZE, SIZE, 3) and got_images.max() <= 1.0
  np.testing.assert_array_equal(got_labels, labels)
  with pytest.raises(ConfigError, match=r"labels\[4\] = 5 is outside \[0, 3\)"):
    arrays.build_array_input_fn(_config(), images, [0, 1, 2, 0, 5, 1, 2, 0, 1, 2],
                                training=True, num_classes=3)


def test_numeric_arrays_yield_features():
  fn = arrays.build_array_input_fn(_config(batch_size=5), np.ones((5, 7)), np.zeros(5, int),
                                   training=False)
  features, labels = next(iter(fn()))
  assert features["features"].shape == (5, 7) and labels.dtype == tf.int32


def test_seed_makes_training_order_and_augmentation_repeatable(tiny_data):
  cfg = _config(random_flip="horizontal", brightness=0.2, random_crop=True)

  def first_batches(seed):
    fn = pipeline.build_input_fn(cfg, tiny_data["train"], SIZE, training=True, seed=seed)
    it = iter(fn())
    return [next(it) for _ in range(3)]

  a, b, c = first_batches(5), first_batches(5), first_batches(6)
  for (fa, la), (fb, lb) in zip(a, b):
    np.testing.assert_array_equal(fa["image"], fb["image"])
    np.testing.assert_array_equal(la, lb)
  assert not all(np.array_equal(fa["image"], fc["image"]) for (fa, _), (fc, _) in zip(a, c))


def _worker_run_config(monkeypatch, index):
  monkeypatch.setenv("TF_CONFIG", json.dumps({
      "cluster": {"chief": ["host:2220"], "worker": ["host:2221"]},
      "task": {"type": "chief" if index == 0 else "worker", "index": 0}}))
  return tf.estimator.RunConfig()


@pytest.mark.parametrize("num_files", [4, 1])  # shard by file, and by record
def test_workers_under_tf_config_see_disjoint_data(tmp_path, monkeypatch, num_files):
  records = [_example(encode(make_image(0, np.random.RandomState(i))), i % 3)
             for i in range(24)]
  for f in range(num_files):
    _write(str(tmp_path / f"s-{f:05d}-of-{num_files:05d}.tfrecord"), records[f::num_files])
  fn = pipeline.build_input_fn(_config(shuffle_buffer=0), str(tmp_path), SIZE,
                               training=True, seed=1, num_epochs=1)
  seen = []
  for index in (0, 1):
    run_config = _worker_run_config(monkeypatch, index)
    assert run_config.num_worker_replicas == 2
    images = np.concatenate([f["image"].numpy() for f, _ in fn(config=run_config)])
    seen.append({img.tobytes() for img in images})
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  assert len(seen[0]) + len(seen[1]) == 24


@pytest.mark.parametrize("cache", ["memory", "file"])
def test_cache_gives_the_same_examples(tiny_data, tmp_path, cache):
  cache = str(tmp_path / "cache" / "c") if cache == "file" else cache
  plain = _collect(pipeline.build_input_fn(_config(), tiny_data["eval"], SIZE,
                                           training=False))
  cached_fn = pipeline.build_input_fn(_config(cache=cache), tiny_data["eval"], SIZE,
                                      training=False)
  for _ in range(2):  # the second pass reads the cache
    cached = _collect(cached_fn)
    np.testing.assert_array_equal(cached[0], plain[0])
  if cache != "memory":
    assert any(f.startswith("c-eval-") for f in os.listdir(tmp_path / "cache"))


def test_estimator_reports_bad_records_in_eval_results_and_log(make_config, tiny_data,
                                                               tmp_path, caplog):
  train, _ = _messy_records_dir(str(tmp_path / "train"))
  labels_lib.write_labels_file(os.path.join(train, "labels.txt"), CLASS_NAMES)
  evaluation = str(tmp_path / "eval")
  records = _good_records(12, seed=3)
  records[4] = _example(b"garbage", 0)
  _write(os.path.join(evaluation, "e-00000-of-00001.tfrecord"), records)
  labels_lib.write_labels_file(os.path.join(evaluation, "labels.txt"), CLASS_NAMES)
  cfg = make_config(input__train_data=train, input__eval_data=evaluation,
                    run__max_steps=3)
  experiment = runner.Experiment(cfg)
  with caplog.at_level(logging.WARNING, logger="estimator_transfer"):
    experiment.train()
  assert any("corrupt record" in r.getMessage() for r in caplog.records)
  metrics = experiment.evaluate()
  assert metrics["bad_records"] == 1
  with open(os.path.join(cfg.run.model_dir, runner.EVAL_RESULTS_FILENAME)) as f:
    assert json.load(f)["bad_records"] == 1


def test_cli_label_outside_the_classes_is_one_line(tiny_backbone, tmp_path):
  path = _write(str(tmp_path / "data" / "t-00000-of-00001.tfrecord"),
                _good_records(5) + [_example(encode(make_image(0, np.random.RandomState(2))), 9)])
  result = run_cli("et-train", f"--backbone={tiny_backbone['h5']}", f"--train_data={path}",
                   f"--model_dir={tmp_path / 'model'}", "--num_classes=3", "--max_steps=2",
                   "--batch_size=8", cwd=ROOT)
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"et-train: error: bad data: record 5 of {path} has label 9, outside [0, 3); "
      "fix the data, --label_map or --num_classes.")
