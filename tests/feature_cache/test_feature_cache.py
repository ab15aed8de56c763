"""Feature-cache mode: the cache holds the backbone's features, is reused,
invalidated by what changed, survives kills and concurrent writers; the head
trains, evaluates and exports (as a full image model) from it."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.data import preprocessing
from estimator_transfer.data import sources
from estimator_transfer.data import tfrecords
from estimator_transfer.errors import ConfigError
from estimator_transfer.feature_cache import cache as feature_cache
from estimator_transfer.feature_cache import store
from estimator_transfer.model import backbones
from estimator_transfer.model import heads
from estimator_transfer.training import experiment as runner

import conftest
from transfer_helpers import tf1_module  # noqa: F401  pylint: disable=unused-import


def _records(data):
  """(encoded images, labels) of TFRecord data, in file and record order."""
  images, labels = [], []
  for path in sources.list_tfrecord_files(data):
    for raw in tf.compat.v1.io.tf_record_iterator(path):
      feature = tf.train.Example.FromString(raw).features.feature
      images.append(feature["image/encoded"].bytes_list.value[0])
      labels.append(feature["image/class/label"].int64_list.value[0])
  return images, np.array(labels)


def _read_cache(files):
  features, labels = [], []
  for path in files:
    for raw in tf.compat.v1.io.tf_record_iterator(path):
      feature = tf.train.Example.FromString(raw).features.feature
      features.append(list(feature[store.FEATURE_KEY].float_list.value))
      labels.append(feature[store.LABEL_KEY].int64_list.value[0])
  return np.array(features, np.float32), np.array(labels)


def _uncached(cfg, encoded, backbone_values=None, head_values=None):
  """What an uncached frozen model computes on encoded images, built from scratch.

  The backbone gets its pretrained values the ordinary way (the Scaffold
  init_fn of Keras weights, Hub modules' own initializers), or
  `backbone_values` by name; with `head_values` the head runs too.

  Returns:
    (features, probabilities or None).
  """
  resolved = backbones.resolve(cfg.backbone)
  size = resolved.image_size
  with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    images = tf.stack([preprocessing.decode_and_resize(tf.constant(b), size)
                       for b in encoded])
    out = resolved.instantiate(images, "all", training=False)
    probabilities = None
    if head_values is not None:
      head = heads.build_head(cfg.head)
      probabilities = tf.nn.softmax(head(out.features, False))
    sess.run(tf.compat.v1.global_variables_initializer())
    if backbone_values is not None:
      for var in tf.compat.v1.global_variables():
        if var.op.name in backbone_values:
          var.load(backbone_values[var.op.name], sess)
    elif out.init_fn is not None:
      out.init_fn(None, sess)
    if head_values is not None:
      for var in head.weights:
        var.load(head_values[var.op.name], sess)
    return sess.run((out.features, probabilities) if probabilities is not None
                    else (out.features, tf.constant(0)))


def _checkpoint(prefix):
  reader = tf.train.load_checkpoint(prefix)
  return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}


# --- the cache ------------------------------------------------------------------


@pytest.mark.parametrize("source", ["h5", "saved_model"])
def test_cache_holds_the_backbone_features_and_is_reused(cache_config, tiny_backbone,
                                                         tiny_data, source):
  cfg = cache_config(backbone__handle=tiny_backbone[source])
  cached = feature_cache.FeatureCache(cfg).prepare(cfg.input.train_data, True,
                                                   conftest.CLASS_NAMES)
  assert cached.computed == 2 and cached.num_examples == 48  # one unit per shard
  features, labels = _read_cache(cached.files)
  encoded, expected_labels = _records(tiny_data["train"])
  expected, _ = _uncached(cfg, encoded)
  np.testing.assert_allclose(features, expected, atol=1e-5)
  np.testing.assert_array_equal(labels, expected_labels)
  # Another head and schedule: the same key, nothing computed, no backbone built.
  other = cache_config(backbone__handle=tiny_backbone[source], head__hidden_units=(4,),
                       schedule__values=(0.1,), run__model_dir=cfg.run.model_dir + "2")
  cache = feature_cache.FeatureCache(other)
  again = cache.prepare(other.input.train_data, True, conftest.CLASS_NAMES)
  assert again.computed == 0 and again.files == cached.files
  assert cache._extractor is None  # pylint: disable=protected-access


def test_changed_input_recomputes_only_its_unit(cache_config, tmp_path):
  data = conftest.write_tfrecord_split(str(tmp_path / "data"), 24, seed=4)
  cfg = cache_config(input__train_data=data)
  first = feature_cache.FeatureCache(cfg).prepare(data, True, conftest.CLASS_NAMES)
  assert first.computed == 2
  # Replace the second shard with other images (same name, new content).
  fresh = conftest.write_tfrecord_split(str(tmp_path / "fresh"), 24, seed=9)
  changed = sources.list_tfrecord_files(data)[1]
  shutil.copy(sources.list_tfrecord_files(fresh)[1], changed)
  second = feature_cache.FeatureCache(cfg).prepare(data, True, conftest.CLASS_NAMES)
  assert second.computed == 1
  assert second.files[0] == first.files[0] and second.files[1] != first.files[1]
  features, _ = _read_cache(second.files[1:])
  encoded, _ = _records(changed)
  np.testing.assert_allclose(features, _uncached(cfg, encoded)[0], atol=1e-5)


def _drop_marker(files):
  os.remove(files[0][:-len(".tfrecord")] + ".json")


def _truncate(files):
  with open(files[0], "r+b") as f:
    f.truncate(os.path.getsize(files[0]) // 2)


def _temp_left(files):
  # Killed while writing: a half-written temporary file, no unit, no marker.
  with open(files[0], "rb") as f:
    head = f.read(100)
  os.remove(files[0])
  os.remove(files[0][:-len(".tfrecord")] + ".json")
  with open(files[0] + ".tmp-deadbeef", "wb") as f:
    f.write(head)
  old = os.path.getmtime(files[0] + ".tmp-deadbeef") - 7200  # dead for two hours
  os.utime(files[0] + ".tmp-deadbeef", (old, old))


def _corrupt_marker(files):
  with open(files[0][:-len(".tfrecord")] + ".json", "w") as f:
    f.write("{not json")


@pytest.mark.parametrize("damage", [_drop_marker, _truncate, _temp_left, _corrupt_marker])
def test_partial_cache_is_detected_and_completed(cache_config, damage):
  cfg = cache_config()
  first = feature_cache.FeatureCache(cfg).prepare(cfg.input.train_data, True,
                                                  conftest.CLASS_NAMES)
  expected = _read_cache(first.files)
  damage(first.files)
  second = feature_cache.FeatureCache(cfg).prepare(cfg.input.train_data, True,
                                                   conftest.CLASS_NAMES)
  assert second.computed == 1
  units_dir = os.path.dirname(second.files[0])
  assert not [n for n in os.listdir(units_dir) if ".tmp-" in n]  # stale temps removed
  features, labels = _read_cache(second.files)
  np.testing.assert_allclose(features, expected[0], atol=1e-6)
  np.testing.assert_array_equal(labels, expected[1])


_WRITER = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from estimator_transfer import config
from estimator_transfer.feature_cache import cache as feature_cache
from estimator_transfer.feature_cache import store
me, barrier_dir = sys.argv[2], sys.argv[3]


def wait_for_all(stage, timeout):
  # Both writers arrive at `stage` (or the timeout passes: not concurrent).
  open(os.path.join(barrier_dir, stage + "-" + me), "w").close()
  deadline = time.time() + timeout
  while time.time() < deadline:
    if len([n for n in os.listdir(barrier_dir) if n.startswith(stage + "-")]) == 2:
      return time.time()
    time.sleep(0.01)
  return None


write_unit = store.write_unit
writes = []


def recorded_write_unit(*args, **kwargs):
  # The first unit waits until the other writer has computed one too: both
  # hold an unwritten unit at once, so their writes interleave.
  if not writes:
    writes.append(("both_computed", wait_for_all("unit", 60)))
  start = time.time()
  result = write_unit(*args, **kwargs)
  writes.append((start, time.time()))
  return result


store.write_unit = recorded_write_unit
cfg = config.ExperimentConfig.from_json(open(sys.argv[1]).read())
started = wait_for_all("start", 120)
cache = feature_cache.FeatureCache(cfg)
cached = cache.prepare(cfg.input.train_data, True, cfg.head.class_names)
print(json.dumps({{"computed": cached.computed, "snapshot": cache.snapshot().id,
                  "started": started, "both_computed": writes[0][1] if writes else None,
                  "writes": writes[1:], "ended": time.time()}}))
"""


def test_concurrent_writers_never_mix_random_weights(cache_config, tmp_path):
  """Two jobs build one cache at once from a randomly initialised backbone.

  Each would draw other random weights: mixing their units would be caught
  by comparing every cached feature with the published snapshot's.
  """
  data = conftest.write_tfrecord_split(str(tmp_path / "data"), 48, seed=5, shards=6)
  cfg = cache_config(backbone__weights="none", input__train_data=data)
  path = tmp_path / "config.json"
  path.write_text(cfg.to_json())
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  script = _WRITER.format(root=conftest.ROOT)
  barrier = tmp_path / "barrier"
  barrier.mkdir()
  procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(i), str(barrier)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for i in range(2)]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  # They really ran at once: both passed the start barrier, each computed a
  # unit while the other held one unwritten, and their prepare() intervals
  # overlap (run one after the other, the barriers time out and this fails).
  assert all(r["started"] is not None for r in results), results
  assert all(r["computed"] >= 1 and r["both_computed"] is not None for r in results), results
  assert max(r["both_computed"] for r in results) < min(r["ended"] for r in results)
  assert results[0]["snapshot"] == results[1]["snapshot"]
  assert results[0]["computed"] + results[1]["computed"] >= 6
  cache = feature_cache.FeatureCache(cfg)
  cached = cache.prepare(data, True, conftest.CLASS_NAMES)
  assert cached.computed == 0
  snapshot = cache.snapshot()
  assert snapshot.id == results[0]["snapshot"]
  # The run pinned the same snapshot into model_dir for the export.
  assert store.read_snapshot(cache.pinned_snapshot_dir).id == snapshot.id
  features, _ = _read_cache(cached.files)
  encoded, _ = _records(data)
  expected, _ = _uncached(cfg, encoded, backbone_values=_checkpoint(snapshot.prefix))
  np.testing.assert_allclose(features, expected, atol=1e-5)


