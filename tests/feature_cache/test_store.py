"""The feature cache's files: unit records and markers, published directories,
stale temporaries, snapshots and composed checkpoints."""
import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer import files
from estimator_transfer.feature_cache import key as key_lib
from estimator_transfer.feature_cache import store


def _unit(key="u1"):
  return key_lib.Unit(key, "tfrecord", ("in.tfrecord",), (), False, -1, 7, "in.tfrecord")


def _snapshot(directory, values, feature_dim=3):
  """Publishes a snapshot of `values` (as the extractor does) and reads it."""
  tmp = store.temp_dir(directory)
  store.write_checkpoint(store.snapshot_prefix(tmp), values)
  store.write_snapshot_meta(tmp, values, feature_dim, {"kind": "test"})
  assert store.publish_dir(tmp, directory)
  return store.read_snapshot(directory)


def test_unit_round_trip_and_marker(tmp_path):
  root = str(tmp_path)
  snapshot = store.Snapshot(str(tmp_path / "backbone"), "abc", 3)
  features = np.arange(6, dtype=np.float32).reshape(2, 3)
  marker = store.write_unit(root, _unit(), snapshot, features, np.array([2, 0]), skipped=1)
  path, marker_path = store.unit_paths(root, "u1")
  assert path == os.path.join(root, "units", "u1.tfrecord")
  with open(marker_path) as f:
    assert json.load(f) == marker
  assert marker["count"] == 2 and marker["skipped"] == 1 and marker["bytes"] == \
      os.path.getsize(path) and marker["snapshot"] == "abc" and marker["feature_dim"] == 3
  records = [tf.train.Example.FromString(r).features.feature
             for r in tf.compat.v1.io.tf_record_iterator(path)]
  np.testing.assert_array_equal([list(r[store.FEATURE_KEY].float_list.value) for r in records],
                                features)
  assert [r[store.LABEL_KEY].int64_list.value[0] for r in records] == [2, 0]
  assert store.count_records(path) == 2
  assert not [n for n in os.listdir(os.path.dirname(path)) if files.TEMP_MARK in n]
  assert store.done_marker(root, "u1", snapshot) == marker


@pytest.mark.parametrize("change", ["other_snapshot", "other_dim", "truncated", "no_marker"])
def test_done_marker_rejects_what_is_not_this_unit(tmp_path, change):
  root = str(tmp_path)
  snapshot = store.Snapshot(str(tmp_path / "backbone"), "abc", 3)
  store.write_unit(root, _unit(), snapshot, np.ones([4, 3], np.float32), np.zeros([4]), 0)
  path, marker_path = store.unit_paths(root, "u1")
  if change == "other_snapshot":
    snapshot = store.Snapshot(snapshot.directory, "other", 3)
  elif change == "other_dim":
    snapshot = store.Snapshot(snapshot.directory, "abc", 4)
  elif change == "truncated":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) - 1)
    assert store.count_records(path) == 4  # the broken tail counts as a bad record
  else:
    os.remove(marker_path)
  assert store.done_marker(root, "u1", snapshot) is None


def test_publish_dir_lets_exactly_one_writer_win(tmp_path):
  final = str(tmp_path / "published")
  first, second = store.temp_dir(final), store.temp_dir(final)
  assert files.TEMP_MARK in os.path.basename(first) and first != second
  for tmp, text in ((first, "first"), (second, "second")):
    files.write_atomically(os.path.join(tmp, "f.txt"), text)
  assert store.publish_dir(first, final)
  assert not store.publish_dir(second, final)
  assert not os.path.exists(second)
  with open(os.path.join(final, "f.txt")) as f:
    assert f.read() == "first"


def test_stale_temporaries_are_removed_fresh_ones_kept(tmp_path):
  stale_file, fresh_file = tmp_path / "a.json.tmp-1-dead", tmp_path / "b.json.tmp-2-live"
  stale_dir = tmp_path / "backbone.tmp-3-dead"
  stale_dir.mkdir()
  (stale_dir / "x").write_text("x")
  for path in (stale_file, fresh_file, tmp_path / "kept.json"):
    path.write_text("{}")
  old = time.time() - 7200
  for path in (stale_file, stale_dir, tmp_path / "kept.json"):
    os.utime(path, (old, old))
  store.remove_stale_temps(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["b.json.tmp-2-live", "kept.json"]


def test_read_json_is_none_for_missing_or_torn_files(tmp_path):
  assert store.read_json(str(tmp_path / "missing.json")) is None
  (tmp_path / "torn.json").write_text("{not json")
  assert store.read_json(str(tmp_path / "torn.json")) is None
  (tmp_path / "ok.json").write_text('{"a": 1}')
  assert store.read_json(str(tmp_path / "ok.json")) == {"a": 1}


def test_write_key_keeps_the_first(tmp_path):
  store.write_key(str(tmp_path), {"b": 1, "a": 2})
  store.write_key(str(tmp_path), {"other": 3})
  with open(tmp_path / store.KEY_FILENAME) as f:
    assert f.read() == json.dumps({"a": 2, "b": 1}, indent=1, sort_keys=True)


def test_snapshot_id_is_the_values_content(tmp_path):
  values = {"conv/kernel": np.arange(4, dtype=np.float32).reshape(2, 2),
            "bn/moving_mean": np.ones([2], np.float32)}
  snapshot = _snapshot(str(tmp_path / "backbone"), values)
  assert snapshot.id == store.values_id(values) and snapshot.feature_dim == 3
  assert snapshot.prefix == os.path.join(str(tmp_path / "backbone"), store.SNAPSHOT_PREFIX)
  read = store.read_checkpoint(snapshot.prefix)
  assert sorted(read) == sorted(values)
  for name, value in values.items():
    np.testing.assert_array_equal(read[name], value)
  changed = dict(values, **{"conv/kernel": values["conv/kernel"] + 1})
  assert store.values_id(changed) != snapshot.id
  assert store.read_snapshot(str(tmp_path / "nothing")) is None


def test_full_checkpoint_composes_snapshot_and_head_and_prunes(tmp_path):
  pinned = _snapshot(str(tmp_path / "backbone"), {"conv/kernel": np.ones([2], np.float32)})
  full_root = str(tmp_path / "full")
  prefixes = []
  for step in (1, 2, 3):
    head = str(tmp_path / "model" / f"model.ckpt-{step}")
    os.makedirs(os.path.dirname(head), exist_ok=True)
    store.write_checkpoint(head, {"head/kernel": np.full([2], step, np.float32),
                                  "global_step": np.array(step, np.int64)})
    prefixes.append(store.compose_full_checkpoint(pinned, head, full_root, keep=2))
    assert store.compose_full_checkpoint(pinned, head, full_root, keep=2) == prefixes[-1]
    time.sleep(0.01)  # distinct mtimes: pruning keeps the newest
  values = store.read_checkpoint(prefixes[-1])
  assert sorted(values) == ["conv/kernel", "global_step", "head/kernel"]
  assert values["global_step"] == 3 and values["head/kernel"][0] == 3
  assert sorted(os.listdir(full_root)) == sorted(
      os.path.basename(os.path.dirname(p)) for p in prefixes[1:])
