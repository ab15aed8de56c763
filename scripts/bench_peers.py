"""The benchmark's peers, one per child process: `python scripts/bench_peers.py --worker JSON`.

A separate entry point from scripts/bench_workers.py (ours), so a peer process
imports what a Keras script would: TensorFlow and our tf.data input pipeline
(both sides read the same TFRecords through the same pipeline), never the
Estimator code. Kinds:

  keras         a normal, well-written Keras `model.fit` script: the same
                tf.keras.applications backbone (or the same .h5 model), value
                range and Dense head as ours; SGD with momentum 0.9; sparse
                cross-entropy from logits; no metrics; verbose=0;
                steps_per_execution 1. Freezing: `all` (trainable=False,
                training=False), `none`, or `last:N` (only the last N layers
                that hold weights train: the split of our --freeze=last:N).
                Optional validation_data every epoch and a weights checkpoint
                every N steps (ModelCheckpoint(save_freq=N)).
  limit         the forward-pass limit of frozen training, measured without
                our graph: a plain TF2 `tf.function` of the same Keras
                backbone, `model(x, training=False)`, over the same tf.data
                pipeline (JPEG decode, resize, shuffle, batch, prefetch).
  export_keras  `tf.saved_model.save` of the same model with the same
                image-bytes preprocessing (the serving peer).

Prints `BENCH_RESULT {json}` with the fields of bench_workers.StepClock.
"""
import json
import os
import sys
import time

T_START = time.time()
# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from estimator_transfer.config import InputConfig
from estimator_transfer.data import pipeline
from estimator_transfer.data import preprocessing

from bench_run import RESULT_PREFIX
T_IMPORTED = time.time()
NUM_CLASSES = 5
# The backbones the rows use: Keras constructor and the pixel range ours maps
# [0, 1] images to (estimator_transfer/model/keras_backbone.py), written out
# here so a peer process does not import our model code.
APPLICATIONS = {"mobilenet_v2": ("MobileNetV2", "minus_one_one")}
VALUE_RANGES = {"zero_one": lambda x: x, "minus_one_one": lambda x: x * 2.0 - 1.0}


class BatchClock(tf.keras.callbacks.Callback):
  """End time of each training batch; the window after `warmup` steps."""

  def __init__(self, spec):
    super().__init__()
    self.spec = spec
    self.times = []
    self.marks = {}

  def on_train_batch_end(self, batch, logs=None):
    del batch, logs
    self.times.append(time.time())

  def result(self):
    spec, t_launch = self.spec, self.spec["t_launch"]
    warmup, batch = spec.get("warmup", 0), spec["batch"]
    out = {"steps": len(self.times), "import_s": T_IMPORTED - t_launch}
    out.update({k: v for k, v in self.marks.items()})
    if self.times:
      out["first_step_s"] = self.times[0] - t_launch
      out["step1_s"] = self.times[0] - self.marks["t_fit"]
    if len(self.times) > warmup + 1:
      steps = len(self.times) - 1 - warmup
      window = self.times[-1] - self.times[warmup]
      out.update(window_s=window, window_steps=steps, examples_per_s=steps * batch / window)
    out.pop("t_fit", None)
    return out


def _setup(spec):
  if spec.get("intra"):
    tf.config.threading.set_intra_op_parallelism_threads(spec["intra"])
  if spec.get("inter"):
    tf.config.threading.set_inter_op_parallelism_threads(spec["inter"])
  tf.keras.utils.set_random_seed(1)