def test_model_dir_pins_its_snapshot(cache_config, tmp_path):
  """Random weights: a model refuses a cache rebuilt with other values."""
  cfg = cache_config(backbone__weights="none")
  trained = feature_cache.FeatureCache(cfg)
  trained.prepare(cfg.input.train_data, True, conftest.CLASS_NAMES)  # pins
  pinned = trained.snapshot().id
  # The cache is deleted: it is rebuilt from the model's pinned values.
  shutil.rmtree(cfg.input.cache_features)
  rebuilt = feature_cache.FeatureCache(cfg)
  rebuilt.prepare(cfg.input.eval_data, False, conftest.CLASS_NAMES)
  assert rebuilt.snapshot().id == pinned
  # Another job fills a new cache with its own random values first.
  elsewhere = cfg.replace(input__cache_features=str(tmp_path / "cache2"),
                          run__model_dir=str(tmp_path / "other_model"))
  feature_cache.FeatureCache(elsewhere).prepare(cfg.input.eval_data, True,
                                                conftest.CLASS_NAMES)
  mixed = cfg.replace(input__cache_features=elsewhere.input.cache_features)
  with pytest.raises(ConfigError, match="was trained on features of backbone snapshot"):
    feature_cache.FeatureCache(mixed).prepare(cfg.input.train_data, True,
                                              conftest.CLASS_NAMES)


