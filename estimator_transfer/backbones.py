"""Backbones: a handle becomes a feature extractor inside a model_fn graph.

Resolution happens once, eagerly, in `resolve()`: the source kind is detected,
remote Hub handles are fetched into `TFHUB_CACHE_DIR`, the expected input size
and value range are read from the backbone, and Keras weights files are read
into NumPy arrays. `ResolvedBackbone.instantiate()` then builds the backbone in
whatever graph Estimator is building (train, eval, predict, export) and
returns its features together with the variables to train, the update ops to
run and the losses to add. Pretrained Keras weights are assigned by the
Scaffold's init_fn, which runs only when no checkpoint exists, so resuming
never overwrites trained weights.

Handles:
  mobilenet_v2, resnet50(...)      a tf.keras.applications architecture;
                                   arguments in parentheses, e.g.
                                   mobilenet_v2(alpha=0.35)
  hub:<url or dir>, <url>, <dir>   a TF-Hub handle: TF2 SavedModel (loaded
                                   with hub.KerasLayer) or TF1 Hub module
                                   (hub.Module), detected from the files
  keras:<file or dir>, <x>.h5      a Keras model (.h5, .keras, or Keras
                                   SavedModel dir), optionally cut at
                                   `output_layer`
"""
import dataclasses
import os
import re
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from estimator_transfer import freezing
from estimator_transfer.config import BackboneConfig, ConfigError

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

# Input value ranges; the input pipeline always yields RGB floats in [0, 1].
VALUE_RANGES = ("zero_one", "minus_one_one", "zero_255", "caffe", "torch")

_APP_RE = re.compile(r"^([a-z0-9_]+)(?:\((.*)\))?$")
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def to_value_range(images, value_range: str):
  """Maps RGB float images in [0, 1] to the range a backbone expects."""
  if value_range == "zero_one":
    return images
  if value_range == "minus_one_one":
    return images * 2.0 - 1.0
  if value_range == "zero_255":
    return images * 255.0
  if value_range == "caffe":
    bgr = images[..., ::-1] * 255.0
    return bgr - tf.constant(_CAFFE_MEAN_BGR, dtype=images.dtype)
  if value_range == "torch":
    return ((images - tf.constant(_TORCH_MEAN, dtype=images.dtype)) /
            tf.constant(_TORCH_STD, dtype=images.dtype))
  raise ConfigError(f"unknown value range {value_range!r}; use one of "
                    f"{', '.join(VALUE_RANGES)}.")


@dataclasses.dataclass
class LayerGroup:
  """One freezable unit of a backbone, in forward order."""
  name: str
  variables: list
  layer: object = None  # the Keras layer, when there is one


@dataclasses.dataclass
class BackboneOutput:
  """What a model_fn needs from an instantiated backbone."""
  features: tf.Tensor
  groups: List[LayerGroup]
  frozen: List[bool]
  trainable_variables: list
  update_ops: list
  losses: list
  init_fn: Optional[Callable] = None  # Scaffold init_fn for pretrained weights


