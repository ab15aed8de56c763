"""et-retrain's parts in-process: complete-shard checks, the ledger, numeric features."""
import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer import config as config_lib
from estimator_transfer.config.sections import RetrainConfig
from estimator_transfer.data import tfrecords
from estimator_transfer.errors import ConfigError
from estimator_transfer.retrain import rounds
from estimator_transfer.retrain import service
from estimator_transfer.retrain import shards
from estimator_transfer.retrain import store as store_lib


def test_which_units_are_complete(tmp_path):
  data = tmp_path / "incoming"
  (data / "batch-1" / "cat").mkdir(parents=True)
  (data / "batch-1" / "cat" / "a.png").write_bytes(
      tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy())
  path = str(data / "x.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for label in (0, 1, 1):
      writer.write(tfrecords.make_example(b"img", label).SerializeToString())
  for name in ("y.tfrecord.tmp", "y.tfrecord.tmp-12-ab", ".hidden", "_partial",
               "z.partial", "labels.txt"):
    (data / name).write_bytes(b"x")
  (data / "n.csv").write_text("a,label\n1,0\n")
  assert shards.list_candidates(str(data), numeric=False) == {
      "batch-1": shards.FOLDER, "x.tfrecord": shards.TFRECORD}
  assert shards.list_candidates(str(data), numeric=True) == {"n.csv": shards.CSV}
  cfg = config_lib.InputConfig()
  records = shards.read_unit(path, shards.TFRECORD, cfg, ["cat", "dog"])
  assert records.names == ["cat", "dog", "dog"] and records.class_counts() == {"cat": 1,
                                                                              "dog": 2}
  folder = shards.read_unit(str(data / "batch-1"), shards.FOLDER, cfg, None)
  assert folder.names == ["cat"]
  # Not ready: a label id beyond labels.txt, a file cut inside a record or with
  # a flipped byte (CRC), a CSV without its final newline, a cut image.
  with pytest.raises(shards.NotReady, match="beyond the 1 names"):
    shards.read_unit(path, shards.TFRECORD, cfg, ["cat"])
  whole = open(path, "rb").read()
  for broken in (whole[:-3], whole[:20] + bytes([whole[20] ^ 1]) + whole[21:]):
    open(path, "wb").write(broken)
    with pytest.raises(shards.NotReady, match="ends inside a record or fails a CRC"):
      shards.read_unit(path, shards.TFRECORD, cfg, ["cat", "dog"])
  (data / "n.csv").write_text("a,label\n1,0")
  with pytest.raises(shards.NotReady, match="newline"):
    shards.read_unit(str(data / "n.csv"), shards.CSV, cfg, None)
  png = data / "batch-1" / "cat" / "a.png"
  png.write_bytes(png.read_bytes()[:30])
  with pytest.raises(shards.NotReady):
    shards.read_unit(str(data / "batch-1"), shards.FOLDER, cfg, None)
  # Settling: unchanged for settle_secs; any change restarts the wait.
  settler = shards.Settler(2.0)
  assert not settler.settled("x", (1, 5, 1), now=0.0)
  assert not settler.settled("x", (1, 5, 1), now=1.0)
  assert settler.settled("x", (1, 5, 1), now=2.5)
  assert not settler.settled("x", (2, 6, 1), now=3.0)
  assert not settler.settled("x", None, now=9.0)  # a temporary part inside a folder


def test_steps_decision_and_ledger(tmp_path):
  # 96 new examples, batch 8, 2 epochs: 24 steps alone, 48 with half replay.
  assert rounds.steps_for(96, 8, 2.0, 0.5, replays=False) == 24
  assert rounds.steps_for(96, 8, 2.0, 0.5, replays=True) == 48
  assert rounds.steps_for(1, 32, 1.0, 0.0, replays=False) == 1
  base, retrain = config_lib.ExperimentConfig(), RetrainConfig(max_regression=0.02)
  result = {"challenger_on_old": {"accuracy": 0.79, "loss": 0.5},
            "champion": {"accuracy": 0.80, "loss": 0.4}}
  assert rounds.decide(result, base, retrain)[0] == store_lib.ACCEPTED
  assert rounds.decide(dict(result, champion={"accuracy": 0.9}), base,
                       retrain)[0] == store_lib.REJECTED
  by_loss = base.replace(export__best_metric="loss")
  decision, reason = rounds.decide(result, by_loss, retrain)
  assert decision == store_lib.REJECTED and "loss 0.5000 vs champion 0.4000" in reason
  assert rounds.decide({}, base, retrain)[0] == store_lib.ACCEPTED  # the first model
  store = store_lib.Store(str(tmp_path))
  assert store.append_ledger({"round": 1, "x": 1})
  assert not store.append_ledger({"round": 1, "x": 2})  # never twice
  assert store.ledger() == [{"round": 1, "x": 1}]


def _csv(path, classes, count, seed):
  """Numeric features: class k sits around 3k in all 4 columns."""
  rng = np.random.RandomState(seed)
  lines = ["a,b,c,d,label"]
  for i in range(count):
    name = classes[i % len(classes)]
    centre = {"low": -3.0, "mid": 0.0, "high": 3.0}[name]
    lines.append(",".join(f"{v:.3f}" for v in rng.normal(centre, 0.3, 4)) + f",{name}")
  path.write_text("\n".join(lines) + "\n")


def _numeric_base(tmp_path, incoming, class_names):
  """An et-retrain config on numeric CSV features (identity backbone) in tmp_path."""
  return config_lib.ExperimentConfig(
      backbone=config_lib.BackboneConfig(handle="identity"),
      head=config_lib.HeadConfig(num_classes=len(class_names), class_names=tuple(class_names)),
      schedule=config_lib.ScheduleConfig(values=(0.1,)),
      input=config_lib.InputConfig(train_data=str(incoming),
                                   eval_data=str(tmp_path / "eval.csv"), batch_size=8),
      run=config_lib.RunConfig(model_dir=str(tmp_path / "model"), seed=1,
                               save_checkpoints_steps=100))


def test_numeric_features_rounds_without_export(tmp_path):
  incoming = tmp_path / "incoming"
  incoming.mkdir()
  _csv(tmp_path / "eval.csv", ["low", "mid", "high"], 30, seed=9)
  _csv(incoming / "001.csv", ["low", "high"], 32, seed=1)
  base = _numeric_base(tmp_path, incoming, ("low", "mid", "high"))
  retrain = RetrainConfig(min_new_examples=8, epochs_per_round=4, settle_secs=0,
                          poll_secs=0.05, max_rounds=1, max_regression=0.1)
  first = service.Service(base, retrain).run()
  assert [r["new_classes"] for r in first.rounds] == [["low", "high"]]
  _csv(incoming / "002.csv", ["mid", "low", "high"], 30, seed=2)
  # The same command again (a restart) runs the next round on the new file only.
  second = service.Service(base, dataclasses.replace(retrain, max_rounds=2)).run()
  (line,) = second.rounds
  assert line["shards"] == ["002.csv"] and line["new_classes"] == ["mid"]
  assert line["class_names"] == ["low", "high", "mid"]
  assert line["decision"] == store_lib.ACCEPTED and line["version"] is None
  assert line["challenger"]["old_class_accuracy"] >= 0.9
  assert line["champion"]["old_class_accuracy"] >= 0.9
  assert line["challenger"]["new_class_accuracy"] is not None
  champion = json.load(open(tmp_path / "model" / rounds.CHAMPION_FILENAME))
  assert champion["round"] == 2 and champion["checkpoint"].startswith("rounds/0002/")
  # The CSV copies carry model ids: 'mid' is id 2 of the round's model.
  copy = (tmp_path / "model" / "data" / "0002-000.csv").read_text().splitlines()
  assert copy[1].endswith(",2")
  with pytest.raises(ConfigError, match="numeric features"):
    service.validate(base.replace(export__export_dir=str(tmp_path / "e")), retrain)
  with pytest.raises(ConfigError, match="--poll_secs=0"):
    service.validate(base, dataclasses.replace(retrain, poll_secs=0))


def test_round_every_secs_starts_a_round_with_fewer_new_examples(tmp_path):
  import threading  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  incoming = tmp_path / "incoming"
  incoming.mkdir()
  _csv(tmp_path / "eval.csv", ["low", "high"], 20, seed=9)
  _csv(incoming / "001.csv", ["low", "high"], 16, seed=1)
  base = _numeric_base(tmp_path, incoming, ("low", "high"))
  # 16 waiting examples, far below --min_new_examples: without the timer no
  # round starts (the service waits until it is stopped).
  retrain = RetrainConfig(min_new_examples=1000, epochs_per_round=1, settle_secs=0,
                          poll_secs=0.05, max_rounds=1, max_regression=1.0)
  waiting = service.Service(base, retrain)
  threading.Timer(1.0, lambda: setattr(waiting, "_signal", "SIGTERM")).start()
  stopped = waiting.run()
  assert stopped.rounds == [] and stopped.stopped_by == "SIGTERM"
  start = time.monotonic()
  timed = service.Service(base, dataclasses.replace(retrain, round_every_secs=0.5))
  guard = threading.Timer(120.0, lambda: setattr(timed, "_signal", "SIGTERM"))  # never hang
  guard.start()
  try:
    (line,) = timed.run().rounds
  finally:
    guard.cancel()
  assert line["shards"] == ["001.csv"] and time.monotonic() - start >= 0.5
