"""model_fn: pretrained weights load, frozen parts stay bit-identical, BN updates run."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.model import model_fn as model_fn_lib
from estimator_transfer.training import experiment as runner
from estimator_transfer.errors import ConfigError

from conftest import assert_moved, checkpoint_values, initial_checkpoint_values

BACKBONE_LAYERS = ("conv1", "bn1", "conv2", "bn2")
BN_STATS = ("bn1/moving_mean", "bn1/moving_variance", "bn2/moving_mean",
            "bn2/moving_variance")


def _train(cfg):
  experiment = runner.Experiment(cfg)
  experiment.train()
  return checkpoint_values(cfg.run.model_dir)


def _backbone_vars(values, pretrained):
  """Checkpoint values of the backbone variables, keyed like `pretrained`."""
  return {name: values[name] for name in pretrained}


@pytest.mark.parametrize("source", ["h5", "saved_model"])
def test_freeze_all_keeps_every_backbone_value_and_trains_head(make_config, tiny_backbone,
                                                                source):
  cfg = make_config(backbone__handle=tiny_backbone[source], freeze__spec="all")
  values = _train(cfg)
  initial = initial_checkpoint_values(cfg.run.model_dir)
  for name, expected in tiny_backbone["values"].items():
    # Pretrained weights were loaded (not random) and never moved, BatchNorm
    # moving statistics included.
    np.testing.assert_array_equal(initial[name], expected, err_msg=name)
    np.testing.assert_array_equal(values[name], expected, err_msg=name)
  assert values["global_step"] == 6
  # The head trained: it moved away from its step-0 (Glorot) values.
  assert_moved(values, initial, "head_logits/kernel")


@pytest.mark.parametrize("source", ["h5", "saved_model"])
def test_freeze_none_trains_kernels_and_updates_batchnorm(make_config, tiny_backbone,
                                                          source):
  cfg = make_config(backbone__handle=tiny_backbone[source], freeze__spec="none")
  values = _train(cfg)
  pretrained = tiny_backbone["values"]
  for name in ("conv1/kernel", "conv2/kernel", "bn1/gamma") + BN_STATS:
    # hub.KerasLayer kernels are not in TRAINABLE_VARIABLES: this proves the
    # explicit var_list; BN stats prove the update ops run.
    assert not np.array_equal(values[name], pretrained[name]), name


def test_freeze_first_n_freezes_exactly_those_layers(make_config, tiny_backbone):
  cfg = make_config(freeze__spec="first:2")
  values = _train(cfg)
  pretrained = tiny_backbone["values"]
  for name in ("conv1/kernel", "conv1/bias", "bn1/gamma", "bn1/beta",
               "bn1/moving_mean", "bn1/moving_variance"):
    np.testing.assert_array_equal(values[name], pretrained[name], err_msg=name)
  for name in ("conv2/kernel", "bn2/gamma", "bn2/moving_mean", "bn2/moving_variance"):
    assert not np.array_equal(values[name], pretrained[name]), name


def test_backbone_weights_none_starts_from_random_init(make_config, tiny_backbone):
  cfg = make_config(backbone__weights="none", freeze__spec="all")
  values = _train(cfg)
  assert not np.array_equal(values["conv1/kernel"], tiny_backbone["values"]["conv1/kernel"])
  # Frozen: still the (random) initial BN statistics of a fresh layer.
  np.testing.assert_array_equal(values["bn1/moving_mean"], np.zeros(4, np.float32))


def test_separate_weights_file_is_loaded(make_config, tiny_backbone):
  cfg = make_config(backbone__weights=tiny_backbone["weights"], freeze__spec="all")
  values = _train(cfg)
  np.testing.assert_array_equal(values["conv2/kernel"],
                                tiny_backbone["values"]["conv2/kernel"])


def test_resume_does_not_reload_pretrained_weights(make_config, tiny_backbone):
  cfg = make_config(freeze__spec="none")
  trained = _train(cfg)
  resumed = _train(cfg.replace(run__max_steps=9))
  assert resumed["global_step"] == 9
  # Resumed from the checkpoint, not from the pretrained file: the change made
  # in the first 6 steps is still there after 3 more.
  pretrained = tiny_backbone["values"]["conv1/kernel"]
  assert not np.array_equal(resumed["conv1/kernel"], pretrained)
  assert np.abs(resumed["conv1/kernel"] - trained["conv1/kernel"]).max() < \
      np.abs(resumed["conv1/kernel"] - pretrained).max() + 1e-6


def test_learning_rate_follows_piecewise_schedule(make_config):
  # lr 0 after step 3 freezes everything: the head must equal the step-3
  # checkpoint at step 6.
  cfg = make_config(schedule__boundaries=(3,), schedule__values=(0.1, 0.0),
                    optimizer__name="sgd", freeze__spec="all")
  experiment = runner.Experiment(cfg)
  experiment.train()
  step3 = tf.train.load_checkpoint(f"{cfg.run.model_dir}/model.ckpt-3")
  final = checkpoint_values(cfg.run.model_dir)
  np.testing.assert_array_equal(final["head_logits/kernel"],
                                step3.get_tensor("head_logits/kernel"))
  # ...and lr 0.1 before step 3 did train it (the step-0 checkpoint must exist).
  first = initial_checkpoint_values(cfg.run.model_dir)
  assert_moved({"head_logits/kernel": step3.get_tensor("head_logits/kernel")}, first,
               "head_logits/kernel")


def test_eval_and_predict_specs(make_config, tiny_data):
  cfg = make_config(freeze__spec="none", run__max_steps=20,
                    schedule__values=(0.05,))
  experiment = runner.Experiment(cfg)
  experiment.train()
  metrics = experiment.evaluate()
  assert set(metrics) >= {"accuracy", "loss", "global_step"}
  assert metrics["accuracy"] > 0.6  # colour classes are easy; chance is 1/3
  predictions = list(experiment.estimator.predict(
      experiment.input_fn(tiny_data["eval"], training=False)))
  assert len(predictions) == 24
  first = predictions[0]
  assert first["probabilities"].shape == (3,)
  np.testing.assert_allclose(first["probabilities"].sum(), 1.0, rtol=1e-5)
  assert first["class_names"].decode() in ("red", "green", "blue")
  assert first["classes"] == np.argmax(first["probabilities"])


def test_trainable_variables_are_recorded(make_config):
  cfg = make_config(freeze__spec="first:2")
  _train(cfg)
  with open(os.path.join(cfg.run.model_dir, model_fn_lib.VARIABLES_FILENAME)) as f:
    record = json.load(f)
  assert record["frozen_layers"] == ["conv1", "bn1"]
  assert record["trainable_layers"] == ["conv2", "bn2"]
  assert any("conv1/kernel" in n for n in record["frozen"])
  assert any("head_logits/kernel" in n for n in record["trainable"])


def test_needs_class_count(make_config):
  with pytest.raises(ConfigError, match="classes"):
    model_fn_lib.build_model_fn(make_config(head__num_classes=0, head__class_names=()))


def test_first_n_beyond_layer_count_is_clear_error(make_config):
  cfg = make_config(freeze__spec="first:9")
  with pytest.raises(ConfigError, match="has 4 layers"):
    _train(cfg)
