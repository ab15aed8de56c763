"""A Keras backbone split at the top of its frozen part (the partial feature cache).

With `--cache_features` and a partial freeze (`--freeze=last:N`, `until:LAYER`,
or an unfreeze schedule whose lower part stays frozen in every stage), the
layers below the cut never change, so their output is computed once into the
feature cache and training runs only the layers above it:

* The cut is a top-level layer of the functional model through whose output
  everything flows (no skip connection crosses it), at or below the first
  layer any stage trains. When the frozen part ends inside a block whose skip
  connection crosses it, the cut moves down to the block's input and the
  frozen layers above it run, frozen, in every step (logged once).
* The top is rebuilt from the model's own config, cut at that layer, so its
  layers and variables carry the names they have in the full network: the
  training checkpoint holds exactly the full model's top and head variables,
  and the export composes it with the snapshot of the frozen part (see
  feature_cache/cache.py) into an ordinary full checkpoint that takes images.
* The freeze plan is resolved on the whole backbone (`last:N` counts from
  its end, `first:N` and `until:` from its start) and then applied to the top's
  layers by name; BatchNorm in the trainable top runs in training mode and
  updates its statistics, frozen layers in the top run in inference mode.

Refused, each with one sentence: a TF-Hub module (one opaque call; TF1
modules are one graph), a Keras model that is neither functional nor
Sequential, a model with shared layers, a plan that trains the backbone's
first layer (nothing frozen to cache), and a model without any cut below the
first trained layer. Stochastic layers in the frozen part (Dropout) are cached
in inference mode, as the export runs them.
"""
import copy
import dataclasses
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from estimator_transfer import specs
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.errors import ConfigError
from estimator_transfer.model import backbone_types
from estimator_transfer.model import freezing
from estimator_transfer.model import keras_backbone

log = logging.getLogger("estimator_transfer")

_LAYOUT_ATTRIBUTE = "_split_layout"  # memoized on the resolved backbone


@dataclasses.dataclass(frozen=True)
class Layout:
  """A Keras backbone's layer graph, read once from a build in a scratch graph."""
  model_config: dict
  sequential: bool
  nodes: Tuple[str, ...]  # top-level layers in topological order
  inbound: Dict[str, Tuple[str, ...]]
  shapes: Dict[str, Tuple[int, ...]]  # output shape per node, without the batch
  groups: Tuple[Tuple[str, Tuple[str, ...]], ...]  # weighted layers: (name, trainable vars)
  node_of: Dict[str, str]  # weighted (flattened) layer -> its top-level node
  weight_names: Tuple[str, ...]  # model.weights by name, in order (keras_weights)
  weights_of: Dict[str, Tuple[str, ...]]  # node -> names of its weights
  weight_index: Dict[str, Tuple[int, ...]]  # flat layer -> its weights' places in weight_names


@dataclasses.dataclass(frozen=True)
class Split:
  """Where a backbone is cut: features of `cut` are cached, the rest trains."""
  cut: str  # the top-level layer whose output is cached
  index: int  # its position in the topological order
  shape: Tuple[int, ...]  # cached features per example
  top_nodes: Tuple[str, ...]
  frozen_in_top: Tuple[str, ...]  # weighted layers above the cut that never train
  bottom_weights: Tuple[str, ...]  # variables of the frozen part, by name

  @property
  def feature_dim(self) -> int:
    size = 1
    for d in self.shape:
      size *= int(d)
    return size

  def describe(self) -> str:
    text = f"output of {self.cut} (layer {self.index}), {list(self.shape)} per example"
    if self.frozen_in_top:
      text += f"; {len(self.frozen_in_top)} frozen layers above it run in every step"
    return text


def plan_stages(config: ExperimentConfig) -> List[specs.Stage]:
  """The freeze plan's stages (steps in order; only their specs matter here)."""
  f = config.freeze
  plan = specs.parse_schedule(f.unfreeze_schedule, f.spec)
  return [specs.Stage(i, stage.spec) for i, stage in enumerate(plan)]


def is_partial(config: ExperimentConfig) -> bool:
  """Whether --cache_features caches a partial backbone (some stage trains part of it)."""
  return bool(config.input.cache_features) and any(
      s.spec.kind != "all" for s in plan_stages(config))


