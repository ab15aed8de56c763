"""Backbones: a handle becomes a feature extractor inside a model_fn graph.

Resolution happens once, eagerly, in `resolve()`: the source kind is detected,
remote Hub handles are fetched into `TFHUB_CACHE_DIR`, the expected input size
and value range are read from the backbone, and Keras weights files are read
into NumPy arrays. `ResolvedBackbone.instantiate()` then builds the backbone in
whatever graph Estimator is building (train, eval, predict, export) and
returns its features together with the variables to train (per unfreeze
stage), the update ops to run and the losses to add. Pretrained Keras weights
are assigned by the Scaffold's init_fn, which runs only when no checkpoint
exists, so resuming never overwrites trained weights.

Handles:
  mobilenet_v2, resnet50(...)      a tf.keras.applications architecture;
                                   arguments in parentheses, e.g.
                                   mobilenet_v2(alpha=0.35); built for
                                   --image_size (any size it accepts), with
                                   its own input value range
  hub:<url or dir>, <url>, <dir>   a TF-Hub handle: TF2 SavedModel (loaded
                                   with hub.KerasLayer) or TF1 Hub module
                                   (hub.Module), detected from the files;
                                   value range [0, 1] (the Hub convention)
  keras:<file or dir>, <x>.h5      a Keras model (.h5, .keras, or Keras
                                   SavedModel dir), optionally cut at
                                   `output_layer` (only the layers up to it
                                   are built); value range [0, 1] unless
                                   --backbone_value_range says otherwise

A fixed input size that differs from --image_size is a ConfigError, never a
silent resize.

Training mode (BatchNorm, dropout) per source, for frozen parts:
  Keras     per layer: a layer frozen in the current stage normalizes with,
            and keeps, its moving statistics; the others use batch
            statistics and update theirs (a per-stage tensor under an
            unfreeze schedule).
  TF2 Hub   one mode for the whole module: training mode only while no part
            of it is frozen (in the current stage); otherwise inference mode,
            so no statistic of the module moves.
  TF1 Hub   one graph variant, picked once: the `train` tag only when every
            stage trains the whole module (then its UPDATE_OPS run); with
            anything frozen the inference variant runs throughout.
"""
import contextlib
import copy
import dataclasses
import os
import re
import tempfile
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from estimator_transfer.model import freezing
from estimator_transfer.model import schedules
from estimator_transfer.errors import ConfigError
from estimator_transfer.config import BackboneConfig
from estimator_transfer import specs

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
                    f"{', '.join(specs.VALUE_RANGES)}.")


@dataclasses.dataclass
class LayerGroup:
  """One freezable unit of a backbone, in forward order."""
  name: str
  variables: list
  layer: object = None  # the Keras layer, when there is one
  trainable_variables: Optional[list] = None  # those a freeze spec may train


@dataclasses.dataclass
class StageVariables:
  """The backbone's trainable set during one stage of a freeze plan."""
  start: int  # first global step of the stage
  spec: str
  frozen: List[bool]  # per group: frozen (inference mode) in this stage
  trainable_variables: list


@dataclasses.dataclass
class BackboneOutput:
  """What a model_fn needs from an instantiated backbone.

  `trainable_variables` is the union over all stages and is filled in every
  mode (evaluation needs it to map moving averages); `stages` hold the
  per-stage sets; `stage_index` is the int32 stage tensor when the plan has
  more than one stage.
  """
  features: tf.Tensor
  groups: List[LayerGroup]
  stages: List[StageVariables]
  trainable_variables: list
  update_ops: list
  losses: list
  init_fn: Optional[Callable] = None  # Scaffold init_fn for pretrained weights
  stage_index: Optional[tf.Tensor] = None

  @property
  def frozen(self) -> List[bool]:
    """Per group, whether it is frozen in the first stage."""
    return self.stages[0].frozen


