"""et-export --format=keras: the trained model as a `.keras` file Keras 3 can keep training.

One version directory `<export_dir>/<version>/` (published atomically, like
the SavedModel versions) holds:

  model.keras        the whole model (keras_model.py): the input takes
                     float32 RGB [n, size, size, 3] in [0, 1]; the value-range
                     mapping of the backbone is inside; the output is
                     `probabilities` (regression: `outputs`). Frozen layers
                     are non-trainable (their BatchNorm runs in inference
                     mode), the others trainable.
  keras_export.json  classes, image size, value range, the preprocessing to
                     apply before the model, what trains, EMA, the step.
  backbone/          TF2 Hub backbones only (hub_module_export.py): the
                     module with its fine-tuned variables as a TF2
                     SavedModel for keras.layers.TFSMLayer; model.keras is
                     then the head, taking the backbone's features.

The values come from the checkpoint through the Estimator's own graph: the
backbone and head are built in PREDICT mode, the checkpoint (its EMA
averages when --ema_decay is on) restored, and every layer's weights read,
BatchNorm moving statistics included. Before anything is published, the Keras
model must predict what that graph predicts on a test batch (max abs
difference 1e-5), and the file must load back.
"""
import json
import logging
import os
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from estimator_transfer import files
from estimator_transfer import specs
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.errors import ConfigError
from estimator_transfer.model import heads
from estimator_transfer.serving import hub_module_export
from estimator_transfer.serving import keras_compat
from estimator_transfer.serving import keras_model
from estimator_transfer.serving import saved_model
from estimator_transfer.serving import versions

log = logging.getLogger("estimator_transfer")

MODEL_FILENAME = "model.keras"
METADATA_FILENAME = "keras_export.json"
TOLERANCE = 1e-5
_CHECK_BATCH = 4


class TrainedGraph:
  """The backbone and head of a checkpoint, read through the PREDICT graph.

  Attributes:
    backbone_values: per backbone group (forward order), its weight arrays.
    group_names: the groups' names; `frozen` whether each is frozen in the
      last stage of the freeze plan; `partial` the groups of which only some
      trainable variables were frozen (a regex on variables).
    head_values: head layer name -> arrays.
    check_images / check_outputs: a test batch and what the graph predicts.
    module_variables: TF2 Hub only, module variable name -> value.
  """

  def __init__(self, config: ExperimentConfig, resolved, checkpoint_path: str):
    size = resolved.image_size
    stages = specs.parse_schedule(config.freeze.unfreeze_schedule, config.freeze.spec)
    plan = [specs.Stage(i, stage.spec) for i, stage in enumerate(stages)]
    rng = np.random.RandomState(0)
    self.check_images = rng.uniform(0, 1, (_CHECK_BATCH, size, size, 3)).astype(np.float32)
    with tf.Graph().as_default():
      images = tf.compat.v1.placeholder(tf.float32, [None, size, size, 3])
      out = resolved.instantiate(images, plan, training=False, policy="float32")
      head = heads.build_head(config.head)
      outputs = _outputs(config, head(out.features, False))
      saver = tf.compat.v1.train.Saver(var_list=saved_model.restore_var_list(
          checkpoint_path, bool(config.optimizer.ema_decay)))
      with tf.compat.v1.Session() as sess:
        saver.restore(sess, checkpoint_path)
        self.check_outputs = sess.run(outputs, {images: self.check_images})
        self.backbone_values = [sess.run(g.variables) for g in out.groups]
        self.head_values = {l.name: sess.run(l.weights) for l in head.dense_layers}
        self.module_variables = {v.name: sess.run(v) for g in out.groups
                                 for v in g.variables}
    last = out.stages[-1]
    trained = {id(v) for v in last.trainable_variables}
    self.group_names = [g.name for g in out.groups]
    self.frozen = list(last.frozen)
    self.partial = [g.name for g, f in zip(out.groups, last.frozen)
                    if not f and any(id(v) not in trained for v in g.trainable_variables or [])]