@dataclasses.dataclass
class ResolvedBackbone:
  """A backbone source, resolved and ready to be built in any graph."""
  kind: str  # keras | hub_tf2 | hub_tf1
  description: str
  image_size: int
  value_range: str
  build_keras: Optional[Callable[[], tf.keras.Model]] = None
  keras_weights: Optional[List[np.ndarray]] = None
  hub_path: str = ""
  hub_groups: Optional[list] = None  # TF2 modules: [(layer, [var names])]
  fixed_size: bool = False

  def instantiate(self, images, freeze_spec: str, training: bool) -> BackboneOutput:
    """Builds the backbone in the current graph and applies it to `images`.

    Args:
      images: float32 [batch, size, size, 3] RGB in [0, 1].
      freeze_spec: a freeze spec string (see `freezing`).
      training: whether this graph trains (mode == TRAIN).

    Returns:
      A BackboneOutput.
    """
    spec = freezing.parse_spec(freeze_spec)
    x = to_value_range(images, self.value_range)
    if self.kind == "keras":
      return self._instantiate_keras(x, spec, training)
    if self.kind == "hub_tf2":
      return self._instantiate_hub_tf2(x, spec, training)
    return self._instantiate_hub_tf1(x, spec, training)

  def _instantiate_keras(self, x, spec, training):
    model = self.build_keras()
    layers = [l for l in _flat_layers(model) if l.weights]
    frozen = freezing.frozen_mask(spec, [l.name for l in layers])
    for layer, is_frozen in zip(layers, frozen):
      # A Keras BatchNormalization with trainable=False runs in inference
      # mode whatever `training` says, so its moving statistics stay fixed.
      layer.trainable = not is_frozen
    features = model(x, training=training and not all(frozen))
    features = _pool(features)
    groups = [LayerGroup(l.name, list(l.weights), l) for l in layers]
    trainable = [v for v in model.trainable_weights] if training else []
    # Keras layers in a v1 graph keep their BatchNorm updates on the layer,
    # not in the UPDATE_OPS collection: collect them explicitly, and only those
    # fed by `x` (rebuilding the model also made updates on its own Input
    # placeholder, which must never run).
    updates = list(model.get_updates_for(x)) if training else []
    losses = (list(model.get_losses_for(None)) + list(model.get_losses_for(x))
              if training else [])
    init_fn = None
    if self.keras_weights is not None:
      init_fn = _assign_init_fn(model.weights, self.keras_weights, self.description)
    return BackboneOutput(features, groups, frozen, trainable, updates, losses, init_fn)

  def _instantiate_hub_tf2(self, x, spec, training):
    import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
    variables_probe = self.hub_groups
    frozen = freezing.frozen_mask(spec, [g for g, _ in variables_probe])
    any_trainable = not all(frozen)
    layer = hub.KerasLayer(self.hub_path, trainable=any_trainable)
    # A TF2 module has one BatchNorm mode for all its layers: it runs in
    # training mode only when the whole module trains, so frozen parts never
    # see their moving statistics change.
    features = layer(x, training=training and not any(frozen))
    features = _pool(features)
    groups = _group_variables(layer.weights)
    frozen_by_name = dict(zip([g for g, _ in variables_probe], frozen))
    frozen = [frozen_by_name.get(g.name, True) for g in groups]
    trainable = []
    if training:
      # hub.KerasLayer variables are not in the TRAINABLE_VARIABLES collection
      # in graph mode: the var_list must be built from the layer itself.
      trainable = [v for g, f in zip(groups, frozen) if not f for v in g.variables
                   if any(v is t for t in layer.trainable_weights)]
    losses = list(layer.losses) if training and any_trainable else []
    updates = list(layer.updates) if training else []
    return BackboneOutput(features, groups, frozen, trainable, updates, losses)

  def _instantiate_hub_tf1(self, x, spec, training):
    import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
    module_spec = hub.load_module_spec(self.hub_path)
    any_trainable = spec.kind != "all"
    full_train = spec.kind == "none"
    tags = {"train"} if training and full_train else None
    before_updates = set(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS))
    before_losses = set(tf.compat.v1.get_collection(
        tf.compat.v1.GraphKeys.REGULARIZATION_LOSSES))
    module = hub.Module(module_spec, trainable=any_trainable, tags=tags, name="hub_module")
    features = _pool(module(x))
    variables = []
    for name, var in sorted(module.variable_map.items()):
      variables.extend(var if isinstance(var, (list, tuple)) else [var])
    groups = _group_variables(variables, strip_prefix="hub_module/")
    frozen = freezing.frozen_mask(spec, [g.name for g in groups])
    trainable = [v for g, f in zip(groups, frozen) if not f for v in g.variables] \
        if training else []
    updates = [op for op in tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
               if op not in before_updates] if training else []
    losses = [l for l in tf.compat.v1.get_collection(
        tf.compat.v1.GraphKeys.REGULARIZATION_LOSSES) if l not in before_losses] \
        if training and any_trainable else []
    return BackboneOutput(features, groups, frozen, trainable, updates, losses)


