"""A `.keras` file written by tf.keras 2.15 in a form Keras 3 loads too.

tf.keras 2.15 writes configs Keras 3 (TensorFlow 2.16+) refuses (checked
against Keras 3.15 and keras-team/keras issues 19089, 19151, 19441):

* models are named by the module path `keras.src.engine.functional`, which
  no longer exists in Keras 3 ("Could not deserialize class 'Functional'");
  `keras.Model` is exported under that name by both, and both build a
  functional model from its config;
* `DepthwiseConv2D` carries `groups: 1`, an argument Keras 3's layer does
  not take ("Unrecognized keyword arguments ... {'groups': 1}");
* `BatchNormalization` carries `axis: [3]`, where Keras 3 wants an int.

`make_portable` rewrites exactly these in the archive's config.json; the
weights file is left as it is (its layout is the same in both). Nested
models are not rewritten here: a nested functional model's call is node 1
in tf.keras and node 0 in Keras 3, so the exported model is built flat
(`keras_model.py`). `incompatible_layers` names layer classes only tf.keras
has (TFOpLambda, from raw TF ops in a functional model) before anything is
written.
"""
import json
import os
import zipfile
from typing import List

# Layer classes of tf.keras 2.15 with no Keras 3 counterpart.
_TF_KERAS_ONLY = ("TFOpLambda", "SlicingOpLambda", "Lambda")
_MODEL_MODULES = ("keras.src.engine.functional", "keras.src.engine.training",
                  "keras.engine.functional", "keras.engine.training")


def _rewrite(node) -> None:
  if isinstance(node, dict):
    if node.get("module") in _MODEL_MODULES and node.get("class_name") == "Functional":
      node.update(module="keras", class_name="Model", registered_name=None)
    inner = node.get("config") if isinstance(node.get("config"), dict) else None
    if inner is not None and node.get("class_name") == "DepthwiseConv2D":
      if inner.get("groups", 1) == 1:
        inner.pop("groups", None)
    if inner is not None and node.get("class_name") == "BatchNormalization":
      axis = inner.get("axis")
      if isinstance(axis, list) and len(axis) == 1:
        inner["axis"] = axis[0]
    for value in node.values():
      _rewrite(value)
  elif isinstance(node, list):
    for value in node:
      _rewrite(value)


def portable_config(config: dict) -> dict:
  """`config` (a model's serialized form) rewritten so both Keras versions load it."""
  config = json.loads(json.dumps(config))
  _rewrite(config)
  return config


def make_portable(path: str) -> None:
  """Rewrites the config.json of the `.keras` archive at `path` in place."""
  temp = path + ".portable"
  with zipfile.ZipFile(path) as source, zipfile.ZipFile(temp, "w") as target:
    for item in source.infolist():
      data = source.read(item.filename)
      if item.filename == "config.json":
        data = json.dumps(portable_config(json.loads(data))).encode("utf-8")
      target.writestr(item, data)
  os.replace(temp, path)


def incompatible_layers(model_config: dict) -> List[str]:
  """Names (class) of the layers in a model config that Keras 3 cannot rebuild."""
  out = []
  for layer in model_config.get("layers", []):
    if layer.get("class_name") in _TF_KERAS_ONLY:
      out.append(f"{layer.get('config', {}).get('name', '?')} ({layer['class_name']})")
  return out
