"""et-retrain with real processes: kills in every phase, a live stream of shards,
new classes, a rejected round, SIGTERM; numeric features in-process."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import tfrecords
from estimator_transfer.retrain import faults
from estimator_transfer.retrain import store as store_lib
from estimator_transfer.serving import versions

from conftest import CLASS_NAMES, encode, make_image
from faults.fault_tools import console_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shard_bytes(names, count, seed, wrong=False):
  """A TFRecord file's bytes: colour images of `names` (ids of CLASS_NAMES).

  wrong=True labels every image as the next colour: deliberately mislabeled.
  """
  rng = np.random.RandomState(seed)
  path = f"/tmp/et-retrain-shard-{os.getpid()}-{seed}"
  with tf.io.TFRecordWriter(path) as writer:
    for i in range(count):
      colour = CLASS_NAMES.index(names[i % len(names)])
      label = (colour + 1) % len(CLASS_NAMES) if wrong else colour
      writer.write(tfrecords.make_example(encode(make_image(colour, rng)),
                                          label).SerializeToString())
  with open(path, "rb") as f:
    data = f.read()
  os.remove(path)
  return data


def _publish(path, data):
  """As a producer should: write under a temporary name, then rename."""
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)


def _dirs(tmp_path):
  incoming, evaluation = tmp_path / "incoming", tmp_path / "eval"
  incoming.mkdir()
  evaluation.mkdir()
  labels_lib.write_labels_file(str(incoming / "labels.txt"), CLASS_NAMES)
  labels_lib.write_labels_file(str(evaluation / "labels.txt"), CLASS_NAMES)
  (evaluation / "eval.tfrecord").write_bytes(_shard_bytes(CLASS_NAMES, 24, seed=99))
  return incoming, evaluation


def _command(tiny_backbone, tmp_path, incoming, evaluation, *extra):
  return [console_script("et-retrain"), f"--train_data={incoming}",
          f"--eval_data={evaluation}", f"--model_dir={tmp_path / 'model'}",
          f"--export_dir={tmp_path / 'export'}", f"--backbone={tiny_backbone['h5']}",
          "--freeze=none", "--batch_size=8", "--shuffle_buffer=32", "--lr_values=0.05",
          "--seed=3", "--save_checkpoints_steps=2", "--settle_secs=0.3",
          "--poll_secs=0.1", "--min_new_examples=16", "--epochs_per_round=1",
          "--replay_ratio=0.5", "--max_regression=0.05", *extra]


def _run(argv, env_extra=None, timeout=240):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env_extra or {}))
  return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _state(tmp_path):
  store = store_lib.Store(str(tmp_path / "model"))
  export = str(tmp_path / "export")
  names = os.listdir(export) if os.path.isdir(export) else []
  numeric = [n for n in names if n.isdigit()]
  # Nothing half-written is ever visible: every numeric name is a whole SavedModel.
  assert len(versions.list_versions(export)) == len(numeric), names
  return store.journals(), store.ledger(), numeric, [n for n in names if not n.isdigit()]


def test_kill_in_every_phase_then_restart(tiny_backbone, tmp_path):
  incoming, evaluation = _dirs(tmp_path)
  _publish(str(incoming / "a.tfrecord"), _shard_bytes(CLASS_NAMES, 24, seed=1))
  # 24 examples x 4 epochs / batch 8 = 12 steps: kills land mid-training.
  argv = _command(tiny_backbone, tmp_path, incoming, evaluation, "--max_rounds=1",
                  "--epochs_per_round=4")
  expected = {  # kill point -> (return code, journal phase after, ledger lines, versions)
      "training": (-9, store_lib.PLANNED, 0, 0),
      "sigterm": (0, store_lib.PLANNED, 0, 0),
      "evaluating": (-9, store_lib.TRAINED, 0, 0),
      "exporting": (-9, store_lib.EVALUATED, 0, 0),
      "published": (-9, store_lib.EVALUATED, 0, 1),
      "ledger": (-9, store_lib.PUBLISHED, 1, 1),
  }
  for point, (code, phase, ledger_lines, version_count) in expected.items():
    result = _run(argv, {faults.ENV: f"{point}@1"})
    assert result.returncode == code, (point, result.stderr[-3000:])
    journals, ledger, numeric, others = _state(tmp_path)
    assert [j["phase"] for j in journals] == [phase], point
    assert len(ledger) == ledger_lines and len(numeric) == version_count, point
    if point == "exporting":
      assert others and all(n.startswith(versions.TEMP_PREFIX) for n in others)
  # The same command once more finishes the round: one round, one version, one line.
  result = _run(argv)
  assert result.returncode == 0, result.stderr[-3000:]
  journals, ledger, numeric, others = _state(tmp_path)
  assert [j["phase"] for j in journals] == [store_lib.DONE] and not others
  assert len(numeric) == 1 and ledger[0]["version"] == int(numeric[0])
  assert [line["round"] for line in ledger] == [1] and ledger[0]["shards"] == ["a.tfrecord"]
  # Training resumed across the kills: the round's steps were run once, to the end.
  assert journals[0]["trained_steps"] == journals[0]["steps"] == 12
  assert ledger[0]["decision"] == store_lib.ACCEPTED


def _wait(predicate, what, process, timeout=900):
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    value = predicate()
    if value:
      return value
    assert process.poll() is None, f"et-retrain exited while waiting for {what}"
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}")


def test_stream_of_shards_new_classes_and_a_rejected_round(tiny_backbone, tmp_path):
  incoming, evaluation = _dirs(tmp_path)
  store = store_lib.Store(str(tmp_path / "model"))
  # A shard still being written under its final name (stable, but it ends in
  # mid-record), one under a temporary name, a hidden one: none is consumed.
  late = _shard_bytes(["red", "green", "blue"], 18, seed=3)
  (incoming / "c.tfrecord").write_bytes(late[:len(late) // 2])
  (incoming / "e.tfrecord.tmp").write_bytes(late)
  (incoming / ".f.tfrecord").write_bytes(late)
  argv = _command(tiny_backbone, tmp_path, incoming, evaluation, "--max_rounds=0")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  log_path = tmp_path / "stderr.txt"
  with open(log_path, "w") as log:
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=log, text=True)
    try:
      time.sleep(1.5)
      _publish(str(incoming / "a.tfrecord"), _shard_bytes(["red", "green"], 24, seed=1))
      _wait(lambda: store.journals(), "round 1's plan", process)
      # Arrives mid-round: the next round's; the truncated shard is completed.
      _publish(str(incoming / "b.tfrecord"), _shard_bytes(["blue", "red", "green"], 24, 2))
      with open(incoming / "c.tfrecord", "ab") as f:
        f.write(late[len(late) // 2:])
      _wait(lambda: len(store.ledger()) >= 2, "round 2", process)
      _publish(str(incoming / "d.tfrecord"), _shard_bytes(CLASS_NAMES, 48, 4, wrong=True))
      _wait(lambda: len(store.ledger()) >= 3, "round 3", process)
      process.send_signal(signal.SIGTERM)
      stdout, _ = process.communicate(timeout=60)
    finally:
      if process.poll() is None:
        process.kill()
  stderr = log_path.read_text()
  assert process.returncode == 0, stderr[-3000:]
  assert "not consuming c.tfrecord yet" in stderr and "stopped by SIGTERM" in stdout
  ledger = store.ledger()
  assert [line["shards"] for line in ledger] == [["a.tfrecord"], ["b.tfrecord", "c.tfrecord"],
                                                 ["d.tfrecord"]]
  first, second, third = ledger
  assert first["new_classes"] == ["red", "green"] and second["new_classes"] == ["blue"]
  assert second["class_names"] == ["red", "green", "blue"]
  assert second["challenger"]["new_class_accuracy"] is not None
  assert second["champion"]["old_class_accuracy"] is not None
  assert [l["decision"] for l in ledger] == ["published", "published", "rejected"]
  assert third["version"] is None and third["champion_round"] == 2
  assert third["challenger"]["accuracy"] < third["champion"]["accuracy"] - 0.05
  # The published model did not change: the newest version is round 2's.
  published = versions.list_versions(str(tmp_path / "export"))
  assert [int(os.path.basename(p)) for p in published] == [first["version"],
                                                           second["version"]]
  champion = json.load(open(tmp_path / "model" / "champion.json"))
  assert champion["round"] == 2 and champion["version"] == second["version"]
  assert all(l["data_to_serving_secs"] > 0 for l in ledger[:2])
  # Replay: round 3 replays rounds 1-2; a rejected round's data is never replayed.
  assert [j["replay"] for j in store.journals()][1:] == [["data/0001-000.tfrecord"],
                                                         ["data/0001-000.tfrecord",
                                                          "data/0002-000.tfrecord",
                                                          "data/0002-001.tfrecord"]]