def _flat_layers(model) -> list:
  """Layers of a (possibly nested) Keras model in forward order."""
  out = []
  for layer in model.layers:
    if isinstance(layer, tf.keras.Model) or hasattr(layer, "layers") and layer.layers:
      out.extend(_flat_layers(layer))
    else:
      out.append(layer)
  return out


def _pool(features):
  """Global-average-pools a 4D feature map; leaves vectors alone."""
  if features.shape.rank == 4:
    return tf.reduce_mean(features, axis=[1, 2])
  if features.shape.rank != 2:
    raise ConfigError(
        f"the backbone returns features of shape {features.shape}; pick a "
        "layer with a [batch, features] or [batch, h, w, c] output "
        "(--backbone_output_layer).")
  return features


def _var_name(var) -> str:
  name = var.name
  return name[:-2] if name.endswith(":0") else name


def _group_variables(variables, strip_prefix: str = "") -> List[LayerGroup]:
  """Groups variables by their name prefix (the layer), in first-seen order."""
  groups, index = [], {}
  for var in variables:
    name = _var_name(var)
    if strip_prefix and name.startswith(strip_prefix):
      name = name[len(strip_prefix):]
    prefix = name.rsplit("/", 1)[0] if "/" in name else name
    if prefix not in index:
      index[prefix] = len(groups)
      groups.append(LayerGroup(prefix, []))
    groups[index[prefix]].variables.append(var)
  return groups


def _hub_tf2_variable_names(path: str) -> List[Tuple[str, List[str]]]:
  """Variable groups of a TF2 SavedModel, read from its checkpoint-free object graph.

  Loading the module once in a throwaway graph gives the variable names in the
  order hub.KerasLayer will create them, so freeze masks are known before the
  real layer is built.
  """
  import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
  with tf.Graph().as_default():
    layer = hub.KerasLayer(path, trainable=True)
    return [(g.name, [_var_name(v) for v in g.variables])
            for g in _group_variables(layer.weights)]


def _assign_init_fn(variables, values, description):
  """Scaffold init_fn that loads pretrained values into `variables`."""
  if len(variables) != len(values):
    raise ConfigError(
        f"the weights for {description} hold {len(values)} arrays but the "
        f"architecture has {len(variables)} variables; use the weights file "
        "saved from the same architecture.")
  placeholders, assigns = [], []
  with tf.name_scope("pretrained_init"):
    for var, value in zip(variables, values):
      if tuple(var.shape) != tuple(value.shape):
        raise ConfigError(
            f"pretrained weight for {_var_name(var)} has shape {value.shape} "
            f"but the architecture expects {tuple(var.shape)}; check "
            "--image_size-independent settings such as alpha, or the weights file.")
      ph = tf.compat.v1.placeholder(var.dtype.base_dtype, value.shape)
      placeholders.append(ph)
      assigns.append(tf.compat.v1.assign(var, ph, validate_shape=True).op)
  op = tf.group(*assigns, name="load_pretrained")

  def init_fn(unused_scaffold, session):
    session.run(op, feed_dict=dict(zip(placeholders, values)))

  return init_fn


# ----------------------------------------------------------------------------
# Resolution (eager, once per process)
# ----------------------------------------------------------------------------