def test_resuming_uncached_random_weights_with_the_cache_is_refused(cache_config):
  cfg = cache_config(backbone__weights="none", run__max_steps=2)
  runner.Experiment(cfg.replace(input__cache_features="")).train()
  # The checkpoint's random backbone is not the one the cache draws.
  with pytest.raises(ConfigError, match="holds other backbone values"):
    runner.Experiment(cfg.replace(run__max_steps=4)).train()
  assert conftest.checkpoint_values(cfg.run.model_dir)["global_step"] == 2


def test_augmented_copies(cache_config):
  cfg = cache_config(input__random_flip="horizontal",
                     input__cache_features_with_augmentation=2)
  cache = feature_cache.FeatureCache(cfg)
  train = cache.prepare(cfg.input.train_data, True, conftest.CLASS_NAMES)
  plain = cache.prepare(cfg.input.train_data, False, conftest.CLASS_NAMES)
  assert len(train.units) == 4 and train.num_examples == 96  # 2 copies of 2 shards
  assert len(plain.units) == 2 and not set(plain.files) & set(train.files)
  copies = [_read_cache([f for f, u in zip(train.files, train.units) if u.copy == c])[0]
            for c in (0, 1)]
  features = _read_cache(plain.files)[0]
  encoded, _ = _records(cfg.input.train_data)
  np.testing.assert_allclose(features, _uncached(cfg, encoded)[0], atol=1e-5)
  # Each copy flips other images, so the copies differ from each other and
  # from the plain features.
  assert not np.allclose(copies[0], copies[1])
  assert not np.allclose(copies[0], features)
  # Fixed seeds: a recomputed copy is identical.
  before = {f: _read_cache([f])[0] for f in train.files}
  for f in train.files:
    os.remove(f[:-len(".tfrecord")] + ".json")
  again = feature_cache.FeatureCache(cfg).prepare(cfg.input.train_data, True,
                                                  conftest.CLASS_NAMES)
  assert again.computed == 4
  for f in again.files:
    np.testing.assert_allclose(_read_cache([f])[0], before[f], atol=1e-6)


