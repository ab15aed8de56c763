"""Pretrains the small demo CNN on digits 0-4 and saves it three ways.

The pretraining task is richer than "which digit": each image of digits 0-4
is shown at four rotations (0, 90, 180, 270 degrees) and the CNN learns the
digit and the rotation (20 classes), so that its features describe strokes
and their directions rather than only what separates 0-4; the features then
serve digits it has never seen (5-9, `make demo`).

  <output_dir>/saved_model/   TF2 SavedModel: a TF-Hub handle (local path)
  <output_dir>/keras_model.h5 the Keras model (architecture + weights)
  <output_dir>/weights.h5     Keras weights only

The saved backbone maps float32 RGB images in [0, 1] of --image_size pixels
(default: the size of the images in --data_dir) to 64 features.
Usage: python scripts/make_demo_backbone.py --data_dir=demo_data --output_dir=demo_backbone
"""
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("data_dir", "demo_data", "Output of make_demo_data.py.")
flags.DEFINE_string("output_dir", "demo_backbone", "Where to save the backbone.")
flags.DEFINE_integer("epochs", 4, "Pretraining epochs (each image at 4 rotations).")
flags.DEFINE_integer("image_size", 0, "Input size in pixels; 0: that of --data_dir's images.")
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
  """Batches of (image, digit + 5 * rotation): each image at its four rotations."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_transfer.config import InputConfig  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import pipeline  # pylint: disable=g-import-not-at-top
  fn = pipeline.build_input_fn(InputConfig(batch_size=16), path, image_size,
                                training=training, seed=FLAGS.seed, num_epochs=1)

  def rotations(features, labels):
    images = features["image"]
    return (tf.concat([tf.image.rot90(images, k) for k in range(4)], 0),
            tf.concat([labels + 5 * k for k in range(4)], 0))

  return fn().map(rotations)


def _image_size(data_dir):
  """The side of the demo images (the first fine-tune PNG)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = os.path.join(data_dir, "images", "train")
  folder = os.path.join(folder, sorted(os.listdir(folder))[0])
  with Image.open(os.path.join(folder, sorted(os.listdir(folder))[0])) as image:
    return image.size[0]


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.keras.utils.set_random_seed(FLAGS.seed)
  size = FLAGS.image_size or _image_size(FLAGS.data_dir)
  backbone = build_demo_cnn(size)
  logits = tf.keras.layers.Dense(20, name="pretrain_logits")(backbone.output)
  classifier = tf.keras.Model(backbone.input, logits)
  classifier.compile(optimizer=tf.keras.optimizers.Adam(3e-3),
                     loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     metrics=["accuracy"])
  train = _dataset(os.path.join(FLAGS.data_dir, "pretrain", "train"), size, True)
  evaluation = _dataset(os.path.join(FLAGS.data_dir, "pretrain", "eval"), size, False)
  classifier.fit(train, epochs=FLAGS.epochs, verbose=0)
  _, accuracy = classifier.evaluate(evaluation, verbose=0)
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  tf.saved_model.save(backbone, os.path.join(FLAGS.output_dir, "saved_model"))
  backbone.save(os.path.join(FLAGS.output_dir, "keras_model.h5"))
  backbone.save_weights(os.path.join(FLAGS.output_dir, "weights.h5"))
  print(f"make_demo_backbone: pretrained on digits 0-4 at 4 rotations ({size} px), "
        f"held-out accuracy "
        f"{accuracy:.3f}; saved to {FLAGS.output_dir}/"
        "{saved_model,keras_model.h5,weights.h5}")


if __name__ == "__main__":
  app.run(main)