def resolve(config: BackboneConfig) -> ResolvedBackbone:
  """Resolves a backbone config: detects the source, size, range and weights.

  Raises:
    ConfigError: the handle, weights or size do not make sense.
  """
  handle = config.handle.strip()
  if not handle:
    raise ConfigError("--backbone is required.")
  if handle.startswith("hub:"):
    return _resolve_hub(handle[4:], config)
  if handle.startswith("keras:"):
    return _resolve_keras_model(handle[6:], config)
  match = _APP_RE.match(handle)
  if match and match.group(1) in KERAS_APPLICATIONS and not os.path.exists(handle):
    return _resolve_application(match.group(1), match.group(2) or "", config)
  if handle.startswith(("http://", "https://", "gs://")):
    return _resolve_hub(handle, config)
  if handle.endswith((".h5", ".keras", ".hdf5")) or config.output_layer:
    return _resolve_keras_model(handle, config)
  if os.path.isdir(handle):
    return _resolve_hub(handle, config)
  raise ConfigError(
      f"--backbone={handle} is neither a known Keras application "
      f"({', '.join(sorted(KERAS_APPLICATIONS))}) nor an existing file or "
      "directory; check the path or prefix it with hub: or keras:.")


def _parse_kwargs(text: str, handle: str) -> dict:
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


def _resolve_size(config: BackboneConfig, native: Optional[int], fixed: bool,
                  description: str) -> int:
  if fixed and native and config.image_size and config.image_size != native:
    raise ConfigError(
        f"--image_size={config.image_size} does not match the {native}x{native} "
        f"input that {description} expects; set --image_size={native} or 0.")
  size = config.image_size or native
  if not size:
    raise ConfigError(f"{description} does not declare an input size; set "
                      "--image_size.")
  return int(size)


def _resolve_application(name: str, args: str, config: BackboneConfig) -> ResolvedBackbone:
  ctor_name, value_range, default_size = KERAS_APPLICATIONS[name]
  kwargs = _parse_kwargs(args, config.handle)
  size = config.image_size or default_size
  ctor = getattr(tf.keras.applications, ctor_name)

  def build():
    try:
      return ctor(include_top=False, weights=None, input_shape=(size, size, 3),
                  pooling="avg", **kwargs)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"--backbone={config.handle} could not be built ({e}); "
                        "check its arguments and --image_size.") from e

  weights = None
  if config.weights and config.weights.lower() != "none":
    weights = _load_keras_weights(build, config.weights, config.handle)
  return ResolvedBackbone("keras", f"keras application {config.handle}", size,
                          value_range, build_keras=build, keras_weights=weights)


def _load_keras_weights(build, path: str, handle: str) -> List[np.ndarray]:
  """Reads a weights file into arrays, through an eager copy of the model."""
  if not os.path.exists(path) and not os.path.exists(path + ".index"):
    raise ConfigError(f"--backbone_weights={path} does not exist; give a local "
                      ".h5 or TF weights file, or none for random initialisation.")
  with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    tf.compat.v1.keras.backend.set_session(sess)
    try:
      model = build()
      try:
        model.load_weights(path)
      except (ValueError, KeyError):
        model.load_weights(path, by_name=True, skip_mismatch=False)
      return sess.run(model.weights)
    except (ValueError, KeyError, OSError, tf.errors.OpError) as e:
      raise ConfigError(f"--backbone_weights={path} does not fit {handle} "
                        f"({str(e).splitlines()[0]}); use weights saved from the "
                        "same architecture and arguments.") from e