def cut_point(config: ExperimentConfig,
              resolved: backbone_types.ResolvedBackbone) -> Optional[Split]:
  """The split of a partial-cache config; None when the whole backbone is frozen.

  Raises:
    ConfigError: the backbone cannot be split there (one sentence why).
  """
  if not is_partial(config):
    return None
  freeze = config.freeze.unfreeze_schedule or config.freeze.spec
  if not isinstance(resolved, keras_backbone.KerasBackbone):
    why = ("is one opaque call that cannot be cut between layers" if resolved.kind == "hub_tf2"
           else "is one graph that cannot be cut between layers" if resolved.kind == "hub_tf1"
           else "has no layers")
    raise ConfigError(f"--cache_features with --freeze={freeze} caches the frozen lower "
                      f"part of the backbone, but {resolved.description} {why}; use "
                      "--freeze=all with --cache_features, or drop --cache_features.")
  return _plan(layout_of(resolved), plan_stages(config), freeze, resolved.description)


def layout_of(resolved: keras_backbone.KerasBackbone) -> Layout:
  """The backbone's Layout, built once per resolved backbone.

  Raises:
    ConfigError: a model that is neither functional nor Sequential, or
      shares layers.
  """
  layout = getattr(resolved, _LAYOUT_ATTRIBUTE, None)
  if layout is None:
    with tf.Graph().as_default():
      model = keras_backbone.build_inference_copy(resolved.build_keras)
      layout = _read_layout(model, resolved.description)
    object.__setattr__(resolved, _LAYOUT_ATTRIBUTE, layout)
  return layout


def _read_layout(model, description: str) -> Layout:
  sequential = isinstance(model, tf.keras.Sequential)
  try:
    config = model.get_config() if sequential or getattr(model, "_is_graph_network",
                                                         False) else None
  except NotImplementedError:
    config = None
  if not isinstance(config, dict) or "layers" not in config:
    raise ConfigError(f"{description} is not a functional or Sequential Keras model, so "
                      "it cannot be split for --cache_features; use --freeze=all.")
  inbound, nodes = {}, []
  previous = None
  for entry in config["layers"]:
    name = entry["config"]["name"] if sequential else entry["name"]
    if sequential:
      inbound[name] = () if previous is None else (previous,)
    else:
      calls = entry.get("inbound_nodes") or []
      if len(calls) > 1:
        raise ConfigError(f"layer {name} of {description} is called more than once "
                          "(shared layers), so the model cannot be split for "
                          "--cache_features; use --freeze=all.")
      inbound[name] = tuple(ref[0] for call in calls for ref in _refs(call))
    nodes.append(name)
    previous = name
  layers = {l.name: l for l in model.layers}  # a Sequential lists no InputLayer
  shapes = {}
  node_of, weights_of, groups, weight_index = {}, {}, [], {}
  place = {id(w): i for i, w in enumerate(model.weights)}
  for name in nodes:
    layer = layers.get(name)
    if layer is None:
      continue
    shapes[name] = tuple(int(d) if d is not None else -1
                         for d in tf.TensorShape(layer.output.shape)[1:])
    weights_of[name] = tuple(freezing.var_name(w) for w in layer.weights)
    for flat in keras_backbone.flat_layers(layer) if _nested(layer) else [layer]:
      if flat.weights:
        weight_index[flat.name] = tuple(place[id(w)] for w in flat.weights)
        node_of[flat.name] = name
        groups.append((flat.name, tuple(freezing.var_name(v) for v in flat.trainable_weights)))
  return Layout(config, sequential, tuple(_topological(nodes, inbound)), inbound, shapes,
                tuple(groups), node_of, tuple(freezing.var_name(w) for w in model.weights),
                weights_of, weight_index)


def _refs(call) -> list:
  """The [layer, node, tensor, kwargs] references of one inbound call."""
  if isinstance(call, dict):  # newer Keras formats: {"args": [...]}
    raise ConfigError("this Keras model config format cannot be split for --cache_features; "
                      "use --freeze=all.")
  if call and isinstance(call[0], str):
    call = [call]
  return [ref for ref in call if isinstance(ref, (list, tuple)) and ref]


def _nested(layer) -> bool:
  return isinstance(layer, tf.keras.Model) or bool(getattr(layer, "layers", None))


