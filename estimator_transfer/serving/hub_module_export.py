"""A TF2 Hub backbone, fine-tuned, as a TF2 SavedModel that Keras 3 can train further.

In the Estimator's TF1 graph a TF2 SavedModel module is one
StatefulPartitionedCall without a registered gradient, so the TF Serving
export of such a model cannot be trained downstream. Here the module is
loaded eagerly from its own directory, its variables are set to the
checkpoint's (fine-tuned) values, and it is saved again as a TF2 SavedModel
with two functions:

  serve(images)  float32 [n, size, size, 3] RGB in [0, 1] -> pooled features,
                 inference mode (the value-range mapping is inside);
  train(images)  the same in training mode (BatchNorm on batch statistics)
                 when the whole module was trained here, else inference mode
                 (a module with frozen parts never ran in training mode).

`keras.layers.TFSMLayer(dir, call_endpoint="serve",
call_training_endpoint="train", trainable=True)` then exposes the module's
trainable variables to `model.fit`, with gradients (TF2 eager functions have
them).
"""
import inspect
import os
from typing import Dict

import numpy as np
import tensorflow as tf

from estimator_transfer.errors import ConfigError
from estimator_transfer.model import backbone_types

DIRNAME = "backbone"


def _base_name(name: str) -> str:
  name = name[:-2] if name.endswith(":0") else name
  return name


def _accepts_training(fn) -> bool:
  try:
    return "training" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


class _Backbone(tf.Module):
  """The module with the input mapping and pooling the model_fn applies."""

  def __init__(self, module, value_range: str, size: int, train_mode: bool):
    super().__init__(name="backbone")
    self.module = module
    self._value_range = value_range
    self._train_mode = train_mode
    spec = tf.TensorSpec([None, size, size, 3], tf.float32, name="images")
    self.serve = tf.function(lambda images: self._apply(images, False),
                             input_signature=[spec])
    self.train = tf.function(lambda images: self._apply(images, self._train_mode),
                             input_signature=[spec])

  def _apply(self, images, training: bool):
    x = backbone_types.to_value_range(images, self._value_range)
    call = self.module.__call__ if hasattr(self.module, "__call__") else self.module
    out = self.module(x, training=training) if _accepts_training(call) else self.module(x)
    if isinstance(out, dict):
      out = out.get("default", next(iter(out.values())))
    return tf.cast(backbone_types.pool_features(out), tf.float32)


def write_module(resolved, values: Dict[str, np.ndarray], out_dir: str,
                 check_images: np.ndarray, train_mode: bool) -> np.ndarray:
  """Saves the module with `values` (graph variable name -> array) into `out_dir`.

  Args:
    resolved: the HubTF2Backbone.
    values: the checkpoint's values of the module's variables.
    out_dir: the SavedModel directory to write.
    check_images: a test batch; its features are returned.
    train_mode: whether the module ran in training mode here (nothing of it
      frozen); its `train` function then does too.

  Returns:
    The saved module's `serve` features of `check_images`, read back from disk.

  Raises:
    ConfigError: the checkpoint's values do not cover the module's variables.
  """
  module = tf.saved_model.load(resolved.hub_path)
  by_name = {_base_name(k): v for k, v in values.items()}
  missing = []
  for var in module.variables:
    name = _base_name(var.name)
    if name not in by_name or tuple(by_name[name].shape) != tuple(var.shape):
      missing.append(name)
      continue
    var.assign(by_name[name])
  if missing:
    raise ConfigError(f"the checkpoint has no values for module variables "
                      f"{', '.join(missing[:3])}; export with the backbone the model was "
                      "trained with.")
  # Training mode downstream only where it ran here: a module with a frozen
  # part kept BatchNorm in inference mode throughout (hub_backbone.py).
  wrapper = _Backbone(module, resolved.value_range, resolved.image_size, train_mode)
  tf.saved_model.save(wrapper, out_dir)
  reloaded = tf.saved_model.load(out_dir)
  return reloaded.serve(tf.constant(check_images)).numpy()

