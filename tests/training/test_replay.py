"""Retraining on new data: label maps merged by name, labels remapped, replay mixed in."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from estimator_transfer.data import relabel
from estimator_transfer.training import experiment as runner
from estimator_transfer.training import warm_start
from estimator_transfer.cli import flags as et_flags
from estimator_transfer.errors import ConfigError
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import tfrecords

from conftest import encode, make_image
from continual_helpers import read_checkpoint

RGB = {"red": 0, "green": 1, "blue": 2}


def _write(out_dir, names, count, seed):
  """TFRecords of the colour classes `names`, ids in that order, with labels.txt."""
  rng = np.random.RandomState(seed)
  examples = [tfrecords.make_example(encode(make_image(RGB.get(names[i % len(names)], 0), rng)),
                                     i % len(names), names[i % len(names)])
              for i in range(count)]
  tfrecords.write_shards(examples, out_dir, "data", 1)
  labels_lib.write_labels_file(os.path.join(out_dir, "labels.txt"), names)
  return out_dir


def _parse(*args):
  """flags -> config in-process, as et-train does."""
  et_flags.define_flags()
  try:
    flags.FLAGS(["et-train", *args])
    return et_flags.flags_to_config(flags.FLAGS)
  finally:
    flags.FLAGS.unparse_flags()


def test_merge_and_mapping_by_name():
  assert relabel.merge_class_names(["0", "1"], None, ["5", "1", "6"]) == ["0", "1", "5", "6"]
  assert relabel.label_mapping(["5", "6"], ["0", "1", "5", "6"]) == [2, 3]
  assert relabel.label_mapping(["0", "1"], ["0", "1"]) is None
  with pytest.raises(ConfigError, match="class '7' of new is not one of the model's"):
    relabel.label_mapping(["5", "7"], ["0", "5"], "new")


@pytest.mark.parametrize("multi_hot", [False, True])
def test_replay_mixing_ratio_and_remapped_labels(multi_hot):
  # New data: classes c, d (ids 0, 1 in its own map); old: a, b. Model: a, b, c, d.
  def source(names, marker):
    def input_fn():
      ids = tf.constant([0, 1] * 4, tf.int32)
      labels = tf.one_hot(ids, 2) if multi_hot else ids
      ds = tf.data.Dataset.from_tensor_slices(({"src": tf.fill([8], marker)}, labels))
      return ds.repeat().batch(4)
    return relabel.remap_labels(input_fn, relabel.label_mapping(names, "abcd"), 4)

  mixed = relabel.mix_input_fns(source("cd", 1), source("ab", 0), 0.25, batch_size=8,
                                  seed=1)
  srcs, labels = [], []
  for features, label in mixed().take(100):
    srcs.append(features["src"].numpy())
    labels.append(np.argmax(label, -1) if multi_hot else label.numpy())
  srcs, labels = np.concatenate(srcs), np.concatenate(labels)
  assert labels.shape == (800,)
  assert abs(np.mean(srcs == 0) - 0.25) < 0.05
  assert set(labels[srcs == 0]) == {0, 1} and set(labels[srcs == 1]) == {2, 3}


def test_continue_on_new_classes_with_replay(tiny_data, tiny_backbone, tmp_path):
  old = _write(str(tmp_path / "old"), ["red", "green"], 32, seed=1)
  new = _write(str(tmp_path / "new"), ["blue"], 16, seed=2)
  common = [f"--backbone={tiny_backbone['h5']}", "--freeze=none", "--batch_size=8",
            "--shuffle_buffer=64", "--save_checkpoints_steps=4", "--seed=5",
            "--lr_values=0.05"]
  old_cfg = _parse(*common, f"--train_data={old}", f"--model_dir={tmp_path / 'm_old'}",
                   "--max_steps=4")
  assert old_cfg.head.class_names == ("red", "green")
  runner.Experiment(old_cfg).train()

  # The old model's classes come first (ids kept), the new data's are appended.
  args = common + [f"--train_data={new}", f"--replay_data={old}", "--replay_ratio=0.5",
                   f"--warm_start_from={tmp_path / 'm_old'}", "--max_steps=2",
                   f"--model_dir={tmp_path / 'm_new'}", f"--eval_data={old}"]
  cfg = _parse(*args)
  assert cfg.head.class_names == ("red", "green", "blue") and cfg.head.num_classes == 3
  experiment = runner.Experiment(cfg)
  labels = np.concatenate([l.numpy() for _, l in experiment.train_input_fn()().take(20)])
  assert set(labels) == {0, 1, 2}  # red/green from the replay, blue (0 in its map) -> 2
  assert experiment.train() == 2
  record = json.load(open(os.path.join(cfg.run.model_dir, warm_start.RECORD_FILENAME)))
  assert record["source_class_names"] == ["red", "green"]
  assert "head_logits/kernel" in record["merged_class_rows"]
  # Evaluating on the old data maps its ids onto the 3-class model.
  assert set(experiment.evaluate(old)) >= {"accuracy", "loss"}
  # Re-parsing on resume keeps the saved class list (no growth, no error),
  # and replay data whose classes the model lacks is refused by name.
  assert _parse(*args).head.class_names == ("red", "green", "blue")
  stray = _write(str(tmp_path / "stray"), ["red", "purple"], 4, seed=3)
  with pytest.raises(ConfigError, match="allow_config_change"):
    runner.Experiment(_parse(*args[:-4], f"--replay_data={stray}", "--max_steps=3",
                             f"--model_dir={tmp_path / 'm_new'}")).train()
  assert read_checkpoint(tf.train.latest_checkpoint(cfg.run.model_dir))["global_step"] == 2


def test_keep_old_classes_off_uses_the_data_classes_only(tiny_backbone, tmp_path,
                                                         monkeypatch):
  new = _write(str(tmp_path / "new"), ["blue", "red"], 4, seed=2)
  monkeypatch.setattr(warm_start, "resolve_source",
                      lambda path: warm_start.Source("x", ("red", "green")))
  base = [f"--backbone={tiny_backbone['h5']}", f"--train_data={new}",
          "--warm_start_from=somewhere", f"--model_dir={tmp_path / 'm'}"]
  assert _parse(*base).head.class_names == ("red", "green", "blue")
  assert _parse(*base, "--nokeep_old_classes").head.class_names == ("blue", "red")
