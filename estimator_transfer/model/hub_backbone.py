"""TF-Hub backbones: TF2 SavedModels (hub.KerasLayer) and TF1 Hub modules (hub.Module).

Resolution fetches a remote handle into `TFHUB_CACHE_DIR` (or finds it
there), detects the format from the files and reads the input size the
module declares. Hub image modules take RGB in [0, 1] by convention.

Training mode for frozen parts:
  TF2 Hub   one mode for the whole module: training mode only while no part
            of it is frozen (in the current stage); otherwise inference mode,
            so no statistic of the module moves.
  TF1 Hub   one graph variant, picked once: the `train` tag only when every
            stage trains the whole module (then its UPDATE_OPS run); with
            anything frozen the inference variant runs throughout.

`hub.KerasLayer` ignores graph collections: its variables are not in
TRAINABLE_VARIABLES (the train op gets an explicit var_list from the groups
built here) and its losses and updates are collected from the layer.

tensorflow_hub is imported only when a Hub backbone is used (`_hub`): the
import costs about 2 s of start-up that runs with a Keras backbone never need.
"""
import dataclasses
import hashlib
import os
import tempfile
from typing import List, Optional, Tuple

import tensorflow as tf
# The SavedModel proto and its signature decoder (TensorFlow is pinned at 2.15):
# reading a module's input size from saved_model.pb instead of loading it.
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.saved_model import nested_structure_coder

from estimator_transfer.config import BackboneConfig
from estimator_transfer.errors import ConfigError
from estimator_transfer.model import backbone_types
from estimator_transfer.model import freezing

_REMOTE_PREFIXES = ("http://", "https://", "gs://")


def _hub():
  """The tensorflow_hub module, imported on first use (heavy; see the module doc)."""
  import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
  return hub


@dataclasses.dataclass
class HubTF2Backbone(backbone_types.ResolvedBackbone):
  """A TF2 SavedModel, applied with hub.KerasLayer."""
  hub_path: str = ""

  def _build(self, x, stages, stage_index, training, policy):
    hub = _hub()
    layer = hub.KerasLayer(self.hub_path, trainable=True)
    # Keras would autograph-convert the layer's call in every graph (a quarter
    # of a second each); it has no tensor-dependent Python control flow (its
    # training switch is smart_cond).
    layer.call = tf.autograph.experimental.do_not_convert(layer.call)
    trainable_ids = {id(v) for v in layer.trainable_weights}
    groups = _group_variables(layer.weights)
    for g in groups:
      g.trainable_variables = [v for v in g.variables if id(v) in trainable_ids]
    resolved = freezing.resolve_stages(stages, groups)
    layer.trainable = any(not all(r.frozen_layers) for r in resolved)
    # A TF2 module has one BatchNorm mode for all its layers: it runs in
    # training mode only when no part of it is frozen (in the current stage),
    # so frozen parts never see their moving statistics change.
    module_trains = [not any(r.frozen_layers) for r in resolved]
    features = layer(x, training=backbone_types.training_mode(module_trains, stage_index,
                                                               training))
    features = backbone_types.pool_features(features)
    # The module's regularization losses count only while it trains at all
    # (hub.KerasLayer returns 0 for them when not trainable).
    losses = list(layer.losses) if training and layer.trainable else []
    updates = list(layer.updates) if training else []
    return backbone_types.BackboneOutput(
        features, groups, freezing.stage_variables(stages, resolved, groups),
        freezing.union_trainable(resolved, groups), updates, losses)


