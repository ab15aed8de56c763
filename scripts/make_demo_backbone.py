"""Pretrains the small demo CNN on digits 0-4 and saves it three ways.

  <output_dir>/saved_model/   TF2 SavedModel: a TF-Hub handle (local path)
  <output_dir>/keras_model.h5 the Keras model (architecture + weights)
  <output_dir>/weights.h5     Keras weights only

The saved backbone maps float32 RGB images in [0, 1], 32x32, to 64 features.
Usage: python scripts/make_demo_backbone.py --data_dir=demo_data --output_dir=demo_backbone
"""
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("data_dir", "demo_data", "Output of make_demo_data.py.")
flags.DEFINE_string("output_dir", "demo_backbone", "Where to save the backbone.")
flags.DEFINE_integer("epochs", 12, "Pretraining epochs.")
flags.DEFINE_integer("seed", 0, "Random seed.")
FLAGS = flags.FLAGS


def build_demo_cnn(image_size=32, name="demo_cnn"):
  """conv-BN-ReLU x4 with two poolings, global average pool -> 64 features."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  inputs = tf.keras.Input((image_size, image_size, 3), name="images")
  x = inputs
  for i, (filters, pool) in enumerate([(16, False), (32, True), (64, False), (64, True)]):
    x = tf.keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                               name=f"conv{i + 1}")(x)
    x = tf.keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
    x = tf.keras.layers.ReLU(name=f"relu{i + 1}")(x)
    if pool:
      x = tf.keras.layers.MaxPool2D(name=f"pool{i + 1}")(x)
  x = tf.keras.layers.GlobalAveragePooling2D(name="features")(x)
  return tf.keras.Model(inputs, x, name=name)


def _dataset(path, image_size, training):
  from estimator_transfer.config import InputConfig  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import pipeline  # pylint: disable=g-import-not-at-top
  fn = pipeline.build_input_fn(InputConfig(batch_size=32), path, image_size,
                                training=training, seed=FLAGS.seed, num_epochs=1)
  return fn().map(lambda f, l: (f["image"], l))


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.keras.utils.set_random_seed(FLAGS.seed)
  backbone = build_demo_cnn()
  logits = tf.keras.layers.Dense(5, name="pretrain_logits")(backbone.output)
  classifier = tf.keras.Model(backbone.input, logits)
  classifier.compile(optimizer=tf.keras.optimizers.Adam(3e-3),
                     loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     metrics=["accuracy"])
  train = _dataset(os.path.join(FLAGS.data_dir, "pretrain", "train"), 32, True)
  evaluation = _dataset(os.path.join(FLAGS.data_dir, "pretrain", "eval"), 32, False)
  classifier.fit(train, epochs=FLAGS.epochs, verbose=0)
  _, accuracy = classifier.evaluate(evaluation, verbose=0)
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  tf.saved_model.save(backbone, os.path.join(FLAGS.output_dir, "saved_model"))
  backbone.save(os.path.join(FLAGS.output_dir, "keras_model.h5"))
  backbone.save_weights(os.path.join(FLAGS.output_dir, "weights.h5"))
  print(f"make_demo_backbone: pretrained on digits 0-4, held-out accuracy "
        f"{accuracy:.3f}; saved to {FLAGS.output_dir}/"
        "{saved_model,keras_model.h5,weights.h5}")


if __name__ == "__main__":
  app.run(main)
