"""Freeze specs: parsing, resolution, frozen parts bit-identical and in inference mode."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.model import backbones
from estimator_transfer import config as config_lib
from estimator_transfer.model import freezing
from estimator_transfer.model import model_fn as model_fn_lib
from estimator_transfer.errors import ConfigError
from estimator_transfer import specs

from conftest import IMAGE_SIZE
from transfer_helpers import train

LAYERS = [("conv1", ["conv1/kernel", "conv1/bias"]), ("bn1", ["bn1/gamma", "bn1/beta"]),
          ("conv2", ["conv2/kernel", "conv2/bias"]), ("bn2", ["bn2/gamma", "bn2/beta"])]
BN_STATS = ("moving_mean", "moving_variance")


@pytest.mark.parametrize("spec, frozen", [
    ("all", [True, True, True, True]),
    ("none", [False, False, False, False]),
    ("first:1", [True, False, False, False]),
    ("last:1", [True, True, True, False]),
    ("until:bn1", [True, True, False, False]),
    ("until:bn2", [True, True, True, True]),
    ("regex:^conv", [True, False, True, False]),
    ("regex:2$", [False, False, True, True]),
])
def test_spec_resolves_to_frozen_layers(spec, frozen):
  resolution = freezing.resolve(specs.parse_spec(spec), LAYERS)
  assert resolution.frozen_layers == frozen
  assert resolution.frozen_variables == [[f, f] for f in frozen]


def test_regex_on_variable_names_freezes_single_variables():
  resolution = freezing.resolve(specs.parse_spec("regex:/gamma$"), LAYERS)
  # Only the gammas freeze; no layer is wholly frozen, so BN keeps training
  # mode (its beta and statistics still move).
  assert resolution.frozen_layers == [False] * 4
  assert resolution.frozen_variables == [[False, False], [True, False], [False, False],
                                         [True, False]]


@pytest.mark.parametrize("spec, message", [
    ("some", "is not a freeze spec"),
    ("regex:(", "not a valid regular expression"),
    ("first:x", "is not a freeze spec"),
])
def test_bad_spec_is_clear_error(spec, message):
  with pytest.raises(ConfigError, match=message):
    specs.parse_spec(spec)


@pytest.mark.parametrize("spec, message", [
    ("regex:^block_", "matches no layer or variable"),
    ("until:bn3", "names no layer with weights .*similar names: bn2, bn1"),
    ("last:0", "leaves nothing of the backbone trainable"),
    ("first:5", "has 4 layers with weights"),
])
def test_spec_that_does_not_fit_is_clear_error(spec, message):
  with pytest.raises(ConfigError, match=message):
    freezing.resolve(specs.parse_spec(spec), LAYERS)


def test_schedule_parses_steps_epochs_and_specs_with_commas():
  stages = specs.parse_schedule("0:all,500:last:20,1500:regex:a{1,3},2e:none", "none")
  assert [(s.start, str(s.spec)) for s in stages] == [
      (0, "all"), (500, "last:20"), (1500, "regex:a{1,3}"), ("2e", "none")]
  assert [(s.start, str(s.spec)) for s in specs.parse_schedule("", "first:2")] == [
      (0, "first:2")]
  # --freeze applies before the first scheduled step.
  assert str(specs.parse_schedule("10:none", "all")[0].spec) == "all"
  # 1000 steps per epoch (hand): 2e -> step 2000.
  resolved = specs.resolve_plan_steps(stages, 1000.0)
  assert [s.start for s in resolved] == [0, 500, 1500, 2000]


@pytest.mark.parametrize("text, message", [
    ("0:all,500", "must look like STEP:SPEC"),
    ("0:all,500:none,400:all", "strictly increasing"),
    ("0:all,5:bogus", "entry .5:bogus. must look like STEP:SPEC"),
])
def test_bad_schedule_is_clear_error(text, message):
  with pytest.raises(ConfigError, match=message):
    specs.parse_schedule(text)


def test_frozen_batchnorm_runs_in_inference_mode_next_to_training_one(tiny_backbone):
  """first:2: bn1 (frozen) normalizes with its moving statistics, bn2 with the batch's."""
  resolved = backbones.resolve(config_lib.BackboneConfig(handle=tiny_backbone["h5"]))
  images = np.random.RandomState(0).uniform(0, 1, (4, IMAGE_SIZE, IMAGE_SIZE, 3)
                                            ).astype(np.float32)
  with tf.Graph().as_default():
    out = resolved.instantiate(tf.constant(images), "first:2", training=True)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      out.init_fn(None, sess)
      features = sess.run(out.features)
  model = tf.keras.models.load_model(tiny_backbone["h5"], compile=False)
  x = model.get_layer("conv1")(images)
  x = model.get_layer("bn1")(x, training=False)
  x = model.get_layer("conv2")(tf.nn.relu(x))
  x = model.get_layer("bn2")(x, training=True)
  expected = tf.reduce_mean(tf.nn.relu(x), axis=[1, 2]).numpy()
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
  # And only bn2 has update ops (bn1's statistics can never move).
  assert len(out.update_ops) == 2


