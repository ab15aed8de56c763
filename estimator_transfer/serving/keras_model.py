"""The exported Keras model: value range, backbone layers and head in one flat graph.

The model is the Estimator's PREDICT graph rebuilt from Keras layers only:

  image [n, size, size, 3] float RGB in [0, 1]
  -> value_range  the mapping `backbone_types.to_value_range` applies in the
                  model_fn (Rescaling for minus_one_one / zero_255; a fixed
                  1x1 convolution for caffe's BGR-minus-means and torch's
                  standardization; nothing for zero_one)
  -> the backbone's own layers, spliced in (not nested: see keras_compat)
  -> pool_features  global average pooling when the backbone returns a map
  -> head_dropout / head_hidden_i / head_logits, as in `heads.Head`
  -> probabilities (softmax, or sigmoid for multi-label) or, for regression,
     the linear outputs.

Weights are set afterwards by `set_trained_weights`; `trainable` flags by
`mark_trainable`.
"""
import copy
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from estimator_transfer.errors import ConfigError
from estimator_transfer.serving import keras_compat

INPUT_NAME = "image"
VALUE_RANGE_LAYER = "value_range"
POOL_LAYER = "pool_features"
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_NESTED = ("Functional", "Model", "Sequential")


def value_range_weights(value_range: str) -> Optional[List[np.ndarray]]:
  """Kernel and bias of the 1x1 convolution that maps [0, 1] RGB to `value_range`.

  caffe: out[c] = 255 * rgb[2 - c] - mean_bgr[c] (BGR, ImageNet means);
  torch: out[c] = rgb[c] / std[c] - mean[c] / std[c]. None for the ranges a
  Rescaling layer expresses.
  """
  kernel = np.zeros((1, 1, 3, 3), np.float32)
  if value_range == "caffe":
    for c in range(3):
      kernel[0, 0, 2 - c, c] = 255.0
    return [kernel, -np.asarray(_CAFFE_MEAN_BGR, np.float32)]
  if value_range == "torch":
    std, mean = np.asarray(_TORCH_STD, np.float32), np.asarray(_TORCH_MEAN, np.float32)
    for c in range(3):
      kernel[0, 0, c, c] = 1.0 / std[c]
    return [kernel, -mean / std]
  return None


def _value_range_layer(value_range: str):
  if value_range == "zero_one":
    return None
  if value_range == "minus_one_one":
    return tf.keras.layers.Rescaling(2.0, offset=-1.0, name=VALUE_RANGE_LAYER)
  if value_range == "zero_255":
    return tf.keras.layers.Rescaling(255.0, name=VALUE_RANGE_LAYER)
  if value_range in ("caffe", "torch"):
    return tf.keras.layers.Conv2D(3, 1, name=VALUE_RANGE_LAYER, trainable=False)
  raise ConfigError(f"value range {value_range!r} has no Keras export; use one of "
                    "zero_one, minus_one_one, zero_255, caffe, torch.")


def _layer_entries(backbone: tf.keras.Model) -> tuple:
  """(layer entries with inbound nodes, input layer name, output refs) of a backbone."""
  config = copy.deepcopy(backbone.get_config())
  nested = [l["config"].get("name", "?") for l in config.get("layers", [])
            if l.get("class_name") in _NESTED]
  if nested:
    raise ConfigError(f"the backbone holds nested models ({', '.join(nested[:3])}), "
                      "which the Keras export cannot write loadable in both Keras 2 and "
                      "3; save the backbone as one flat functional model.")
  bad = keras_compat.incompatible_layers(config)
  if bad:
    raise ConfigError(f"backbone layers {', '.join(bad[:3])} exist only in tf.keras 2 "
                      "(raw TensorFlow ops or Lambda layers), so Keras 3 could not load "
                      "the export; use a backbone built from Keras layers only.")
  if "input_layers" in config:  # functional
    if len(config["input_layers"]) != 1:
      raise ConfigError("the Keras export needs a backbone with one image input.")
    return config["layers"], config["input_layers"][0][0], config["output_layers"]
  # Sequential: chain the layers, each fed by the one before.
  entries, previous = [], None
  for layer in config["layers"]:
    name = layer["config"]["name"]
    if layer["class_name"] == "InputLayer":
      previous = name
    layer = dict(layer, name=name,
                 inbound_nodes=[] if previous in (None, name) else [[[previous, 0, 0, {}]]])
    entries.append(layer)
    previous = name
  first = entries[0]["name"] if entries[0]["class_name"] == "InputLayer" else None
  if first is None:
    first = "sequential_input"
    entries[0]["inbound_nodes"] = [[[first, 0, 0, {}]]]
    entries.insert(0, {"class_name": "InputLayer", "name": first, "inbound_nodes": [],
                       "config": {"name": first}})
  return entries, first, [[entries[-1]["name"], 0, 0]]