@dataclasses.dataclass
class ResolvedBackbone:
  """A backbone source, resolved and ready to be built in any graph."""
  kind: str  # keras | hub_tf2 | hub_tf1 | identity
  description: str
  image_size: int
  value_range: str
  build_keras: Optional[Callable[[], tf.keras.Model]] = None
  keras_weights: Optional[List[np.ndarray]] = None
  hub_path: str = ""
  hub_groups: Optional[list] = None  # TF1 modules: [(group, [trainable var names])]
  fixed_size: bool = False
  hub_train_tag: bool = False  # TF1 module has a {"train"} graph variant

  def instantiate(self, images, plan, training: bool,
                  policy: str = "float32") -> BackboneOutput:
    """Builds the backbone in the current graph and applies it to `images`.

    Args:
      images: float32 [batch, size, size, 3] RGB in [0, 1].
      plan: a freeze spec string, or a list of `specs.Stage` with int
        starts (gradual unfreezing; the stage follows the global step).
      training: whether this graph trains (mode == TRAIN).
      policy: the Keras dtype policy of a Keras backbone (float32,
        mixed_float16, mixed_bfloat16); variables stay float32 and the
        features are float32 whatever the policy.

    Returns:
      A BackboneOutput.

    Raises:
      ConfigError: the plan does not fit this backbone, or a mixed policy
        for a Hub module.
    """
    stages = [specs.Stage(0, specs.parse_spec(plan))] if isinstance(plan, str) \
        else list(plan)
    stage_index = None
    if len(stages) > 1:
      # Read the step before the train op increments it: the stage tensor
      # feeds the forward pass, so the read is ordered before the update.
      stage_index = tf.identity(schedules.stage_index_op(
          tf.compat.v1.train.get_or_create_global_step(),
          [s.start for s in stages[1:]]), name="freeze_stage")
    if self.kind == "identity":
      # No backbone: the head reads the input features (numeric CSV/array data).
      features = tf.cast(tf.reshape(images, [-1, int(np.prod(images.shape[1:]))]),
                         tf.float32)
      return BackboneOutput(features, groups=[], stages=[StageVariables(0, "all", [], [])],
                            trainable_variables=[], update_ops=[], losses=[])
    x = to_value_range(images, self.value_range)
    if policy != "float32" and self.kind != "keras":
      raise ConfigError(f"--mixed_precision={policy} applies to Keras backbones, but "
                        f"{self.description} runs in the dtypes it was saved with; "
                        "drop --mixed_precision.")
    if self.kind == "keras":
      with _dtype_policy(policy):
        out = self._instantiate_keras(x, stages, stage_index, training)
      if out.features.dtype != tf.float32:
        out.features = tf.cast(out.features, tf.float32)
    elif self.kind == "hub_tf2":
      out = self._instantiate_hub_tf2(x, stages, stage_index, training)
    else:
      out = self._instantiate_hub_tf1(x, stages, stage_index, training)
    out.stage_index = stage_index
    return out

  def _instantiate_keras(self, x, stages, stage_index, training):
    # Constructing a Keras model in a graph applies it to its own Input (a
    # copy that never runs); in the default learning phase every BatchNorm of
    # that copy becomes a tf.cond with both modes, half of the model_fn's
    # time. Inference mode keeps the copy small; the call below sets the
    # modes of the copy that runs.
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*learning_phase_scope.*deprecated")
      with tf.keras.backend.learning_phase_scope(0):
        model = self.build_keras()
    # The freeze plan alone decides what trains: undo any `trainable=False`
    # saved with the model (it would empty the lists read below).
    model.trainable = True
    layers = [l for l in _flat_layers(model) if l.weights]
    # Read before any `trainable` toggling empties the lists.
    groups = [LayerGroup(l.name, list(l.weights), l, list(l.trainable_weights))
              for l in layers]
    resolved = _resolve_stages(stages, groups)
    for i, layer in enumerate(layers):
      trains = [not r.frozen_layers[i] for r in resolved]
      # A layer that never trains is not trainable: Keras then keeps it (and
      # its BatchNorm) in inference mode and drops its update ops.
      layer.trainable = any(trains)
      if hasattr(layer, "_get_training_value"):
        _pin_training_mode(layer, _mode(trains, stage_index, training))
    any_trains = [not all(r.frozen_layers) for r in resolved]
    features = model(x, training=_mode(any_trains, stage_index, training))
    features = _pool(features)
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
    return BackboneOutput(features, groups, _stage_variables(stages, resolved, groups),
                          _union_trainable(resolved, groups), updates, losses, init_fn)

  def _instantiate_hub_tf2(self, x, stages, stage_index, training):
    import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
    layer = hub.KerasLayer(self.hub_path, trainable=True)
    trainable_ids = {id(v) for v in layer.trainable_weights}
    groups = _group_variables(layer.weights)
    for g in groups:
      g.trainable_variables = [v for v in g.variables if id(v) in trainable_ids]
    resolved = _resolve_stages(stages, groups)
    layer.trainable = any(not all(r.frozen_layers) for r in resolved)
    # A TF2 module has one BatchNorm mode for all its layers: it runs in
    # training mode only when no part of it is frozen (in the current stage),
    # so frozen parts never see their moving statistics change.
    module_trains = [not any(r.frozen_layers) for r in resolved]
    features = layer(x, training=_mode(module_trains, stage_index, training))
    features = _pool(features)
    # The module's regularization losses count only while it trains at all
    # (hub.KerasLayer returns 0 for them when not trainable).
    losses = list(layer.losses) if training and layer.trainable else []
    updates = list(layer.updates) if training else []
    return BackboneOutput(features, groups, _stage_variables(stages, resolved, groups),
                          _union_trainable(resolved, groups), updates, losses)

  def _instantiate_hub_tf1(self, x, stages, stage_index, training):
    import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
    del stage_index  # one graph variant for the whole run, see below
    probe = [LayerGroup(name, [], None, list(names)) for name, names in self.hub_groups]
    probe_resolved = _resolve_stages(stages, probe)
    any_trainable = any(not all(r.frozen_layers) for r in probe_resolved)
    # The graph variant is picked once, when the module is applied: the
    # "train" variant (BatchNorm on batch statistics, dropout) only when every
    # stage trains the whole module; with anything frozen, the inference
    # variant keeps frozen BatchNorm layers on their moving statistics.
    full_train = all(not any(r.frozen_layers) for r in probe_resolved)
    tags = {"train"} if training and full_train and self.hub_train_tag else None
    graph = tf.compat.v1.get_default_graph()
    before_updates = set(graph.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS))
    before_losses = set(graph.get_collection(tf.compat.v1.GraphKeys.REGULARIZATION_LOSSES))
    before_trainable = {id(v) for v in tf.compat.v1.trainable_variables()}
    module = hub.Module(hub.load_module_spec(self.hub_path), trainable=any_trainable,
                        tags=tags, name="hub_module")
    features = _pool(module(x))
    trainable_ids = {id(v) for v in tf.compat.v1.trainable_variables()} - before_trainable
    by_name = {}
    for name, var in module.variable_map.items():
      by_name[name] = list(var) if isinstance(var, (list, tuple)) else [var]
    groups = []
    for g in probe:
      variables = [v for name in _names_in_group(g.name, by_name) for v in by_name[name]]
      trainable = [v for name in g.trainable_variables for v in by_name.get(name, [])]
      groups.append(LayerGroup(g.name, variables, None, trainable))
    if not any_trainable:
      trainable_ids = set()
    for g in groups:
      g.trainable_variables = [v for v in g.trainable_variables if id(v) in trainable_ids]
    updates = [op for op in graph.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
               if op not in before_updates] if training else []
    losses = [l for l in graph.get_collection(tf.compat.v1.GraphKeys.REGULARIZATION_LOSSES)
              if l not in before_losses] if training and any_trainable else []
    return BackboneOutput(features, groups,
                          _stage_variables(stages, probe_resolved, groups),
                          _union_trainable(probe_resolved, groups), updates, losses)


