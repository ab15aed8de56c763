"""Keras backbones: tf.keras.applications, Keras model files and SavedModel dirs.

Resolution (eager, once) builds the architecture's constructor and reads the
pretrained weights into NumPy arrays; `KerasBackbone._build` then constructs
the model in whatever graph Estimator is building and returns the Scaffold
init_fn that assigns those weights (it runs only when no checkpoint exists,
so resuming never overwrites trained weights).

Training mode per layer: a layer frozen in the current stage normalizes with,
and keeps, its moving statistics; the others use batch statistics and update
theirs (a per-stage tensor under an unfreeze schedule).
"""
import contextlib
import copy
import dataclasses
import os
import re
import warnings
from typing import Callable, List, Optional

import h5py
import numpy as np
import tensorflow as tf

from estimator_transfer.config import BackboneConfig
from estimator_transfer.errors import ConfigError
from estimator_transfer.model import backbone_types
from estimator_transfer.model import freezing

# name -> (tf.keras.applications constructor, value range, default size)
KERAS_APPLICATIONS = {
    "mobilenet": ("MobileNet", "minus_one_one", 224),
    "mobilenet_v2": ("MobileNetV2", "minus_one_one", 224),
    "mobilenet_v3_small": ("MobileNetV3Small", "zero_255", 224),
    "mobilenet_v3_large": ("MobileNetV3Large", "zero_255", 224),
    "efficientnet_b0": ("EfficientNetB0", "zero_255", 224),
    "efficientnet_b1": ("EfficientNetB1", "zero_255", 240),
    "efficientnet_v2_b0": ("EfficientNetV2B0", "zero_255", 224),
    "resnet50": ("ResNet50", "caffe", 224),
    "resnet50_v2": ("ResNet50V2", "minus_one_one", 224),
    "resnet101": ("ResNet101", "caffe", 224),
    "inception_v3": ("InceptionV3", "minus_one_one", 299),
    "xception": ("Xception", "minus_one_one", 299),
    "densenet121": ("DenseNet121", "torch", 224),
    "vgg16": ("VGG16", "caffe", 224),
}

# An application handle: name, optionally with arguments, mobilenet_v2(alpha=0.35).
APPLICATION_RE = re.compile(r"^([a-z0-9_]+)(?:\((.*)\))?$")


@dataclasses.dataclass
class KerasBackbone(backbone_types.ResolvedBackbone):
  """A Keras model, rebuilt in each graph from `build_keras`."""
  build_keras: Optional[Callable[[], tf.keras.Model]] = None
  keras_weights: Optional[List[np.ndarray]] = None

  MIXED_PRECISION = True

  def _build(self, x, stages, stage_index, training, policy):
    with dtype_policy(policy):
      out = self._build_model(x, stages, stage_index, training)
    if out.features.dtype != tf.float32:
      out.features = tf.cast(out.features, tf.float32)
    return out

  def _build_model(self, x, stages, stage_index, training):
    model = build_inference_copy(self.build_keras)
    # The freeze plan alone decides what trains: undo any `trainable=False`
    # saved with the model (it would empty the lists read below).
    model.trainable = True
    layers = [l for l in flat_layers(model) if l.weights]
    # Read before any `trainable` toggling empties the lists.
    groups = [freezing.LayerGroup(l.name, list(l.weights), l, list(l.trainable_weights))
              for l in layers]
    resolved = freezing.resolve_stages(stages, groups)
    any_trains = configure_layers(layers, resolved, stage_index, training)
    features = model(x, training=backbone_types.training_mode(any_trains, stage_index,
                                                               training))
    features = backbone_types.pool_features(features)
    # Keras layers in a v1 graph keep their BatchNorm updates on the layer,
    # not in the UPDATE_OPS collection: collect them explicitly, and only those
    # fed by `x` (rebuilding the model also made updates on its own Input
    # placeholder, which must never run).
    updates = list(model.get_updates_for(x)) if training else []
    losses = (list(model.get_losses_for(None)) + list(model.get_losses_for(x))
              if training else [])
    init_fn = None
    if self.keras_weights is not None:
      init_fn = assign_init_fn(model.weights, self.keras_weights, self.description)
    return backbone_types.BackboneOutput(
        features, groups, freezing.stage_variables(stages, resolved, groups),
        freezing.union_trainable(resolved, groups), updates, losses, init_fn)


