"""Performance knobs are correct: --xla, --mixed_precision, --prefetch, --cache.

Speed is measured by scripts/benchmark.py, never asserted here. These tests
prove that each knob trains to a finite loss and predicts what the float32
model predicts (within the precision of its dtype), that it really changes
the graph it claims to change (XLA clusters, float16/bfloat16 convolutions,
the prefetch op), that checkpoints keep their float32 layout, and that the
flags reach the config.
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer import config as config_lib
from estimator_transfer.model import backbones
from estimator_transfer.model import model_fn as model_fn_lib
from estimator_transfer.model import optimizers
from estimator_transfer.training import experiment as runner
from estimator_transfer.errors import ConfigError
from estimator_transfer.config import InputConfig, OptimizerConfig
from estimator_transfer.data import pipeline as pipeline_lib
from conftest import (CLASS_NAMES, assert_moved, checkpoint_values, initial_checkpoint_values,
                      run_cli)

# knob name -> (config overrides, max |probability difference| vs float32;
# None: not comparable, the cached pipeline shuffles after the cache, so the
# batches differ)
KNOBS = {
    "xla": (dict(run__xla=True), 1e-4),
    "mixed_bfloat16": (dict(run__mixed_precision="mixed_bfloat16"), 0.05),
    "mixed_float16": (dict(run__mixed_precision="mixed_float16"), 0.01),
    "prefetch_0": (dict(input__prefetch=0), 1e-6),
    "cache_dataset": (dict(input__cache="memory"), None),
}


def _train_and_predict(cfg, eval_data):
  experiment = runner.Experiment(cfg)
  experiment.train()
  predictions = experiment.estimator.predict(experiment.input_fn(eval_data, training=False))
  probabilities = np.stack([p["probabilities"] for p in predictions])
  return experiment, probabilities


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory, tiny_data, tiny_backbone):
  """The reference: the same fine-tuning run in float32, without any knob."""
  root = tmp_path_factory.mktemp("float32_run")
  cfg = config_lib.ExperimentConfig(
      backbone=config_lib.BackboneConfig(handle=tiny_backbone["h5"]),
      head=config_lib.HeadConfig(num_classes=3, class_names=CLASS_NAMES),
      freeze=config_lib.FreezeConfig("none"),
      schedule=config_lib.ScheduleConfig(values=(0.05,)),
      input=config_lib.InputConfig(train_data=tiny_data["train"], batch_size=8,
                                   shuffle_buffer=64),
      run=config_lib.RunConfig(model_dir=str(root / "model"), max_steps=6,
                               save_checkpoints_steps=6, log_every_steps=3, seed=7))
  _, probabilities = _train_and_predict(cfg, tiny_data["eval"])
  return cfg, probabilities, checkpoint_values(cfg.run.model_dir)


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_knob_trains_finite_and_predicts_like_float32(knob, float32_run, tiny_data, tmp_path):
  base, expected, expected_values = float32_run
  overrides, tolerance = KNOBS[knob]
  cfg = base.replace(run__model_dir=str(tmp_path / "model"), **overrides)
  experiment, probabilities = _train_and_predict(cfg, tiny_data["eval"])
  values = checkpoint_values(cfg.run.model_dir)
  assert values["global_step"] == 6
  # The same variables, all float32: a run can switch knobs and resume.
  assert sorted(values) == sorted(expected_values)
  for name, value in values.items():
    assert value.dtype in (np.float32, np.int64), name
    assert np.all(np.isfinite(value)), name
  # It trained (the head moved from its step-0 values) and predicts what the
  # float32 run predicts.
  assert_moved(values, initial_checkpoint_values(cfg.run.model_dir), "head_logits/kernel")
  assert probabilities.shape == expected.shape
  if tolerance is not None:
    np.testing.assert_allclose(probabilities, expected, atol=tolerance)
  else:  # other batches, so other weights: still one distribution per image
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
  # Nothing was silently turned off.
  assert (experiment.config.run, experiment.config.input) == (cfg.run, cfg.input)


def test_loss_scaling_composes_with_gradual_unfreezing(make_config, tiny_backbone):
  # The loss-scaled step wraps the per-stage switch in a tf.cond.
  cfg = make_config(run__mixed_precision="mixed_float16", freeze__spec="all",
                    freeze__unfreeze_schedule="3:none")
  runner.Experiment(cfg).train()
  values = checkpoint_values(cfg.run.model_dir)
  assert values["global_step"] == 6
  assert not np.array_equal(values["conv1/kernel"], tiny_backbone["values"]["conv1/kernel"])
  assert all(np.all(np.isfinite(v)) for v in values.values())


def _train_graph(cfg, mode=tf.estimator.ModeKeys.TRAIN):
  """The model_fn's graph (and nothing else) for `mode` on a batch of images."""
  resolved = backbones.resolve(cfg.backbone)  # outside: loading builds a model too
  size = resolved.image_size
  graph = tf.Graph()
  with graph.as_default():
    images = tf.compat.v1.placeholder(tf.float32, [8, size, size, 3])
    labels = tf.compat.v1.placeholder(tf.int32, [8])
    model_fn_lib.build_model_fn(cfg, resolved)({"image": images}, labels, mode)
  return graph


def _compiled(graph):
  return [op.name for op in graph.get_operations()
          if op.node_def.attr["_XlaCompile"].b]


def test_xla_marks_the_training_step_only(make_config):
  cfg = make_config(run__xla=True)
  compiled = _compiled(_train_graph(cfg))
  # Forward, gradients and the optimizer's updates are compiled...
  assert any("conv1/Conv2D" in n for n in compiled)
  assert any("gradients" in n for n in compiled)
  assert any("Momentum" in n for n in compiled)
  # ...but not the pretrained-weight assignment, nor exported graphs.
  assert not any("pretrained_init" in n for n in compiled)
  assert not _compiled(_train_graph(cfg, tf.estimator.ModeKeys.PREDICT))
  assert not _compiled(_train_graph(make_config()))