# --- configuration errors -------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (dict(freeze__spec="none"), "--cache_features needs a frozen backbone"),
    (dict(input__random_crop=True), "augmentation is on"),
    (dict(input__mixup_alpha=0.2), "--mixup_alpha"),
    (dict(input__cache_features_with_augmentation=2), "no augmentation is on"),
    (dict(input__cache_features="", input__cache_features_with_augmentation=2),
     "needs --cache_features=DIR"),
    (dict(input__cache_features_with_augmentation=-1), "must not be negative"),
])
def test_config_errors(cache_config, overrides, message):
  with pytest.raises(ConfigError, match=message):
    cache_config(**overrides).validate()


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_corrupt_image_is_skipped_or_named(cache_config, tmp_path, policy):
  rng = np.random.RandomState(0)
  examples = [tfrecords.make_example(conftest.encode(conftest.make_image(i % 3, rng)), i % 3)
              for i in range(5)]
  examples[2] = tfrecords.make_example(b"not an image at all", 2)
  data = str(tmp_path / "bad")
  tfrecords.write_shards(examples, data, "bad", 1)
  cfg = cache_config(input__train_data=data, input__on_bad_record=policy)
  cache = feature_cache.FeatureCache(cfg)
  if policy == "fail":
    with pytest.raises(ConfigError, match="bad-00000-of-00001.tfrecord has a record that"):
      cache.prepare(data, True, conftest.CLASS_NAMES)
    return
  cached = cache.prepare(data, True, conftest.CLASS_NAMES)
  assert cached.counts == [4]
  np.testing.assert_array_equal(_read_cache(cached.files)[1], [0, 1, 0, 1])
  with open(cached.files[0][:-len(".tfrecord")] + ".json") as f:
    assert json.load(f)["skipped"] == 1