# ----------------------------------------------------------------------------
# Resolution (eager, once per process)
# ----------------------------------------------------------------------------


def parse_kwargs(text: str, handle: str) -> dict:
  """The arguments of an application handle: "alpha=0.35, x=1" -> dict.

  Raises:
    ConfigError: an argument is not name=value.
  """
  kwargs = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    if "=" not in part:
      raise ConfigError(f"--backbone={handle}: argument {part!r} must look like "
                        "name=value, e.g. mobilenet_v2(alpha=0.35).")
    key, value = (s.strip() for s in part.split("=", 1))
    for cast in (int, float):
      try:
        value = cast(value)
        break
      except ValueError:
        pass
    kwargs[key] = value
  return kwargs


def resolve_application(name: str, args: str, config: BackboneConfig) -> KerasBackbone:
  """A tf.keras.applications architecture, with weights from --backbone_weights.

  Raises:
    ConfigError: bad arguments or a weights file that does not fit.
  """
  ctor_name, value_range, default_size = KERAS_APPLICATIONS[name]
  kwargs = parse_kwargs(args, config.handle)
  # An application is built for the input size it is given (any size from
  # 32 px on), so --image_size never mismatches; 0 takes its native size.
  size = config.image_size or default_size
  ctor = getattr(tf.keras.applications, ctor_name)

  def build():
    try:
      return ctor(include_top=False, weights=None, input_shape=(size, size, 3),
                  pooling="avg", **kwargs)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"--backbone={config.handle} could not be built "
                        f"({str(e).splitlines()[0]}); check its arguments and "
                        "--image_size.") from e

  weights = None
  if config.weights and config.weights.lower() != "none":
    weights = load_keras_weights(build, config.weights, config.handle)
  return KerasBackbone("keras", f"keras application {config.handle}", size,
                       backbone_types.configured_value_range(config, value_range),
                       build_keras=build, keras_weights=weights)


def load_keras_weights(build, path: str, handle: str) -> List[np.ndarray]:
  """Reads a weights file into arrays, in the order of `build().weights`.

  Raises:
    ConfigError: the file is missing or does not fit the architecture.
  """
  if not os.path.exists(path) and not os.path.exists(path + ".index"):
    raise ConfigError(f"--backbone_weights={path} does not exist; give a local "
                      ".h5 or TF weights file, or none for random initialisation.")

  def read():
    model = build()
    try:
      model.load_weights(path)
    except (ValueError, KeyError):
      # E.g. a file saved with the classification top: match layers by name,
      # but only if every weighted layer of ours is in the file (by_name
      # silently skips missing layers, which would leave them random).
      missing = _layers_missing_from_h5(model, path)
      if missing:
        raise ValueError(f"the file has no weights for layers {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}") from None
      model.load_weights(path, by_name=True, skip_mismatch=False)
    return model.weights

  try:
    if tf.executing_eagerly():
      # Eager is the fast path (no graph, no session) and leaves Keras'
      # global session alone.
      return [w.numpy() for w in read()]
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
      tf.compat.v1.keras.backend.set_session(sess)
      return sess.run(read())
  except (ValueError, KeyError, OSError, tf.errors.OpError) as e:
    raise ConfigError(f"--backbone_weights={path} does not fit {handle} "
                      f"({str(e).splitlines()[0]}); use weights saved from the "
                      "same architecture and arguments.") from e