def _names_in_group(group: str, by_name: dict) -> List[str]:
  return [n for n in by_name if (n.rsplit("/", 1)[0] if "/" in n else n) == group]


def _resolve_stages(stages, groups: List[LayerGroup]) -> List[freezing.Resolution]:
  """Applies every stage's spec to the groups (by their own names)."""
  names = [(g.name, [_var_name(v) if not isinstance(v, str) else v
                     for v in g.trainable_variables or []]) for g in groups]
  return [freezing.resolve(stage.spec, names) for stage in stages]


def _stage_variables(stages, resolved, groups) -> List[StageVariables]:
  out = []
  for stage, r in zip(stages, resolved):
    variables = [v for g, flags in zip(groups, r.frozen_variables)
                 for v, frozen in zip(g.trainable_variables or [], flags) if not frozen]
    out.append(StageVariables(int(stage.start), str(stage.spec), list(r.frozen_layers),
                              variables))
  return out


def _union_trainable(resolved, groups) -> list:
  """Variables trained in at least one stage, in group order."""
  out = []
  for i, g in enumerate(groups):
    for j, v in enumerate(g.trainable_variables or []):
      if any(not r.frozen_variables[i][j] for r in resolved):
        out.append(v)
  return out


def _mode(trains_per_stage: Sequence[bool], stage_index, training: bool):
  """Training mode of a part: a Python bool, or a tensor when stages differ."""
  if not training or not any(trains_per_stage):
    return False
  if all(trains_per_stage) or stage_index is None:
    return bool(trains_per_stage[0]) if stage_index is None else True
  return tf.gather(tf.constant(list(trains_per_stage)), stage_index)