@pytest.mark.parametrize("spec, frozen, trained", [
    ("until:bn1", ("conv1/kernel", "conv1/bias", "bn1/gamma", "bn1/beta",
                   "bn1/moving_mean", "bn1/moving_variance"),
     ("conv2/kernel", "bn2/gamma", "bn2/moving_mean", "bn2/moving_variance")),
    ("regex:^bn", ("bn1/gamma", "bn2/beta", "bn1/moving_mean", "bn2/moving_variance"),
     ("conv1/kernel", "conv2/bias")),
    # Variable-level: the gammas freeze, the layers still train (statistics move).
    ("regex:/gamma$", ("bn1/gamma", "bn2/gamma"),
     ("bn1/beta", "bn2/beta", "bn1/moving_mean", "bn2/moving_variance", "conv1/kernel")),
])
def test_keras_backbone_freeze_specs_after_training(make_config, tiny_backbone, spec,
                                                    frozen, trained):
  values = train(make_config(freeze__spec=spec, run__max_steps=3))
  pretrained = tiny_backbone["values"]
  for name in frozen:
    np.testing.assert_array_equal(values[name], pretrained[name], err_msg=name)
  for name in trained:
    assert not np.array_equal(values[name], pretrained[name]), name


def test_hub_tf2_partial_freeze_keeps_frozen_parts_and_all_statistics(make_config,
                                                                     tiny_backbone):
  # A TF2 module has one BatchNorm mode: partly frozen, it runs in inference
  # mode, so no moving statistic changes, while unfrozen kernels train.
  cfg = make_config(backbone__handle=tiny_backbone["saved_model"], freeze__spec="first:2",
                    run__max_steps=3)
  values = train(cfg)
  pretrained = tiny_backbone["values"]
  for name in ("conv1/kernel", "conv1/bias", "bn1/gamma") + tuple(
      f"bn{i}/{s}" for i in (1, 2) for s in BN_STATS):
    np.testing.assert_array_equal(values[name], pretrained[name], err_msg=name)
  for name in ("conv2/kernel", "bn2/gamma"):
    assert not np.array_equal(values[name], pretrained[name]), name


def test_resolved_sets_are_saved_in_model_dir(make_config):
  cfg = make_config(freeze__spec="regex:^conv2|bn2", run__max_steps=1)
  train(cfg)
  with open(os.path.join(cfg.run.model_dir, model_fn_lib.VARIABLES_FILENAME)) as f:
    record = json.load(f)
  assert record["frozen_layers"] == ["conv2", "bn2"]
  assert record["trainable_layers"] == ["conv1", "bn1"]
  assert "bn2/moving_mean:0" in record["frozen"]
  assert record["trainable"] == ["conv1/kernel:0", "conv1/bias:0", "bn1/gamma:0",
                                 "bn1/beta:0", "head_logits/kernel:0", "head_logits/bias:0"]
  assert len(record["stages"]) == 1 and record["stages"][0]["spec"] == "regex:^conv2|bn2"


def test_regex_matching_nothing_fails_before_training(make_config):
  cfg = make_config(freeze__spec="regex:^block_", run__max_steps=1)
  with pytest.raises(ConfigError, match="matches no layer or variable"):
    train(cfg)
  assert not tf.train.latest_checkpoint(cfg.run.model_dir)