def _resolve_keras_model(path: str, config: BackboneConfig) -> ResolvedBackbone:
  if not os.path.exists(path):
    raise ConfigError(f"--backbone={config.handle}: {path} does not exist; give a "
                      "Keras .h5/.keras file or a Keras SavedModel directory.")
  try:
    full = tf.keras.models.load_model(path, compile=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"--backbone={config.handle} could not be loaded as a Keras "
                      f"model ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                      "check the file, or use hub: for a TF-Hub SavedModel.") from e
  model_config = full.get_config()
  model_class = type(full)
  output_layer = config.output_layer

  def cut(model):
    if not output_layer:
      return model
    try:
      layer = model.get_layer(output_layer)
    except ValueError as e:
      names = ", ".join(l.name for l in model.layers[-8:])
      raise ConfigError(f"--backbone_output_layer={output_layer} is not a layer of "
                        f"{path}; the last layers are: {names}.") from e
    return tf.keras.Model(model.inputs, layer.output, name=model.name + "_cut")

  def build():
    cls = tf.keras.Sequential if model_class is tf.keras.Sequential else tf.keras.Model
    return cut(cls.from_config(model_config))

  native = full.input_shape[1] if isinstance(full.input_shape, tuple) else None
  description = f"Keras model {path}"
  size = _resolve_size(config, native, fixed=native is not None, description=description)
  if config.weights and config.weights.lower() == "none":
    weights = None
  elif config.weights:
    weights = _load_keras_weights(build, config.weights, config.handle)
  else:
    weights = [np.asarray(w) for w in cut(full).get_weights()]
  return ResolvedBackbone("keras", description, size, "zero_one",
                          build_keras=build, keras_weights=weights, fixed_size=native is not None)


def _resolve_hub(handle: str, config: BackboneConfig) -> ResolvedBackbone:
  import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
  if config.weights and config.weights.lower() not in ("", "none"):
    raise ConfigError("--backbone_weights applies to Keras backbones only; a Hub "
                      "module carries its own weights.")
  if config.weights.lower() == "none":
    raise ConfigError("--backbone_weights=none is not available for Hub modules; "
                      "train from scratch with a Keras architecture instead.")
  is_remote = handle.startswith(("http://", "https://", "gs://"))
  if not is_remote and not os.path.isdir(handle):
    raise ConfigError(f"--backbone=hub:{handle}: no such module directory; give a "
                      "TF-Hub URL or a local SavedModel/Hub module directory.")
  try:
    path = hub.resolve(handle)
  except Exception as e:  # pylint: disable=broad-except
    cache = os.environ.get("TFHUB_CACHE_DIR", "(TFHUB_CACHE_DIR not set)")
    raise ConfigError(
        f"could not fetch Hub module {handle} ({type(e).__name__}); without "
        f"network, pre-seed the cache {cache} on a connected machine with the "
        "same TFHUB_CACHE_DIR (python -c 'import tensorflow_hub as h; "
        f"h.resolve(\"{handle}\")') and copy it over, or pass a local directory.") from e
  if os.path.exists(os.path.join(path, "tfhub_module.pb")):
    native, fixed = _hub_tf1_size(path)
    kind = "hub_tf1"
  elif os.path.exists(os.path.join(path, "saved_model.pb")):
    native, fixed = _hub_tf2_size(path)
    kind = "hub_tf2"
  else:
    raise ConfigError(f"{path} holds neither saved_model.pb nor tfhub_module.pb; "
                      "point --backbone at a TF-Hub module directory.")
  description = f"Hub module {handle}"
  size = _resolve_size(config, native, fixed, description)
  groups = _hub_tf2_variable_names(path) if kind == "hub_tf2" else None
  return ResolvedBackbone(kind, description, size, "zero_one", hub_path=path,
                          hub_groups=groups, fixed_size=fixed)


def _hub_tf2_size(path: str) -> Tuple[Optional[int], bool]:
  """Reads the image size a TF2 SavedModel's __call__ declares, if static."""
  with tf.Graph().as_default():
    obj = tf.compat.v2.saved_model.load(path)
    fn = getattr(obj, "__call__", None)
    for concrete in getattr(fn, "concrete_functions", []) or []:
      args = concrete.structured_input_signature[0]
      if args and hasattr(args[0], "shape") and args[0].shape.rank == 4:
        height = args[0].shape[1]
        return (int(height), True) if height else (None, False)
    for sig in getattr(obj, "signatures", {}).values():
      for spec in sig.structured_input_signature[1].values():
        if spec.shape.rank == 4 and spec.shape[1]:
          return int(spec.shape[1]), True
  return None, False


def _hub_tf1_size(path: str) -> Tuple[Optional[int], bool]:
  import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
  spec = hub.load_module_spec(path)
  try:
    height, _ = hub.get_expected_image_size(spec)
    return int(height), True
  except ValueError:
    return None, False
