"""Helpers and fixtures for the transfer-learning core tests.

Built locally, no network: a TF1 Hub-format module (conv/BatchNorm x2 with an
L2 regularizer, `train` and default graph variants), a TF2 SavedModel with a
regularized kernel, and a few direct-graph utilities.
"""
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.training import experiment as runner

from conftest import IMAGE_SIZE, checkpoint_values

TF1_REG_SCALE = 0.01
# Non-default BatchNorm statistics, so "unchanged" cannot pass by accident.
TF1_BN_STATS = {"bn1": (np.linspace(0.1, 0.4, 4), np.linspace(1.0, 2.0, 4)),
                "bn2": (np.linspace(-0.2, 0.2, 8), np.linspace(0.5, 1.5, 8))}


def _tf1_module_fn(is_training):
  import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
  images = tf.compat.v1.placeholder(tf.float32, [None, IMAGE_SIZE, IMAGE_SIZE, 3])
  reg = tf.keras.regularizers.l2(TF1_REG_SCALE)
  x = tf.compat.v1.layers.conv2d(images, 4, 3, padding="same", name="conv1",
                                 kernel_regularizer=reg)
  x = tf.compat.v1.layers.batch_normalization(x, training=is_training, momentum=0.5,
                                              name="bn1")
  x = tf.nn.relu(x)
  x = tf.compat.v1.layers.conv2d(x, 8, 3, padding="same", name="conv2")
  x = tf.compat.v1.layers.batch_normalization(x, training=is_training, momentum=0.5,
                                              name="bn2")
  # "images" is the input name of the image-module convention (it carries the
  # expected size, see hub.get_expected_image_size).
  hub.add_signature(inputs={"images": images},
                    outputs=tf.reduce_mean(tf.nn.relu(x), [1, 2]))


@pytest.fixture(scope="session")
def tf1_module(tmp_path_factory):
  """{'path': TF1 Hub module dir, 'values': name -> exported value}."""
  import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tf1_hub") / "module")
  spec = hub.create_module_spec(
      _tf1_module_fn, tags_and_args=[({"train"}, {"is_training": True}),
                                     (set(), {"is_training": False})])
  with tf.Graph().as_default():
    tf.compat.v1.set_random_seed(3)
    module = hub.Module(spec, trainable=True)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      for name, var in module.variable_map.items():
        layer, leaf = name.split("/", 1)
        if leaf in ("moving_mean", "moving_variance"):
          var.load(TF1_BN_STATS[layer][leaf == "moving_variance"], sess)
      module.export(path, sess)
      values = {name: sess.run(var) for name, var in module.variable_map.items()}
  return {"path": path, "values": values}


@pytest.fixture(scope="session")
def regularized_saved_model(tmp_path_factory):
  """A TF2 SavedModel whose conv kernel has an L2(0.5) regularizer."""
  root = tmp_path_factory.mktemp("reg_sm")
  tf.keras.utils.set_random_seed(5)
  inputs = tf.keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
  x = tf.keras.layers.Conv2D(4, 3, name="conv1",
                             kernel_regularizer=tf.keras.regularizers.l2(0.5))(inputs)
  x = tf.keras.layers.GlobalAveragePooling2D()(x)
  model = tf.keras.Model(inputs, x)
  path = str(root / "sm")
  tf.saved_model.save(model, path)
  return {"path": path, "kernel": model.get_layer("conv1").kernel.numpy()}


def train(cfg, input_fn=None):
  """Trains to cfg.run.max_steps; returns the latest checkpoint's values."""
  experiment = runner.Experiment(cfg)
  if input_fn is None:
    experiment.train()
  else:
    experiment.estimator.train(input_fn, max_steps=cfg.run.max_steps)
  return checkpoint_values(cfg.run.model_dir)


def checkpoint_at(model_dir: str, step: int) -> dict:
  reader = tf.train.load_checkpoint(os.path.join(model_dir, f"model.ckpt-{step}"))
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def hub_name(values: dict, leaf: str) -> str:
  """The checkpoint key of a TF1 module variable (module scope + leaf)."""
  matches = [n for n in values if n.endswith("/" + leaf) and "hub_module" in n]
  assert len(matches) == 1, (leaf, sorted(values))
  return matches[0]


def array_input_fn(images, labels, batch_size=8, repeat=True):
  """input_fn over in-memory arrays (labels of any shape or dtype)."""

  def input_fn():
    ds = tf.data.Dataset.from_tensor_slices(({"image": images}, labels))
    if repeat:
      ds = ds.repeat()
    return ds.batch(batch_size)

  return input_fn