@contextlib.contextmanager
def _dtype_policy(policy: str):
  """Keras' global dtype policy set to `policy` while the backbone is built.

  Layers take the policy when they are constructed; it is restored at once,
  so the head (and anything else) stays float32. A model rebuilt from a
  config carries a `dtype` per layer, which `_keras_config_with_policy`
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


def _keras_config_with_policy(model_config: dict, policy: str) -> dict:
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
      layer["config"] = _keras_config_with_policy(inner, policy)
    elif "dtype" in inner:
      inner["dtype"] = policy
  return config


def _pin_training_mode(layer, mode) -> None:
  """Makes a BatchNorm-like layer use `mode` whatever its caller passes.

  Keras BatchNormalization asks `_get_training_value` for its mode; pinning it
  per layer lets frozen layers run in inference mode next to trained ones in
  one model call, in both v1 and v2 Keras classes, with a Python bool or a
  per-stage tensor (then the layer's updates are conditional too).
  """
  object.__setattr__(layer, "_get_training_value", lambda training=None: mode)


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


def _hub_tf1_groups(spec) -> List[Tuple[str, List[str]]]:
  """Groups of a TF1 Hub module, in creation order, with trainable variable names.

  Applying the module once in a throwaway graph gives the names (as in its
  variable_map) before the real module is built, so the graph variant
  (train tag or not) can be chosen from the freeze plan. The graph's variable
  collection keeps the module's creation order, which is its forward order
  for first:N / last:N / until:.
  """
  import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
  with tf.Graph().as_default():
    module = hub.Module(spec, trainable=True)
    trainable = {id(v) for v in tf.compat.v1.trainable_variables()}
    order = {id(v): i for i, v in enumerate(tf.compat.v1.global_variables())}
    names = []
    for name, var in module.variable_map.items():
      variables = list(var) if isinstance(var, (list, tuple)) else [var]
      names.append((min(order.get(id(v), len(order)) for v in variables), name,
                    any(id(v) in trainable for v in variables)))
  groups, index = [], {}
  for _, name, is_trainable in sorted(names):
    prefix = name.rsplit("/", 1)[0] if "/" in name else name
    if prefix not in index:
      index[prefix] = len(groups)
      groups.append((prefix, []))
    if is_trainable:
      groups[index[prefix]][1].append(name)
  return groups


def _assign_init_fn(variables, values, description):
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
  if handle == "identity":
    # For numeric features (CSV, arrays): the head is the whole model.
    return ResolvedBackbone("identity", "no backbone (identity)", config.image_size or 0,
                            "zero_one")
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


def _value_range(config: BackboneConfig, native: str) -> str:
  """The configured value range, or the backbone's own."""
  return config.value_range or native


def _resolve_application(name: str, args: str, config: BackboneConfig) -> ResolvedBackbone:
  ctor_name, value_range, default_size = KERAS_APPLICATIONS[name]
  kwargs = _parse_kwargs(args, config.handle)
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
    weights = _load_keras_weights(build, config.weights, config.handle)
  return ResolvedBackbone("keras", f"keras application {config.handle}", size,
                          _value_range(config, value_range), build_keras=build,
                          keras_weights=weights)


def _load_keras_weights(build, path: str, handle: str) -> List[np.ndarray]:
  """Reads a weights file into arrays, in the order of `build().weights`."""
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
  import h5py  # pylint: disable=g-import-not-at-top
  if not h5py.is_hdf5(path):
    return []
  with h5py.File(path, "r") as f:
    group = f["model_weights"] if "model_weights" in f else f
    names = {n.decode() if isinstance(n, bytes) else n
             for n in group.attrs.get("layer_names", [])}
  return [l.name for l in model.layers if l.weights and l.name not in names]


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

  # Rebuild only what is left after the cut: the layers past it would be
  # unused variables in every graph and checkpoint.
  cut_model = cut(full)
  model_config = cut_model.get_config()
  model_class = type(cut_model)

  def build():
    cls = tf.keras.Sequential if model_class is tf.keras.Sequential else tf.keras.Model
    policy = tf.keras.mixed_precision.global_policy().name
    # The saved config pins every layer's dtype (float32): a mixed policy
    # (`_dtype_policy`) must be written into it.
    return cls.from_config(model_config if policy == "float32" else
                           _keras_config_with_policy(model_config, policy))

  # Only an image input (rank 4) declares a size; vector inputs take numeric features.
  image_input = isinstance(full.input_shape, tuple) and len(full.input_shape) == 4
  native = full.input_shape[1] if image_input else None
  description = f"Keras model {path}"
  if image_input or config.image_size:
    size = _resolve_size(config, native, fixed=native is not None, description=description)
  else:
    size = 0  # numeric features: no image size
  if config.weights and config.weights.lower() == "none":
    weights = None
  elif config.weights:
    weights = _load_keras_weights(build, config.weights, config.handle)
  else:
    weights = [np.asarray(w) for w in cut_model.get_weights()]
  return ResolvedBackbone("keras", description, size, _value_range(config, "zero_one"),
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
    raise ConfigError(
        f"could not fetch Hub module {handle} ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:120] if str(e) else 'no details'}); without "
        f"network, pre-seed the cache: unpack the module into "
        f"{hub_cache_path(handle)} (TFHUB_CACHE_DIR/sha1 of the handle), or run "
        f"python -c 'import tensorflow_hub as h; h.resolve(\"{handle}\")' with the "
        "same TFHUB_CACHE_DIR on a connected machine and copy the directory "
        "over, or pass a local module directory.") from e
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
  groups, train_tag = None, False
  if kind == "hub_tf1":
    spec = hub.load_module_spec(path)
    groups = _hub_tf1_groups(spec)
    train_tag = any(set(tags) == {"train"} for tags in spec.get_tags())
  # Hub image modules take RGB in [0, 1] by convention.
  return ResolvedBackbone(kind, description, size, _value_range(config, "zero_one"),
                          hub_path=path, hub_groups=groups, fixed_size=fixed,
                          hub_train_tag=train_tag)


def hub_cache_path(handle: str) -> str:
  """Where tensorflow_hub caches (and looks for) a remote handle's module."""
  import hashlib  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("TFHUB_CACHE_DIR") or os.path.join(
      tempfile.gettempdir(), "tfhub_modules")
  return os.path.join(cache, hashlib.sha1(handle.encode("utf8")).hexdigest())


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
    pass
  # Not the image-module convention (input "images"): a single 4D input.
  inputs = list(spec.get_input_info_dict().values())
  if len(inputs) == 1 and inputs[0].get_shape().rank == 4:
    height = inputs[0].get_shape()[1]
    if height:
      return int(height), True
  return None, False