def _topological(nodes: Sequence[str], inbound: Dict[str, Tuple[str, ...]]) -> List[str]:
  """`nodes` in an order where every layer follows its inputs (config order kept)."""
  done, order = set(), []
  pending = list(nodes)
  while pending:
    ready = [n for n in pending if all(i in done for i in inbound[n])]
    if not ready:
      raise ConfigError("the backbone's layer graph has a cycle or a missing layer; "
                        "use --freeze=all with --cache_features.")
    for n in ready:
      done.add(n)
      order.append(n)
    pending = [n for n in pending if n not in done]
  return order


def _plan(layout: Layout, stages: Sequence[specs.Stage], freeze: str,
          description: str) -> Split:
  """The highest cut below the first layer any stage trains."""
  groups = [freezing.LayerGroup(n, [], None, list(v)) for n, v in layout.groups]
  resolutions = freezing.resolve_stages(stages, groups)
  position = {n: i for i, n in enumerate(layout.nodes)}
  trained = [position[layout.node_of[n]] for i, (n, _) in enumerate(layout.groups)
             if any(not r.frozen_layers[i] for r in resolutions)]
  weighted = sorted({position[layout.node_of[n]] for n, _ in layout.groups})
  first = min(trained) if trained else len(layout.nodes)
  if not weighted or first <= weighted[0]:
    raise ConfigError(f"--freeze={freeze} trains the backbone's first layer with weights, "
                      "so no frozen part is left to cache; drop --cache_features or "
                      "freeze more (e.g. --freeze=last:N).")
  last_use = {n: position[n] for n in layout.nodes}
  for n in layout.nodes:
    for source in layout.inbound[n]:
      last_use[source] = max(last_use[source], position[n])
  cut = None
  for k in range(first - 1, weighted[0] - 1, -1):
    crossing = [n for n in layout.nodes[:k + 1] if last_use[n] > k]
    if crossing == [layout.nodes[k]] and layout.nodes[k] in layout.shapes:
      cut = k
      break
  if cut is None:
    raise ConfigError(f"--freeze={freeze}: every point between {description}'s frozen "
                      "layers and its first trained layer is crossed by a skip "
                      "connection, so it cannot be split for --cache_features; freeze "
                      "at a block boundary or use --freeze=all.")
  top = layout.nodes[cut + 1:]
  frozen_in_top = tuple(n for n, _ in layout.groups
                        if position[layout.node_of[n]] > cut and position[layout.node_of[n]] < first)
  if frozen_in_top:
    log.info("feature cache: the frozen part of the backbone ends inside a block whose "
             "skip connection crosses it; features are cached at %s and its %d frozen "
             "layers above that (%s ...) run, frozen, in every step.",
             layout.nodes[cut], len(frozen_in_top), frozen_in_top[0])
  bottom = tuple(w for n in layout.nodes[:cut + 1] for w in layout.weights_of.get(n, ()))
  return Split(layout.nodes[cut], cut, layout.shapes[layout.nodes[cut]], tuple(top),
               frozen_in_top, bottom)


# ----------------------------------------------------------------------------
# Building the two parts in a graph
# ----------------------------------------------------------------------------


def needs_layout(resolved: backbone_types.ResolvedBackbone) -> bool:
  """Whether `layout_of(resolved)` would build the model (not read yet)."""
  return (isinstance(resolved, keras_backbone.KerasBackbone) and
          getattr(resolved, _LAYOUT_ATTRIBUTE, None) is None)


def instantiate_bottom(resolved: keras_backbone.KerasBackbone,
                       cut: Union[Split, Callable[[], Split]], images,
                       policy: str = "float32") -> Tuple[tf.Tensor, Optional[Callable], Split]:
  """The frozen part on `images` (RGB in [0, 1]).

  The whole model is built (its variables are the snapshot's) and only the
  layers up to the cut run, in inference mode. The model built here also
  gives the backbone's Layout when it was not read yet, so that `cut` may be
  a function computing the split (one model build fewer for a new cache).

  Returns:
    (float32 features at the cut, the pretrained-weights init_fn or None,
    the split).
  """
  x = backbone_types.to_value_range(images, resolved.value_range)
  with keras_backbone.dtype_policy(policy):
    model = keras_backbone.build_inference_copy(resolved.build_keras)
    if getattr(resolved, _LAYOUT_ATTRIBUTE, None) is None and policy == "float32":
      object.__setattr__(resolved, _LAYOUT_ATTRIBUTE,
                         _read_layout(model, resolved.description))
    cut = cut() if callable(cut) else cut
    bottom = tf.keras.Model(model.inputs, model.get_layer(cut.cut).output)
    features = tf.cast(bottom(x, training=False), tf.float32)
  init_fn = None
  if resolved.keras_weights is not None:
    init_fn = keras_backbone.assign_init_fn(model.weights, resolved.keras_weights,
                                            resolved.description)
  return features, init_fn, cut