@dataclasses.dataclass
class HubTF1Backbone(backbone_types.ResolvedBackbone):
  """A TF1 Hub module, applied with hub.Module."""
  hub_path: str = ""
  hub_groups: Optional[list] = None  # [(group, [trainable var names])]
  hub_train_tag: bool = False  # the module has a {"train"} graph variant

  def _build(self, x, stages, stage_index, training, policy):
    hub = _hub()
    del stage_index  # one graph variant for the whole run, see below
    probe = [freezing.LayerGroup(name, [], None, list(names))
             for name, names in self.hub_groups]
    probe_resolved = freezing.resolve_stages(stages, probe)
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
    features = backbone_types.pool_features(module(x))
    trainable_ids = {id(v) for v in tf.compat.v1.trainable_variables()} - before_trainable
    if not any_trainable:
      trainable_ids = set()
    groups = _module_groups(module, probe, trainable_ids)
    updates = [op for op in graph.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
               if op not in before_updates] if training else []
    losses = [l for l in graph.get_collection(tf.compat.v1.GraphKeys.REGULARIZATION_LOSSES)
              if l not in before_losses] if training and any_trainable else []
    return backbone_types.BackboneOutput(
        features, groups, freezing.stage_variables(stages, probe_resolved, groups),
        freezing.union_trainable(probe_resolved, groups), updates, losses)


def _module_groups(module, probe, trainable_ids) -> List[freezing.LayerGroup]:
  """The probe's groups filled with the built module's variable objects."""
  by_name = {}
  for name, var in module.variable_map.items():
    by_name[name] = list(var) if isinstance(var, (list, tuple)) else [var]
  groups = []
  for g in probe:
    variables = [v for name in _names_in_group(g.name, by_name) for v in by_name[name]]
    trainable = [v for name in g.trainable_variables for v in by_name.get(name, [])
                 if id(v) in trainable_ids]
    groups.append(freezing.LayerGroup(g.name, variables, None, trainable))
  return groups


def _names_in_group(group: str, by_name: dict) -> List[str]:
  return [n for n in by_name if (n.rsplit("/", 1)[0] if "/" in n else n) == group]


def _group_variables(variables) -> List[freezing.LayerGroup]:
  """Groups variables by their name prefix (the layer), in first-seen order."""
  groups, index = [], {}
  for var in variables:
    name = freezing.var_name(var)
    prefix = name.rsplit("/", 1)[0] if "/" in name else name
    if prefix not in index:
      index[prefix] = len(groups)
      groups.append(freezing.LayerGroup(prefix, []))
    groups[index[prefix]].variables.append(var)
  return groups


# ----------------------------------------------------------------------------
# Resolution (eager, once per process)
# ----------------------------------------------------------------------------


def is_remote(handle: str) -> bool:
  """Whether `handle` is a URL that tensorflow_hub fetches (and caches)."""
  return handle.startswith(_REMOTE_PREFIXES)


def resolve_hub(handle: str, config: BackboneConfig) -> backbone_types.ResolvedBackbone:
  """A Hub handle (URL or local directory) as a TF2 or TF1 Hub backbone.

  Raises:
    ConfigError: Keras weights given, no such directory, the module cannot
      be fetched, or the directory holds no module.
  """
  hub = _hub()
  if config.weights and config.weights.lower() not in ("", "none"):
    raise ConfigError("--backbone_weights applies to Keras backbones only; a Hub "
                      "module carries its own weights.")
  if config.weights.lower() == "none":
    raise ConfigError("--backbone_weights=none is not available for Hub modules; "
                      "train from scratch with a Keras architecture instead.")
  if not is_remote(handle) and not os.path.isdir(handle):
    raise ConfigError(f"--backbone=hub:{handle}: no such module directory; give a "
                      "TF-Hub URL or a local SavedModel/Hub module directory.")
  path = _fetch(handle)
  description = f"Hub module {handle}"
  value_range = backbone_types.configured_value_range(config, "zero_one")
  if os.path.exists(os.path.join(path, "tfhub_module.pb")):
    native, fixed = _hub_tf1_size(path)
    size = backbone_types.resolve_size(config, native, fixed, description)
    spec = hub.load_module_spec(path)
    return HubTF1Backbone(
        "hub_tf1", description, size, value_range, fixed_size=fixed, hub_path=path,
        hub_groups=_hub_tf1_groups(spec),
        hub_train_tag=any(set(tags) == {"train"} for tags in spec.get_tags()))
  if os.path.exists(os.path.join(path, "saved_model.pb")):
    native, fixed = _hub_tf2_size(path)
    size = backbone_types.resolve_size(config, native, fixed, description)
    return HubTF2Backbone("hub_tf2", description, size, value_range, fixed_size=fixed,
                          hub_path=path)
  raise ConfigError(f"{path} holds neither saved_model.pb nor tfhub_module.pb; "
                    "point --backbone at a TF-Hub module directory.")


