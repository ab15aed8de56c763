"""EMA of the trained weights: training continues on the raw ones, eval and export use the averages."""
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer import config as config_lib
from estimator_transfer.training import experiment as runner

from conftest import checkpoint_values
from transfer_helpers import checkpoint_at

DECAY = 0.5
EMA = "/ExponentialMovingAverage"


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, tiny_data, tiny_backbone):
  """Fine-tunes everything for 6 SGD steps with EMA: lr 0.1, then 0 from step 3."""
  root = tmp_path_factory.mktemp("ema")
  cfg = config_lib.ExperimentConfig(
      backbone=config_lib.BackboneConfig(handle=tiny_backbone["h5"]),
      head=config_lib.HeadConfig(num_classes=3, class_names=("red", "green", "blue")),
      freeze=config_lib.FreezeConfig("none"),
      schedule=config_lib.ScheduleConfig(boundaries=(3,), values=(0.1, 0.0)),
      optimizer=config_lib.OptimizerConfig(name="sgd", ema_decay=DECAY),
      input=config_lib.InputConfig(train_data=tiny_data["train"], eval_data=tiny_data["eval"],
                                   batch_size=8, shuffle_buffer=64),
      run=config_lib.RunConfig(model_dir=str(root / "model"), max_steps=6,
                               save_checkpoints_steps=1, keep_checkpoint_max=10, seed=3),
      export=config_lib.ExportConfig(export_dir=str(root / "export")))
  experiment = runner.Experiment(cfg)
  experiment.train()
  return experiment


AVERAGED = ("head_logits/kernel", "head_logits/bias", "conv1/kernel", "bn2/gamma")


def test_averages_follow_the_raw_weights_with_the_decay(ema_run):
  model_dir = ema_run.config.run.model_dir
  at = {s: checkpoint_at(model_dir, s) for s in (1, 3, 6)}
  for name in AVERAGED:
    # Training runs on the raw weights: with lr 0 from step 3 they stop...
    np.testing.assert_array_equal(at[6][name], at[3][name])
    assert not np.array_equal(at[3][name + EMA], at[3][name])
    # ...while each step pulls the average towards them (3 steps, by hand):
    # ema6 = d^3 * ema3 + (1 - d^3) * raw3.
    expected = DECAY ** 3 * at[3][name + EMA] + (1 - DECAY ** 3) * at[3][name]
    np.testing.assert_allclose(at[6][name + EMA], expected, rtol=1e-5, atol=1e-7)
  # The average starts at the pretrained weights, not at a fresh init:
  # ema1 = d * pretrained + (1 - d) * raw1.
  pretrained = ema_run_pretrained(ema_run)
  np.testing.assert_allclose(at[1]["conv1/kernel" + EMA],
                             DECAY * pretrained + (1 - DECAY) * at[1]["conv1/kernel"],
                             rtol=1e-5, atol=1e-7)
  # Only trained variables are averaged; BatchNorm statistics are not.
  assert "bn1/moving_mean" + EMA not in at[6]


def ema_run_pretrained(experiment):
  return tf.keras.models.load_model(experiment.config.backbone.handle,
                                    compile=False).get_layer("conv1").kernel.numpy()


def _softmax(logits):
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def test_evaluation_and_predictions_use_the_averages(ema_run, tiny_data):
  values = checkpoint_values(ema_run.config.run.model_dir)
  predictions = list(ema_run.estimator.predict(
      ema_run.input_fn(tiny_data["eval"], training=False)))
  features = np.stack([p["features"] for p in predictions])
  probabilities = np.stack([p["probabilities"] for p in predictions])

  def head(suffix):
    return _softmax(features @ values["head_logits/kernel" + suffix] +
                    values["head_logits/bias" + suffix])

  np.testing.assert_allclose(probabilities, head(EMA), rtol=1e-4, atol=1e-6)
  assert not np.allclose(probabilities, head(""), rtol=1e-3)
  labels = np.arange(len(predictions)) % 3  # the eval split's labels, in order
  expected_loss = -np.mean(np.log(head(EMA)[np.arange(len(labels)), labels]))
  metrics = ema_run.evaluate()
  assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-4)


def test_export_holds_the_averages(ema_run):
  path = ema_run.export()
  reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
  stored = {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}
  values = checkpoint_values(ema_run.config.run.model_dir)
  for name in AVERAGED:
    exported = stored.get(name + EMA, stored.get(name))
    np.testing.assert_array_equal(exported, values[name + EMA], err_msg=name)
    assert not np.array_equal(exported, values[name]), name


def test_ema_on_a_trainable_hub_module(make_config, tiny_backbone):
  """Restored SavedModel variables have no usable initial_value: the averages
  must still be created, start at the pretrained weights and follow training."""
  cfg = make_config(backbone__handle=tiny_backbone["saved_model"], freeze__spec="none",
                    optimizer__ema_decay=0.5, run__max_steps=2,
                    run__save_checkpoints_steps=1, run__keep_checkpoint_max=5)
  experiment = runner.Experiment(cfg)
  experiment.train()
  step1 = checkpoint_at(cfg.run.model_dir, 1)
  pretrained = tiny_backbone["values"]["conv1/kernel"]
  raw1 = step1["conv1/kernel"]
  # After one step: avg = 0.5 * pretrained + 0.5 * raw1.
  np.testing.assert_allclose(step1["conv1/kernel" + EMA],
                             0.5 * pretrained + 0.5 * raw1, rtol=1e-5, atol=1e-7)
  assert not np.array_equal(raw1, pretrained)