def _top_model(layout: Layout, split: Split, policy: str):
  """The layers above the cut, rebuilt from the model's config with their own names."""
  config = copy.deepcopy(layout.model_config)
  input_name = f"{split.cut}_cached_features"
  input_entry = {"class_name": "InputLayer",
                 "config": {"batch_input_shape": [None, *split.shape], "dtype": "float32",
                            "sparse": False, "ragged": False, "name": input_name}}
  kept = set(split.top_nodes)
  if layout.sequential:
    layers = [e for e in config["layers"] if e["config"]["name"] in kept]
    config["layers"] = [input_entry] + layers
    cls = tf.keras.Sequential
  else:
    input_entry.update(name=input_name, inbound_nodes=[])
    layers = [e for e in config["layers"] if e["name"] in kept]
    for entry in layers:
      entry["inbound_nodes"] = _renamed(entry.get("inbound_nodes") or [], split.cut,
                                        input_name)
    config["layers"] = [input_entry] + layers
    config["input_layers"] = [[input_name, 0, 0]]
    cls = tf.keras.Model
  if policy != "float32":
    config = keras_backbone.keras_config_with_policy(config, policy)
  return keras_backbone.build_inference_copy(lambda: cls.from_config(config))


def _renamed(value, old: str, new: str):
  """A copy of an inbound_nodes structure with references to layer `old` renamed."""
  if isinstance(value, list):
    if value and value[0] == old and len(value) >= 3 and isinstance(value[1], int):
      return [new] + list(value[1:])
    return [_renamed(v, old, new) for v in value]
  return value


def instantiate_top(resolved: keras_backbone.KerasBackbone, split: Split, features, plan,
                    training: bool, policy: str = "float32",
                    seed: Optional[int] = None) -> backbone_types.BackboneOutput:
  """The trainable top on cached `features` [batch, *split.shape]: a BackboneOutput.

  Only the top's variables are in the graph; the plan is resolved on the
  whole backbone and applied to the top's layers by name. Arguments as
  `ResolvedBackbone.instantiate`, with the cached features for the images.
  """
  layout = layout_of(resolved)
  stages = backbone_types.plan_stages(plan)
  stage_index = backbone_types.stage_index_op(stages)
  if seed is not None:
    backbone_types.seed_keras_initializers(seed)
  with keras_backbone.dtype_policy(policy):
    model = _top_model(layout, split, policy)
    model.trainable = True
    layers = [l for l in keras_backbone.flat_layers(model) if l.weights]
    groups = [freezing.LayerGroup(l.name, list(l.weights), l, list(l.trainable_weights))
              for l in layers]
    whole = freezing.resolve_stages(stages, [freezing.LayerGroup(n, [], None, list(v))
                                             for n, v in layout.groups])
    index = {n: i for i, (n, _) in enumerate(layout.groups)}
    resolutions = [freezing.Resolution([r.frozen_layers[index[l.name]] for l in layers],
                                       [r.frozen_variables[index[l.name]] for l in layers])
                   for r in whole]
    any_trains = keras_backbone.configure_layers(layers, resolutions, stage_index, training)
    out = model(features, training=backbone_types.training_mode(any_trains, stage_index,
                                                                 training))
  out = backbone_types.pool_features(tf.cast(out, tf.float32))
  updates = list(model.get_updates_for(features)) if training else []
  losses = (list(model.get_losses_for(None)) + list(model.get_losses_for(features))
            if training else [])
  init_fn = None
  if resolved.keras_weights is not None:
    # By layer name and place, not variable name: a graph that already used a
    # layer's name scope (e.g. the full model beside it) uniquifies the latter.
    variables = [w for l in layers for w in l.weights]
    values = [resolved.keras_weights[i] for l in layers for i in layout.weight_index[l.name]]
    init_fn = keras_backbone.assign_init_fn(variables, values, resolved.description)
  return backbone_types.BackboneOutput(
      out, groups, freezing.stage_variables(stages, resolutions, groups),
      freezing.union_trainable(resolutions, groups), updates, losses, init_fn,
      stage_index)