def backbone(spec):
  """(Keras backbone model, value range) for spec['backbone']."""
  if spec["backbone"].endswith(".h5"):
    return tf.keras.models.load_model(spec["backbone"], compile=False), "zero_one"
  name, _, args = spec["backbone"].partition("(")
  ctor_name, value_range = APPLICATIONS[name]
  # "alpha=0.35" -> {"alpha": 0.35}
  kwargs = {k.strip(): float(v) for k, v in
            (part.split("=") for part in args.rstrip(")").split(",") if part)}
  size = spec["size"]
  base = getattr(tf.keras.applications, ctor_name)(
      include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg", **kwargs)
  return base, value_range


def _freeze(base, spec):
  """Applies spec['freeze'] (all, none, last:N); returns the `training` argument."""
  freeze = spec["freeze"]
  if freeze == "all":
    base.trainable = False
    return False
  if freeze.startswith("last:"):
    weighted = [layer for layer in base.layers if layer.weights]
    count = int(freeze.split(":")[1])
    for layer in weighted[:-count]:
      # A non-trainable BatchNormalization runs in inference mode (TF2
      # Keras), as our frozen part does.
      layer.trainable = False
  return None


def keras_model(spec):
  """The peer: backbone, value range and Dense head, frozen like ours."""
  base, value_range = backbone(spec)
  size = spec["size"]
  inputs = tf.keras.Input((size, size, 3), name="image")
  x = VALUE_RANGES[value_range](inputs)
  x = base(x, training=_freeze(base, spec))
  logits = tf.keras.layers.Dense(NUM_CLASSES, name="logits", dtype="float32")(x)
  return tf.keras.Model(inputs, logits)


def dataset(spec, data, training):
  config = InputConfig(batch_size=spec["batch"], shuffle_buffer=1024)
  return pipeline.build_input_fn(config, data, spec["size"], training=training,
                                  seed=1)().map(lambda f, l: (f["image"], l))


def _learning_rate(spec):
  if spec.get("lr_boundaries"):
    return tf.keras.optimizers.schedules.PiecewiseConstantDecay(
        list(spec["lr_boundaries"]), list(spec["lr_values"]))
  return spec.get("lr", 0.01)


def worker_keras(spec):
  """model.fit on the same data, batch and threads; validation and checkpoints optional."""
  _setup(spec)
  clock = BatchClock(spec)
  model = keras_model(spec)
  clock.marks["build_s"] = time.time() - T_IMPORTED
  t_compile = time.time()
  model.compile(optimizer=tf.keras.optimizers.SGD(_learning_rate(spec), momentum=0.9),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  callbacks = [clock]
  if spec.get("checkpoint_every"):
    callbacks.append(tf.keras.callbacks.ModelCheckpoint(
        os.path.join(spec["model_dir"], "ckpt"), save_weights_only=True,
        save_freq=spec["checkpoint_every"]))
  kwargs = {}
  if spec.get("eval_data"):
    kwargs["validation_data"] = dataset(spec, spec["eval_data"], training=False)
  train = dataset(spec, spec["data"], training=True)
  clock.marks["compile_s"] = time.time() - t_compile
  clock.marks["t_fit"] = time.time()
  model.fit(train, steps_per_epoch=spec["steps_per_epoch"], epochs=spec.get("epochs", 1),
            verbose=0, callbacks=callbacks, **kwargs)
  out = clock.result()
  out["total_s"] = time.time() - spec["t_launch"]
  return out


def worker_limit(spec):
  """Plain TF2: tf.function(model(x, training=False)) over the same pipeline."""
  _setup(spec)
  base, value_range = backbone(spec)

  @tf.function
  def forward(images):
    return base(VALUE_RANGES[value_range](images), training=False)

  clock = BatchClock(spec)
  clock.marks["t_fit"] = time.time()
  for step, (images, _) in enumerate(dataset(spec, spec["data"], training=True)):
    # .numpy() waits for the result, as a training step's loss fetch does.
    forward(images).numpy()
    clock.on_train_batch_end(step)
    if step + 1 >= spec["steps"]:
      break
  return clock.result()


def worker_export_keras(spec):
  """The same model as a Keras SavedModel with the same image-bytes preprocessing."""
  _setup(spec)
  model = keras_model(dict(spec, freeze="all"))
  size = spec["size"]

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  def serve(image_bytes):
    images = tf.map_fn(lambda b: preprocessing.decode_and_resize(b, size), image_bytes,
                       fn_output_signature=tf.float32)
    probabilities = tf.nn.softmax(model(images, training=False))
    return {"classes": tf.argmax(probabilities, axis=-1), "probabilities": probabilities}

  path = os.path.join(spec["export_dir"], "keras")
  tf.saved_model.save(model, path, signatures={"serving_default": serve})
  return {"path": path}


WORKERS = {"keras": worker_keras, "limit": worker_limit, "export_keras": worker_export_keras}


def main(spec):
  tf.get_logger().setLevel("ERROR")
  print(RESULT_PREFIX + json.dumps(WORKERS[spec["kind"]](spec)), flush=True)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    main(json.loads(sys.argv[2]))
  else:
    sys.exit("usage: bench_peers.py --worker JSON (scripts/benchmark.py runs it)")