def _outputs(config: ExperimentConfig, logits):
  if config.head.kind == "regression":
    return logits
  return tf.sigmoid(logits) if config.head.multi_label else tf.nn.softmax(logits)


def output_kind(config: ExperimentConfig) -> str:
  if config.head.kind == "regression":
    return "linear"
  return "sigmoid" if config.head.multi_label else "softmax"


def check_exportable(resolved) -> None:
  """Raises ConfigError (one sentence) for backbone kinds the Keras export cannot write."""
  if resolved.kind == "hub_tf1":
    raise ConfigError(
        f"{resolved.description} is in the TF1 Hub format (hub.Module), which only "
        "graph-mode TensorFlow 1 APIs can run and Keras 3 cannot load or train; use "
        "--format=savedmodel, or retrain on a TF2 SavedModel or Keras backbone.")
  if resolved.kind not in ("keras", "hub_tf2"):
    raise ConfigError(f"the Keras export needs an image backbone; {resolved.kind} "
                      "models (numeric features) export with --format=savedmodel.")


def export_keras(config: ExperimentConfig, resolved, export_dir: str,
                 checkpoint_path: str) -> str:
  """Writes one Keras version from `checkpoint_path`; returns its directory.

  Raises:
    ConfigError: the backbone kind or architecture cannot be exported, or the
      Keras model does not predict what the Estimator graph predicts. Nothing
      is published then.
  """
  check_exportable(resolved)
  trained = TrainedGraph(config, resolved, checkpoint_path)

  def write(temp):
    tf.io.gfile.makedirs(temp)
    if resolved.kind == "hub_tf2":
      model, extra = _hub_model(config, resolved, trained, temp)
    else:
      model, extra = _keras_model(config, resolved, trained), {}
    path = os.path.join(temp, MODEL_FILENAME)
    model.save(path)
    keras_compat.make_portable(path)
    _verify(path, trained, extra.get("features"))
    files.write_json(os.path.join(temp, METADATA_FILENAME),
                     metadata(config, resolved, trained, checkpoint_path, model, extra),
                     indent=1, sort_keys=False)

  final = versions.publish_version(export_dir, write)
  versions.prune_versions(export_dir, config.export.exports_to_keep)
  log.info("export: wrote the Keras model %s", final)
  return final


def _keras_model(config, resolved, trained: TrainedGraph) -> tf.keras.Model:
  backbone = resolved.build_keras()
  names = keras_model.weighted_layer_names(backbone)
  if len(names) != len(trained.group_names):
    raise ConfigError(f"the rebuilt backbone has {len(names)} layers with weights but "
                      f"the trained graph {len(trained.group_names)}; export with the "
                      "config the model was trained with.")
  h = config.head
  model = keras_model.build_model(
      backbone, resolved.image_size, resolved.value_range, h.hidden_units,
      h.num_outputs if h.kind == "regression" else h.num_classes, h.dropout_rate,
      output_kind(config))
  values = dict(zip(names, trained.backbone_values))
  values.update(trained.head_values)
  keras_model.set_trained_weights(model, values, resolved.value_range)
  keras_model.mark_trainable(model, [n for n, f in zip(names, trained.frozen) if f])
  trained.layer_names = names
  return model


def _hub_model(config, resolved, trained: TrainedGraph, temp: str):
  """The head as a Keras model, and the module as a TFSMLayer-ready SavedModel."""
  module_dir = os.path.join(temp, hub_module_export.DIRNAME)
  features = hub_module_export.write_module(resolved, trained.module_variables,
                                            module_dir, trained.check_images,
                                            train_mode=not any(trained.frozen))
  h = config.head
  inputs = tf.keras.Input((features.shape[-1],), name="features")
  x = inputs
  dropout = tf.keras.layers.Dropout(h.dropout_rate, name="head_dropout") \
      if h.dropout_rate else None
  for i, units in enumerate(list(h.hidden_units) + [
      h.num_outputs if h.kind == "regression" else h.num_classes]):
    x = dropout(x) if dropout is not None else x
    last = i == len(h.hidden_units)
    x = tf.keras.layers.Dense(units, activation=None if last else "relu",
                              name="head_logits" if last else f"head_hidden_{i}")(x)
  kind = output_kind(config)
  name = "outputs" if kind == "linear" else "probabilities"
  x = tf.keras.layers.Activation(kind if kind != "softmax" else "softmax", name=name)(x)
  model = tf.keras.Model(inputs, x, name="et_head")
  keras_model.set_trained_weights(model, trained.head_values, "zero_one")
  trained.layer_names = []
  return model, {"features": features, "backbone_dir": hub_module_export.DIRNAME}


