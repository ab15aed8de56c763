"""Run by the newest TensorFlow/Keras 3 (the second virtual environment), not by pytest.

    python keras3_check.py CASES.json RESULT.json

For each case (an et-export --format=keras version directory, encoded image
files, their labels): load the model as a downstream Keras 3 user would
(`keras.models.load_model`; for a TF2 Hub backbone the README's TFSMLayer
composition), decode the images here with TensorFlow's own ops as
keras_export.json describes, predict, then fit one step and record, per
weight, whether it is trainable and whether it changed. Imports nothing from
estimator_transfer (that package needs TensorFlow 2.15).
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def decode(path: str, size: int) -> np.ndarray:
  """The preprocessing keras_export.json names (before_the_model)."""
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  image = tf.image.convert_image_dtype(image, tf.float32)
  image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
  return tf.clip_by_value(image, 0.0, 1.0).numpy()


def load(directory: str, meta: dict):
  """The exported model, as the README's "Leaving Estimator" section loads it."""
  model = keras.models.load_model(os.path.join(directory, meta["model"]))
  if not meta.get("backbone_savedmodel"):
    return model
  size = meta["image_size"]
  backbone = keras.layers.TFSMLayer(os.path.join(directory, meta["backbone_savedmodel"]),
                                    call_endpoint="serve", call_training_endpoint="train",
                                    trainable=True, name="backbone")
  inputs = keras.Input((size, size, 3), name="image")
  return keras.Model(inputs, model(backbone(inputs)))


def weight_states(model) -> list:
  """(layer, weight name, trainable, value) for every weight, in order."""
  trainable = {id(w) for w in model.trainable_weights}
  out = []
  for layer in _layers(model):
    for w in layer.weights:
      out.append((layer.name, w.path if hasattr(w, "path") else w.name,
                  id(w) in trainable, np.array(w.numpy())))
  return out


def _layers(model):
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      yield from _layers(layer)
    else:
      yield layer


def check(case: dict) -> dict:
  meta = json.load(open(os.path.join(case["dir"], "keras_export.json")))
  model = load(case["dir"], meta)
  images = np.stack([decode(p, meta["image_size"]) for p in case["images"]])
  predictions = model.predict(images, verbose=0)
  model.compile(optimizer=keras.optimizers.SGD(0.5),
                loss=keras.losses.SparseCategoricalCrossentropy())
  before = weight_states(model)
  model.fit(images, np.array(case["labels"]), batch_size=len(images), epochs=1, verbose=0)
  after = weight_states(model)
  weights = [{"layer": b[0], "name": b[1], "trainable": b[2],
              "changed": bool(np.abs(a[3] - b[3]).max() > 0)} for b, a in zip(before, after)]
  return {"keras": keras.__version__, "tensorflow": tf.__version__,
          "predictions": np.asarray(predictions).tolist(), "weights": weights,
          "trainable_layers": [l.name for l in _layers(model) if l.trainable and l.weights]}


def main(argv):
  cases = json.load(open(argv[1]))
  results = {name: check(case) for name, case in cases.items()}
  with open(argv[2], "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(sys.argv)