def test_csv_data_is_a_clear_error(cache_config, tmp_path):
  csv = tmp_path / "data.csv"
  csv.write_text("a,b,label\n1,2,0\n3,4,1\n")
  cfg = cache_config()
  with pytest.raises(ConfigError, match="is CSV data"):
    feature_cache.FeatureCache(cfg).prepare(str(csv), True, ("x", "y"))


# --- training, evaluation and export --------------------------------------------


def _predict_export(path, encoded):
  with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    meta = tf.compat.v1.saved_model.loader.load(sess, [tf.saved_model.SERVING], path)
    signature = meta.signature_def["predict"]
    return sess.run(signature.outputs["probabilities"].name,
                    {signature.inputs["image_bytes"].name: np.array(encoded, object)})


@pytest.mark.parametrize("source,ema", [("h5", 0.9), ("saved_model", 0.0),
                                        ("tf1_hub", 0.0)])
def test_train_evaluate_export_from_cache(cache_config, tiny_backbone, tiny_data, request,
                                          source, ema):
  handle = (request.getfixturevalue("tf1_module")["path"] if source == "tf1_hub"
            else tiny_backbone[source])
  cfg = cache_config(backbone__handle=handle, optimizer__ema_decay=ema,
                     guards__early_stopping_metric="accuracy", guards__eval_every_steps=3)
  experiment = runner.Experiment(cfg)
  assert experiment.train() == 6
  # The interleaved evaluations ran on cached eval features; best copy kept.
  assert experiment.outcome.best and experiment.outcome.last_eval["step"] == 6
  values = conftest.checkpoint_values(cfg.run.model_dir)
  assert "head_logits/kernel" in values and values["global_step"] == 6
  assert not [n for n in values if "conv" in n or "bn" in n]  # only the head trains
  metrics = experiment.evaluate()

  path = experiment.export()
  encoded, _ = _records(tiny_data["eval"])
  served = _predict_export(path, encoded)
  # Uncached reference: pretrained backbone loaded the ordinary way, head
  # weights (their moving averages with EMA) from the cached run.
  suffix = "/ExponentialMovingAverage" if ema else ""
  head_values = {n: values[n + suffix] for n in ("head_logits/kernel", "head_logits/bias")}
  _, expected = _uncached(cfg, encoded, head_values=head_values)
  np.testing.assert_allclose(served, expected, atol=1e-5)

  # The composed checkpoint is an ordinary full checkpoint: the uncached
  # model evaluates it to the same metrics the cached evaluation gave.
  full = experiment.servable_checkpoint()
  plain = runner.Experiment(cfg.replace(input__cache_features=""))
  uncached_metrics = plain.evaluate(checkpoint_path=full)
  assert uncached_metrics["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
  assert uncached_metrics["loss"] == pytest.approx(metrics["loss"], abs=1e-5)


def test_cli_trains_and_exports_from_cache_and_errors_in_one_line(tiny_backbone, tiny_data,
                                                                  tmp_path):
  common = [f"--backbone={tiny_backbone['h5']}", f"--train_data={tiny_data['train']}",
            f"--eval_data={tiny_data['eval']}", f"--cache_features={tmp_path / 'cache'}",
            "--batch_size=8", "--max_steps=4", "--save_checkpoints_steps=4", "--seed=3"]
  result = conftest.run_cli("et-train", *common, "--freeze=all",
                            f"--model_dir={tmp_path / 'model'}",
                            f"--export_dir={tmp_path / 'export'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "trained to step 4" in result.stdout
  version = os.path.join(tmp_path / "export", os.listdir(tmp_path / "export")[0])
  with open(os.path.join(version, "assets.extra", "et_export.json")) as f:
    assert "/feature_cache/full/" in json.load(f)["checkpoint"]
  encoded, _ = _records(tiny_data["eval"])
  assert _predict_export(version, encoded[:3]).shape == (3, 3)
  # A trainable backbone: one line, exit 1, nothing written.
  result = conftest.run_cli("et-train", *common, "--freeze=none",
                            f"--model_dir={tmp_path / 'model2'}")
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith("et-train: error: ")]
  assert len(errors) == 1 and "--cache_features needs a frozen backbone" in errors[0]
  assert not os.path.exists(tmp_path / "model2" / "config.json")


@pytest.mark.parametrize("limit, tuned", [(1 << 30, False), (16, True)])
def test_features_held_in_memory_train_without_the_autotuning_thread(tmp_path, monkeypatch,
                                                                       limit, tuned):
  # Held in memory, the cached features leave tf.data nothing to tune, and
  # its autotuning thread would hold up the end of training (the session's
  # close waits for it to wake). Set on the root dataset: an intermediate
  # with_options is not what the iterator reads.
  from estimator_transfer.config import InputConfig  # pylint: disable=import-outside-toplevel
  from estimator_transfer.feature_cache import input_fn as cached_input  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "unit.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for label in range(4):
      example = tf.train.Example(features=tf.train.Features(feature={
          store.FEATURE_KEY: tf.train.Feature(float_list=tf.train.FloatList(value=[label] * 3)),
          store.LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}))
      writer.write(example.SerializeToString())
  monkeypatch.setattr(cached_input, "_IN_MEMORY_BYTES", limit)
  cached = cached_input.CachedData(files=[path], counts=[4], feature_dim=3, computed=0,
                                   units=[])
  input_fn = cached_input.build_cached_input_fn(cached, InputConfig(batch_size=2),
                                                training=True, seed=1, num_epochs=1)
  dataset = input_fn()
  assert dataset.options().autotune.enabled is (None if tuned else False)  # None: default, on
  labels = sorted(int(l) for _, batch in dataset for l in batch.numpy())
  assert labels == [0, 1, 2, 3]


def test_unit_records_framed_by_hand_parse_to_the_protobuf_message():
  # The float list is written without protobuf's per-value conversion; every
  # record must parse to exactly the message protobuf builds (odd values,
  # big and negative labels, a 1-float and a 7,840-float row).
  for dim in (1, 7840):
    features = np.random.RandomState(dim).randn(5, dim).astype(np.float32)
    features[0, 0], features[1, -1] = np.inf, np.nan
    labels = np.array([0, 1, 127, 128, 1 << 40]) * (-1 if dim == 1 else 1)
    for raw, row, label in zip(store._examples(features, labels), features, labels):  # pylint: disable=protected-access
      expected = tf.train.Example(features=tf.train.Features(feature={
          store.FEATURE_KEY: tf.train.Feature(float_list=tf.train.FloatList(value=row)),
          store.LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}))
      parsed = tf.train.Example.FromString(raw)
      got = np.array(parsed.features.feature[store.FEATURE_KEY].float_list.value, np.float32)
      np.testing.assert_array_equal(got, row)  # NaN-aware: message equality is not
      assert parsed.features.feature[store.LABEL_KEY] == expected.features.feature[store.LABEL_KEY]
      assert set(parsed.features.feature) == {store.FEATURE_KEY, store.LABEL_KEY}


def test_extraction_datasets_run_without_the_autotuning_thread(cache_config):
  # The extractor's session lives to the end of the process; with tf.data's
  # autotuning thread, closing it waited seconds for that thread to wake.
  from estimator_transfer.feature_cache import extractor as extractor_lib  # pylint: disable=import-outside-toplevel
  cfg = cache_config()
  with tf.Graph().as_default():
    feeds = extractor_lib._Feeds.build()  # pylint: disable=protected-access
    datasets = extractor_lib._datasets(cfg.input, 32, feeds)  # pylint: disable=protected-access
    assert datasets and all(ds.options().autotune.enabled is False for ds in datasets.values())