def _replace_refs(nodes, old: str, new: str):
  if isinstance(nodes, list):
    if len(nodes) == 4 and nodes[0] == old and isinstance(nodes[1], int):
      return [new, 0, nodes[2], nodes[3]]
    return [_replace_refs(n, old, new) for n in nodes]
  return nodes


def build_model(backbone: tf.keras.Model, image_size: int, value_range: str,
                hidden_units: Sequence[int], num_outputs: int, dropout_rate: float,
                output: str) -> tf.keras.Model:
  """The flat export model (weights still at their initial values).

  Args:
    backbone: the backbone built eagerly from its resolved constructor.
    image_size: the input size.
    value_range: the backbone's input range (`specs.VALUE_RANGES`).
    hidden_units, num_outputs, dropout_rate: the head's shape.
    output: softmax | sigmoid | linear.

  Raises:
    ConfigError: the backbone cannot be written loadable in Keras 3.
  """
  layers, input_name, outputs = _layer_entries(backbone)
  entries = [{"class_name": "InputLayer", "name": INPUT_NAME, "inbound_nodes": [],
              "config": {"batch_input_shape": [None, image_size, image_size, 3],
                         "dtype": "float32", "name": INPUT_NAME}}]
  feed = INPUT_NAME
  mapping = _value_range_layer(value_range)
  if mapping is not None:
    entries.append(dict(tf.keras.layers.serialize(mapping), name=VALUE_RANGE_LAYER,
                        inbound_nodes=[[[INPUT_NAME, 0, 0, {}]]]))
    feed = VALUE_RANGE_LAYER
  taken = {e["name"] for e in layers}
  clash = taken & {INPUT_NAME, VALUE_RANGE_LAYER, POOL_LAYER, "probabilities", "outputs"}
  if clash:
    raise ConfigError(f"backbone layer names {sorted(clash)} are reserved by the Keras "
                      "export; rename those layers in the backbone model.")
  for layer in layers:
    if layer["name"] == input_name:
      continue
    entries.append(dict(layer, inbound_nodes=_replace_refs(layer["inbound_nodes"],
                                                             input_name, feed)))
  body = tf.keras.Model.from_config({"name": "et_model", "layers": entries,
                                     "input_layers": [[INPUT_NAME, 0, 0]],
                                     "output_layers": outputs})
  x = body.output
  if x.shape.rank == 4:
    x = tf.keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
  dropout = tf.keras.layers.Dropout(dropout_rate, name="head_dropout") if dropout_rate \
      else None
  for i, units in enumerate(list(hidden_units) + [num_outputs]):
    if dropout is not None:
      x = dropout(x)
    last = i == len(hidden_units)
    x = tf.keras.layers.Dense(units, activation=None if last else "relu",
                              name="head_logits" if last else f"head_hidden_{i}")(x)
  if output == "softmax":
    x = tf.keras.layers.Softmax(name="probabilities")(x)
  elif output == "sigmoid":
    x = tf.keras.layers.Activation("sigmoid", name="probabilities")(x)
  else:
    x = tf.keras.layers.Activation("linear", name="outputs")(x)
  return tf.keras.Model(body.input, x, name="et_model")


def weighted_layer_names(backbone: tf.keras.Model) -> List[str]:
  """The backbone's layers with weights, in the order the freeze groups use."""
  return [l.name for l in backbone.layers if l.weights]


def set_trained_weights(model: tf.keras.Model, values: Dict[str, List[np.ndarray]],
                        value_range: str) -> None:
  """Assigns the trained values (layer name -> arrays) and the value-range constants.

  Raises:
    ConfigError: a layer's arrays do not fit (a different architecture).
  """
  fixed = value_range_weights(value_range)
  if fixed is not None:
    model.get_layer(VALUE_RANGE_LAYER).set_weights(fixed)
  for name, arrays in values.items():
    layer = model.get_layer(name)
    shapes = [tuple(w.shape) for w in layer.weights]
    if shapes != [tuple(a.shape) for a in arrays]:
      raise ConfigError(f"the checkpoint's values for layer {name} have shapes "
                        f"{[a.shape for a in arrays]} but the rebuilt layer wants {shapes}; "
                        "export with the config the model was trained with.")
    layer.set_weights(arrays)


def mark_trainable(model: tf.keras.Model, frozen: Sequence[str]) -> None:
  """Frozen layers (and the fixed value-range mapping) become non-trainable.

  Keras (2 and 3) runs a non-trainable BatchNormalization in inference mode
  and never updates its moving statistics, as the Estimator did for frozen
  layers.
  """
  frozen = set(frozen) | {VALUE_RANGE_LAYER}
  for layer in model.layers:
    layer.trainable = layer.name not in frozen
