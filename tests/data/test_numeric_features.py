"""Numeric features (CSV): the head alone (--backbone=identity) or a Keras MLP backbone."""
import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer import config as config_lib
from estimator_transfer.training import experiment as runner
from estimator_transfer.errors import ConfigError


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory):
  """Two separable classes in 4 numeric columns plus a text label column."""
  root = tmp_path_factory.mktemp("csv")
  rng = np.random.RandomState(0)
  paths = {}
  for split, count in (("train", 64), ("eval", 32)):
    lines = ["a,b,c,d,label"]
    for i in range(count):
      label = i % 2
      values = rng.normal(0, 0.3, 4) + (1.5 if label else -1.5)
      lines.append(",".join(f"{v:.4f}" for v in values) + f",{'pos' if label else 'neg'}")
    path = root / f"{split}.csv"
    path.write_text("\n".join(lines) + "\n")
    paths[split] = str(path)
  inputs = tf.keras.Input((4,))
  hidden = tf.keras.layers.Dense(8, activation="relu", name="mlp_hidden")(inputs)
  tf.keras.Model(inputs, hidden).save(str(root / "mlp.h5"))
  paths["mlp"] = str(root / "mlp.h5")
  return paths


def _config(csv_data, tmp_path, handle, **overrides):
  cfg = config_lib.ExperimentConfig(
      backbone=config_lib.BackboneConfig(handle=handle),
      head=config_lib.HeadConfig(num_classes=2, class_names=("neg", "pos")),
      freeze=config_lib.FreezeConfig("none"),
      schedule=config_lib.ScheduleConfig(values=(0.1,)),
      input=config_lib.InputConfig(train_data=csv_data["train"], eval_data=csv_data["eval"],
                                   batch_size=8, csv_label_column="label"),
      run=config_lib.RunConfig(model_dir=str(tmp_path / "model"), max_steps=30,
                               save_checkpoints_steps=30, seed=1))
  return cfg.replace(**overrides) if overrides else cfg


@pytest.mark.parametrize("backbone", ["identity", "mlp"])
def test_trains_and_evaluates_on_csv(csv_data, tmp_path, backbone):
  handle = "identity" if backbone == "identity" else csv_data["mlp"]
  experiment = runner.Experiment(_config(csv_data, tmp_path, handle))
  assert experiment.train() == 30
  metrics = experiment.evaluate()
  assert metrics["accuracy"] > 0.9  # well separated; chance is 0.5
  names = tf.train.list_variables(tf.train.latest_checkpoint(str(tmp_path / "model")))
  assert any("head_logits/kernel" in n for n, _ in names)
  assert any("mlp_hidden/kernel" in n for n, _ in names) == (backbone == "mlp")


def test_export_of_identity_model_is_a_clear_error(csv_data, tmp_path):
  experiment = runner.Experiment(_config(csv_data, tmp_path, "identity",
                                         run__max_steps=2))
  experiment.train()
  with pytest.raises(ConfigError, match="numeric features"):
    experiment.export(str(tmp_path / "export"))