@pytest.mark.parametrize("policy,dtype", [("mixed_float16", tf.float16),
                                          ("mixed_bfloat16", tf.bfloat16)])
@pytest.mark.parametrize("source", ["h5", "application"])
def test_mixed_precision_computes_backbone_in_low_precision(make_config, policy, dtype,
                                                             source):
  overrides = dict(run__mixed_precision=policy)
  if source == "application":  # built by its constructor, not from a saved config
    overrides.update(backbone__handle="mobilenet_v2(alpha=0.35)",
                     backbone__weights="none", backbone__image_size=32)
  graph = _train_graph(make_config(**overrides))
  convs = [op for op in graph.get_operations() if op.type == "Conv2D"]
  assert convs and {op.get_attr("T") for op in convs} == {dtype}
  variables = graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
  assert {v.dtype.base_dtype for v in variables} <= {tf.float32, tf.int64}
  # Only float16 needs (and gets) loss scaling, in local variables.
  local = [v.op.name for v in graph.get_collection(tf.compat.v1.GraphKeys.LOCAL_VARIABLES)]
  assert ("loss_scale" in local) == (policy == "mixed_float16")
  # The global policy is back to float32 for everything built later.
  assert tf.keras.mixed_precision.global_policy().name == "float32"


def test_mixed_precision_refuses_hub_modules(make_config, tiny_backbone):
  cfg = make_config(backbone__handle=tiny_backbone["saved_model"],
                    run__mixed_precision="mixed_bfloat16")
  with pytest.raises(ConfigError, match="--mixed_precision=mixed_bfloat16 applies to "
                     "Keras backbones"):
    _train_graph(cfg)


def _loss_scale_step(gradient_value):
  """One loss-scaled SGD step on w (init 1) with d loss/dw = gradient_value."""
  with tf.Graph().as_default():
    w = tf.compat.v1.Variable(1.0)
    step = tf.compat.v1.train.get_or_create_global_step()
    loss = w * gradient_value
    train_op = optimizers.build_train_op(OptimizerConfig(name="sgd"), loss, 0.5, step,
                                         [[w]], loss_scale=True)
    scale = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.LOCAL_VARIABLES)[0]
    with tf.compat.v1.Session() as sess:
      sess.run([tf.compat.v1.global_variables_initializer(),
                tf.compat.v1.local_variables_initializer()])
      sess.run(train_op)
      return sess.run([w, scale, step])


def test_dynamic_loss_scale_applies_finite_and_skips_overflowing_steps():
  # Finite: the unscaled gradient 2 is applied, w = 1 - 0.5 * 2 = 0.
  w, scale, step = _loss_scale_step(2.0)
  assert (w, scale, step) == (0.0, 2.0 ** 15, 1)
  # 1e35 * 2^15 overflows float32: the step is skipped and the scale halved.
  w, scale, step = _loss_scale_step(1e35)
  assert (w, scale, step) == (1.0, 2.0 ** 14, 1)


@pytest.mark.parametrize("prefetch,last_op", [(-1, "PrefetchDataset"),
                                               (3, "PrefetchDataset"), (0, None)])
def test_prefetch_sets_the_pipelines_last_stage(tiny_data, prefetch, last_op):
  config = InputConfig(batch_size=4, prefetch=prefetch)
  with tf.Graph().as_default():
    ds = pipeline_lib.build_input_fn(config, tiny_data["train"], 16, training=True, seed=1)()
    op = ds._variant_tensor.op  # pylint: disable=protected-access
    if last_op:
      assert op.type == last_op
      size = tf.get_static_value(op.inputs[1])
      assert size == (prefetch if prefetch > 0 else tf.data.AUTOTUNE)
    else:
      assert op.type != "PrefetchDataset"


@pytest.mark.parametrize("overrides,message", [
    (dict(run__mixed_precision="float16"), "--mixed_precision=float16 is not supported"),
    (dict(input__prefetch=-2), "--prefetch=-2 is invalid"),
])
def test_bad_knob_values_are_config_errors(make_config, overrides, message):
  with pytest.raises(ConfigError, match=message):
    make_config(**overrides).validate()


def test_cli_flags_reach_the_config(tiny_data, tiny_backbone, tmp_path):
  model_dir = tmp_path / "model"
  result = run_cli("et-train", f"--backbone={tiny_backbone['h5']}", "--freeze=all",
                   f"--train_data={tiny_data['train']}", f"--model_dir={model_dir}",
                   "--batch_size=8", "--max_steps=2", "--xla",
                   "--mixed_precision=mixed_bfloat16", "--prefetch=2",
                   "--cache_dataset=memory", "--intra_op_threads=1",
                   "--inter_op_threads=1")
  assert result.returncode == 0, result.stderr
  with open(os.path.join(model_dir, "config.json")) as f:
    saved = json.load(f)
  assert saved["run"]["xla"] is True
  assert saved["run"]["mixed_precision"] == "mixed_bfloat16"
  assert saved["run"]["intra_op_threads"] == saved["run"]["inter_op_threads"] == 1
  assert saved["input"]["prefetch"] == 2
  assert saved["input"]["cache"] == "memory"  # --cache_dataset is --cache
  assert "--cache_dataset is deprecated; use --cache" in result.stderr
  bad = run_cli("et-train", "--mixed_precision=fp8", f"--model_dir={model_dir}")
  assert bad.returncode == 1
  assert bad.stderr.startswith("et-train: error:") and "mixed_precision" in bad.stderr
  assert "Traceback" not in bad.stderr