def _layers_missing_from_h5(model, path: str) -> List[str]:
  """Weighted top-level layers of `model` that an .h5 weights file lacks."""
  if not h5py.is_hdf5(path):
    return []
  with h5py.File(path, "r") as f:
    group = f["model_weights"] if "model_weights" in f else f
    names = {n.decode() if isinstance(n, bytes) else n
             for n in group.attrs.get("layer_names", [])}
  return [l.name for l in model.layers if l.weights and l.name not in names]


def resolve_keras_model(path: str, config: BackboneConfig) -> KerasBackbone:
  """A saved Keras model (.h5, .keras, SavedModel dir), cut at `output_layer`.

  Raises:
    ConfigError: the file is missing or not a Keras model, or the output
      layer or the weights do not fit.
  """
  if not os.path.exists(path):
    raise ConfigError(f"--backbone={config.handle}: {path} does not exist; give a "
                      "Keras .h5/.keras file or a Keras SavedModel directory.")
  try:
    full = tf.keras.models.load_model(path, compile=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"--backbone={config.handle} could not be loaded as a Keras "
                      f"model ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                      "check the file, or use hub: for a TF-Hub SavedModel.") from e
  # Rebuild only what is left after the cut: the layers past it would be
  # unused variables in every graph and checkpoint.
  cut_model = _cut(full, config.output_layer, path)
  build = _rebuilder(cut_model)
  # Only an image input (rank 4) declares a size; vector inputs take numeric features.
  image_input = isinstance(full.input_shape, tuple) and len(full.input_shape) == 4
  native = full.input_shape[1] if image_input else None
  description = f"Keras model {path}"
  if image_input or config.image_size:
    size = backbone_types.resolve_size(config, native, fixed=native is not None,
                                       description=description)
  else:
    size = 0  # numeric features: no image size
  if config.weights and config.weights.lower() == "none":
    weights = None
  elif config.weights:
    weights = load_keras_weights(build, config.weights, config.handle)
  else:
    weights = [np.asarray(w) for w in cut_model.get_weights()]
  return KerasBackbone("keras", description, size,
                       backbone_types.configured_value_range(config, "zero_one"),
                       fixed_size=native is not None, build_keras=build,
                       keras_weights=weights)


def _cut(model, output_layer: str, path: str):
  """`model` up to `output_layer` (the whole model when empty)."""
  if not output_layer:
    return model
  try:
    layer = model.get_layer(output_layer)
  except ValueError as e:
    names = ", ".join(l.name for l in model.layers[-8:])
    raise ConfigError(f"--backbone_output_layer={output_layer} is not a layer of "
                      f"{path}; the last layers are: {names}.") from e
  return tf.keras.Model(model.inputs, layer.output, name=model.name + "_cut")


def _rebuilder(model) -> Callable[[], tf.keras.Model]:
  """A function that builds a fresh copy of `model`'s architecture (no weights)."""
  model_config = model.get_config()
  model_class = type(model)

  def build():
    cls = tf.keras.Sequential if model_class is tf.keras.Sequential else tf.keras.Model
    policy = tf.keras.mixed_precision.global_policy().name
    # The saved config pins every layer's dtype (float32): a mixed policy
    # (`dtype_policy`) must be written into it.
    return cls.from_config(model_config if policy == "float32" else
                           keras_config_with_policy(model_config, policy))

  return build


# ----------------------------------------------------------------------------
# Graph construction helpers
# ----------------------------------------------------------------------------


def build_inference_copy(build: Callable[[], tf.keras.Model]) -> tf.keras.Model:
  """`build()` in Keras' inference learning phase.

  Constructing a Keras model in a graph applies it to its own Input (a copy
  that never runs); in the default learning phase every BatchNorm of that
  copy becomes a tf.cond with both modes, half of the model_fn's time.
  Inference mode keeps the copy small; the call that runs sets its modes.
  """
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*learning_phase_scope.*deprecated")
    with tf.keras.backend.learning_phase_scope(0):
      return build()


def configure_layers(layers, resolutions, stage_index, training: bool) -> List[bool]:
  """Sets each weighted layer's trainability and training mode from the plan.

  Args:
    layers: the weighted layers, in the order of the resolutions' masks.
    resolutions: one `freezing.Resolution` per stage.
    stage_index: the stage tensor (None with one stage).
    training: whether this graph trains.

  Returns:
    Per stage, whether any of `layers` trains in it.
  """
  for i, layer in enumerate(layers):
    trains = [not r.frozen_layers[i] for r in resolutions]
    # A layer that never trains is not trainable: Keras then keeps it (and
    # its BatchNorm) in inference mode and drops its update ops.
    layer.trainable = any(trains)
    if hasattr(layer, "_get_training_value"):
      pin_training_mode(layer, backbone_types.training_mode(trains, stage_index, training))
  return [not all(r.frozen_layers) for r in resolutions]


@contextlib.contextmanager
def dtype_policy(policy: str):
  """Keras' global dtype policy set to `policy` while the backbone is built.

  Layers take the policy when they are constructed; it is restored at once,
  so the head (and anything else) stays float32. A model rebuilt from a
  config carries a `dtype` per layer, which `keras_config_with_policy`
  rewrites.
  """
  previous = tf.keras.mixed_precision.global_policy()
  if policy == previous.name:
    yield
    return
  tf.keras.mixed_precision.set_global_policy(policy)
  try:
    yield
  finally:
    tf.keras.mixed_precision.set_global_policy(previous)


def keras_config_with_policy(model_config: dict, policy: str) -> dict:
  """A functional/Sequential model config whose layers use `policy`.

  Input layers keep their dtype (the images arrive as float32 and every
  layer casts its inputs to its compute dtype).
  """
  config = copy.deepcopy(model_config)
  for layer in config.get("layers", []):
    if layer.get("class_name") == "InputLayer":
      continue
    inner = layer.get("config", {})
    if "layers" in inner:  # a nested model
      layer["config"] = keras_config_with_policy(inner, policy)
    elif "dtype" in inner:
      inner["dtype"] = policy
  return config


def pin_training_mode(layer, mode) -> None:
  """Makes a BatchNorm-like layer use `mode` whatever its caller passes.

  Keras BatchNormalization asks `_get_training_value` for its mode; pinning it
  per layer lets frozen layers run in inference mode next to trained ones in
  one model call, in both v1 and v2 Keras classes, with a Python bool or a
  per-stage tensor (then the layer's updates are conditional too).
  """
  object.__setattr__(layer, "_get_training_value", lambda training=None: mode)


def flat_layers(model) -> list:
  """Layers of a (possibly nested) Keras model in forward order."""
  out = []
  for layer in model.layers:
    if isinstance(layer, tf.keras.Model) or hasattr(layer, "layers") and layer.layers:
      out.extend(flat_layers(layer))
    else:
      out.append(layer)
  return out


def assign_init_fn(variables, values, description):
  """Scaffold init_fn that loads pretrained values into `variables`."""
  if len(variables) != len(values):
    raise ConfigError(
        f"the weights for {description} hold {len(values)} arrays but the "
        f"architecture has {len(variables)} variables; use the weights file "
        "saved from the same architecture.")
  placeholders, assigns = [], []
  # Run once, never compiled (also inside model_fn's --xla scope).
  with tf.name_scope("pretrained_init"), tf.xla.experimental.jit_scope(compile_ops=False):
    for var, value in zip(variables, values):
      if tuple(var.shape) != tuple(value.shape):
        raise ConfigError(
            f"pretrained weight for {freezing.var_name(var)} has shape {value.shape} "
            f"but the architecture expects {tuple(var.shape)}; check "
            "--image_size-independent settings such as alpha, or the weights file.")
      ph = tf.compat.v1.placeholder(var.dtype.base_dtype, value.shape)
      placeholders.append(ph)
      assigns.append(tf.compat.v1.assign(var, ph, validate_shape=True).op)
  op = tf.group(*assigns, name="load_pretrained")

  def init_fn(unused_scaffold, session):
    session.run(op, feed_dict=dict(zip(placeholders, values)))

  return init_fn
