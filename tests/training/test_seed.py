"""--seed: two fresh et-train runs with the same flags give bit-identical checkpoints.

Real `et-train` processes on CPU, covering every source of randomness a run
has: a randomly initialised backbone (--backbone_weights=none), the head's
initializers, shuffles, augmentation, dropout, mixup and replay sampling.
"""
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli, write_tfrecord_split

STEPS = 6


@pytest.fixture(scope="module")
def replay_data(tmp_path_factory):
  """A second tiny split (other images, same classes) to replay."""
  return write_tfrecord_split(str(tmp_path_factory.mktemp("seed_replay") / "replay"), 24,
                              seed=5, shards=1)


def _train(model_dir, tiny_data, tiny_backbone, replay, seed, *extra):
  result = run_cli(
      "et-train", f"--backbone={tiny_backbone['h5']}", "--backbone_weights=none",
      "--freeze=none", f"--train_data={tiny_data['train']}", f"--replay_data={replay}",
      "--replay_ratio=0.3", "--batch_size=4", "--shuffle_buffer=32",
      "--random_flip=horizontal", "--random_crop", "--dropout_rate=0.3",
      "--mixup_alpha=0.2", f"--max_steps={STEPS}", "--save_checkpoints_steps=100",
      "--log_every_steps=100", f"--seed={seed}", f"--model_dir={model_dir}", *extra)
  assert result.returncode == 0, result.stderr[-3000:]
  return str(model_dir)


def _tensors(model_dir, step):
  prefix = os.path.join(model_dir, f"model.ckpt-{step}")
  assert tf.io.gfile.exists(prefix + ".index"), f"no checkpoint {prefix}"
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _differing(a, b):
  assert set(a) == set(b), f"the checkpoints hold other variables: {sorted(set(a) ^ set(b))}"
  return sorted(name for name in a if not np.array_equal(a[name], b[name]))


@pytest.fixture(scope="module")
def runs(tiny_data, tiny_backbone, replay_data, tmp_path_factory):
  root = tmp_path_factory.mktemp("seed_runs")
  return {name: _train(root / name, tiny_data, tiny_backbone, replay_data, seed)
          for name, seed in (("first", 1), ("second", 1), ("other_seed", 2))}


def test_same_seed_gives_bit_identical_checkpoints(runs):
  for step in (0, STEPS):  # the initial values, and after training
    first, second = _tensors(runs["first"], step), _tensors(runs["second"], step)
    # The random backbone init (conv kernels), the head, BatchNorm and slots.
    assert {"conv1/kernel", "conv2/kernel", "head_logits/kernel",
            "bn1/moving_mean"} <= set(first)
    assert _differing(first, second) == [], f"step {step}"
  assert int(_tensors(runs["first"], STEPS)["global_step"]) == STEPS


def test_training_moved_the_weights(runs):
  # Otherwise "identical" could mean "nothing trained".
  start, end = _tensors(runs["first"], 0), _tensors(runs["first"], STEPS)
  assert {"conv1/kernel", "head_logits/kernel", "bn2/moving_variance"} <= set(
      _differing(start, end))


def test_another_seed_gives_another_model(runs):
  first, other = _tensors(runs["first"], 0), _tensors(runs["other_seed"], 0)
  # The random backbone and the head start elsewhere ...
  assert {"conv1/kernel", "conv2/kernel", "head_logits/kernel"} <= set(
      _differing(first, other))
  # ... and end elsewhere.
  assert "conv1/kernel" in _differing(_tensors(runs["first"], STEPS),
                                      _tensors(runs["other_seed"], STEPS))


def test_only_a_seeded_run_turns_on_op_determinism(tiny_data, tiny_backbone, tmp_path):
  # Fresh processes: op determinism is process-global state.
  code = (
      "import sys\n"
      "from tensorflow.python.framework import config\n"
      "from absl import flags\n"
      "from estimator_transfer.cli import flags as et_flags\n"
      "from estimator_transfer.training import experiment\n"
      "et_flags.define_flags()\n"
      "flags.FLAGS(['et-train'] + sys.argv[1:])\n"
      "before = config.is_op_determinism_enabled()\n"
      "experiment.Experiment(et_flags.flags_to_config(flags.FLAGS))\n"
      "print('determinism', before, config.is_op_determinism_enabled())\n")
  common = [f"--backbone={tiny_backbone['h5']}", f"--train_data={tiny_data['train']}",
            "--max_steps=1", f"--model_dir={tmp_path / 'model'}"]
  for extra, expected in ((["--seed=3"], "determinism False True"),
                          ([], "determinism False False")):
    result = run_cli(sys.executable, "-c", code, *common, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout, (extra, result.stdout[-2000:])