def _verify(path: str, trained: TrainedGraph, features: Optional[np.ndarray]) -> None:
  """The written file loads and predicts what the Estimator graph predicts."""
  loaded = tf.keras.models.load_model(path, compile=False)
  got = loaded.predict(trained.check_images if features is None else features, verbose=0)
  diff = float(np.abs(np.asarray(got) - trained.check_outputs).max())
  if not diff <= TOLERANCE:
    raise ConfigError(f"the Keras model predicts up to {diff:.2g} away from the Estimator "
                      f"graph (tolerance {TOLERANCE:g}); nothing was published; please "
                      "report this with the backbone used.")
  log.info("export: the Keras model matches the Estimator graph (max abs diff %.2g)", diff)


def metadata(config: ExperimentConfig, resolved, trained: TrainedGraph,
             checkpoint_path: str, model: tf.keras.Model, extra: Dict) -> dict:
  """What keras_export.json says about the export."""
  size = resolved.image_size
  h = config.head
  hub = resolved.kind == "hub_tf2"
  return {
      "format": "keras",
      "model": MODEL_FILENAME,
      "backbone_kind": resolved.kind,
      "backbone": resolved.description,
      "backbone_savedmodel": extra.get("backbone_dir"),
      "head": h.kind,
      "multi_label": bool(h.multi_label),
      "class_names": list(h.class_names) or [str(i) for i in range(h.num_classes)],
      "num_classes": h.num_classes,
      "image_size": size,
      "input": {"name": keras_model.INPUT_NAME, "shape": [None, size, size, 3],
                "dtype": "float32", "channels": "RGB", "value_range": [0.0, 1.0]},
      "preprocessing": {
          "before_the_model": [
              "tf.io.decode_image(bytes, channels=3, expand_animations=False)",
              "tf.image.convert_image_dtype(image, tf.float32)  # [0, 1]",
              f"tf.image.resize(image, [{size}, {size}], method='bilinear', antialias=True)",
              "tf.clip_by_value(image, 0.0, 1.0)"],
          "inside_the_model": _inside(resolved.value_range, hub),
      },
      "output": "outputs" if h.kind == "regression" else "probabilities",
      "ema_averages": bool(config.optimizer.ema_decay),
      "global_step": _step(checkpoint_path),
      "checkpoint": checkpoint_path,
      "frozen_layers": [n for n, f in zip(trained.group_names, trained.frozen) if f],
      "trainable_layers": [l.name for l in model.layers if l.trainable and l.weights],
      "partially_frozen_layers_now_trainable": trained.partial,
      "written_by": f"tf.keras (TensorFlow {tf.__version__})",
      "loads_with": ["keras.models.load_model (Keras 3, TensorFlow 2.16+)",
                     "tf.keras.models.load_model (TensorFlow 2.15)"],
  }


def _inside(value_range: str, hub: bool) -> str:
  if value_range == "zero_one":
    return "none: the backbone takes [0, 1] itself"
  where = "the backbone SavedModel" if hub else f"layer '{keras_model.VALUE_RANGE_LAYER}'"
  return f"[0, 1] -> the backbone's range '{value_range}' ({where})"


def _step(checkpoint_path: str) -> Optional[int]:
  try:
    return int(tf.train.load_checkpoint(checkpoint_path).get_tensor("global_step"))
  except (tf.errors.OpError, ValueError):
    return None


def read_metadata(path: str) -> dict:
  """The keras_export.json of a Keras export version."""
  with tf.io.gfile.GFile(os.path.join(path, METADATA_FILENAME)) as f:
    return json.loads(f.read())