def _fetch(handle: str) -> str:
  """hub.resolve(handle): the local module directory (downloaded if remote)."""
  hub = _hub()
  try:
    return hub.resolve(handle)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
        f"could not fetch Hub module {handle} ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:120] if str(e) else 'no details'}); without "
        f"network, pre-seed the cache: unpack the module into "
        f"{hub_cache_path(handle)} (TFHUB_CACHE_DIR/sha1 of the handle), or run "
        f"python -c 'import tensorflow_hub as h; h.resolve(\"{handle}\")' with the "
        "same TFHUB_CACHE_DIR on a connected machine and copy the directory "
        "over, or pass a local module directory.") from e


def hub_cache_path(handle: str) -> str:
  """Where tensorflow_hub caches (and looks for) a remote handle's module."""
  cache = os.environ.get("TFHUB_CACHE_DIR") or os.path.join(
      tempfile.gettempdir(), "tfhub_modules")
  return os.path.join(cache, hashlib.sha1(handle.encode("utf8")).hexdigest())


def _hub_tf2_size(path: str) -> Tuple[Optional[int], bool]:
  """Reads the image size a TF2 SavedModel's __call__ declares, if static.

  Read from saved_model.pb's object graph (milliseconds); a layout that
  reading does not know is loaded instead (about half a second).
  """
  try:
    found = _declared_tf2_size(path)
  except Exception:  # pylint: disable=broad-except  # an unknown layout: load it
    found = None
  return found if found is not None else _loaded_tf2_size(path)


def _declared_tf2_size(path: str) -> Optional[Tuple[Optional[int], bool]]:
  """The size from the proto: __call__'s first 4-D argument, else a signature's."""
  proto = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  meta = proto.meta_graphs[0]
  objects = meta.object_graph_def
  call = [c.node_id for c in objects.nodes[0].children if c.local_name == "__call__"]
  if call:
    node = objects.nodes[call[0]]
    kind = node.WhichOneof("kind")
    names = (list(node.function.concrete_functions) if kind == "function" else
             [node.bare_concrete_function.concrete_function_name]
             if kind == "bare_concrete_function" else None)
    if names is None:
      return None
    for name in names:
      signature = nested_structure_coder.decode_proto(
          objects.concrete_functions[name].canonicalized_input_signature)
      args = signature[0] if signature else ()
      if args and isinstance(args[0], tf.TensorSpec) and args[0].shape.rank == 4:
        height = args[0].shape[1]
        return (int(height), True) if height else (None, False)
    if names:
      return None
  for sig in meta.signature_def.values():
    for tensor in sig.inputs.values():
      shape = tf.TensorShape(tensor.tensor_shape)
      if shape.rank == 4 and shape[1]:
        return int(shape[1]), True
  return None


def _loaded_tf2_size(path: str) -> Tuple[Optional[int], bool]:
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
  """Reads the image size a TF1 Hub module declares, if static."""
  hub = _hub()
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


def _hub_tf1_groups(spec) -> List[Tuple[str, List[str]]]:
  """Groups of a TF1 Hub module, in creation order, with trainable variable names.

  Applying the module once in a throwaway graph gives the names (as in its
  variable_map) before the real module is built, so the graph variant
  (train tag or not) can be chosen from the freeze plan. The graph's variable
  collection keeps the module's creation order, which is its forward order
  for first:N / last:N / until:.
  """
  hub = _hub()
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
