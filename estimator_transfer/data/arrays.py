"""An input_fn over in-memory arrays: images or numeric feature vectors.

Images yield ({"image": float32 [batch, size, size, 3] in [0, 1]}, int32
labels) like the file pipeline (`pipeline.py`), with the same augmentation
and mixup when training; numeric arrays yield ({"features": float32
[batch, d]}, int32 labels), like CSV files.
"""
from typing import Optional

import numpy as np
import tensorflow as tf

from estimator_transfer.config import InputConfig
from estimator_transfer.data import augment as augment_lib
from estimator_transfer.data import pipeline
from estimator_transfer.errors import ConfigError


def _checked_arrays(features, labels, num_classes: int):
  """(features, labels) as numpy arrays, checked.

  Raises:
    ConfigError: shapes, value ranges or labels do not fit, naming the index.
  """
  features = np.asarray(features)
  labels = np.asarray(labels)
  if features.ndim not in (2, 4) or len(features) != len(labels):
    raise ConfigError(f"in-memory data must be images [n, h, w, 3] or vectors "
                      f"[n, d] with one label each; got features {features.shape} "
                      f"and labels {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ConfigError(f"in-memory labels must be integer class ids, got {labels.dtype}.")
  bad = np.nonzero((labels < 0) | ((labels >= num_classes) if num_classes else False))[0]
  if len(bad):
    raise ConfigError(f"labels[{bad[0]}] = {labels[bad[0]]} is outside "
                      f"[0, {num_classes}); fix the labels or --num_classes.")
  if features.ndim == 4 and features.dtype != np.uint8 and features.size and (
      features.min() < 0 or features.max() > 1):
    raise ConfigError("float in-memory images must be in [0, 1]; scale them or pass "
                      "uint8 pixels.")
  return features, labels


def _build_prepare(is_image: bool, size: int):
  """(value, label) -> float32 value (images scaled and resized), int32 label."""

  def prepare(value, label):
    if is_image:
      value = tf.image.convert_image_dtype(value, tf.float32)
      if value.shape[0] != size or value.shape[1] != size:
        value = tf.clip_by_value(tf.image.resize(value, [size, size], method="bilinear",
                                                 antialias=True), 0.0, 1.0)
    else:
      value = tf.cast(value, tf.float32)
    return value, tf.cast(label, tf.int32)

  return prepare


def _augmented(ds, config: InputConfig, size: int, seed: Optional[int]):
  fn = augment_lib.build_augment_fn(config, size)
  if fn is None:
    return ds
  base = seed if seed is not None else pipeline.random_base_seed()
  return ds.enumerate().map(
      lambda i, e: (fn(e[0], tf.stack([tf.constant(base, tf.int64), i])), e[1]),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=seed is not None)


def _mixed(ds, config: InputConfig, num_classes: int, seed: Optional[int]):
  base = (seed if seed is not None else pipeline.random_base_seed()) + 1

  def mix(i, batch):
    images, soft = augment_lib.mixup(batch[0][pipeline.IMAGE_FEATURE], batch[1],
                                     num_classes, config.mixup_alpha,
                                     tf.stack([tf.constant(base, tf.int64), i]))
    return {pipeline.IMAGE_FEATURE: images}, soft

  return ds.enumerate().map(mix)


def build_array_input_fn(config: InputConfig, features, labels, training: bool,
                         seed: Optional[int] = None, num_epochs: Optional[int] = None,
                         *, image_size: int = 0, num_classes: int = 0):
  """An input_fn over in-memory arrays: images or numeric feature vectors.

  Args:
    config: batch sizes, shuffle buffer and augmentation.
    features: uint8 (0..255) or float (0..1) images [n, h, w, 3] -> {"image"},
      resized to `image_size` when it differs; or numeric [n, d] -> {"features"}.
    labels: int class ids [n].
    training: shuffle, augment, repeat.
    seed: order and augmentation seed; None: nondeterministic.
    num_epochs: epochs when training (None: forever).
    image_size: the backbone's input size (images only; 0 keeps their size).
    num_classes: labels must be in [0, num_classes) (0: unchecked).

  Returns:
    input_fn(params=None, config=None, input_context=None) -> tf.data.Dataset.

  Raises:
    ConfigError: shapes, value ranges or labels do not fit, naming the index.
  """
  features, labels = _checked_arrays(features, labels, num_classes)
  is_image = features.ndim == 4
  size = image_size or (features.shape[1] if is_image else 0)
  batch_size = config.batch_size if training else (config.eval_batch_size or
                                                   config.batch_size)
  key = pipeline.IMAGE_FEATURE if is_image else pipeline.NUMERIC_FEATURE
  prepare = _build_prepare(is_image, size)

  def input_fn(params=None, config=None, input_context=None):  # pylint: disable=redefined-outer-name
    del params
    ds = tf.data.Dataset.from_tensor_slices((features, labels))
    if training:
      num_shards, index = pipeline.shard_spec(config, input_context)
      if num_shards > 1:
        ds = ds.shard(num_shards, index)
      if input_config.shuffle_buffer > 0:
        ds = ds.shuffle(min(len(labels), max(input_config.shuffle_buffer, 1)),
                        # Explicit even without --seed: see relabel.mix_input_fns.
                        seed=seed if seed is not None else pipeline.random_base_seed(),
                        reshuffle_each_iteration=True)
      ds = ds.repeat(num_epochs)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if training and is_image:
      ds = _augmented(ds, input_config, size, seed)
    ds = ds.batch(batch_size).map(lambda v, l: ({key: v}, l))
    if training and is_image and input_config.mixup_alpha > 0:
      ds = _mixed(ds, input_config, num_classes, seed)
    return pipeline.prefetch(ds, input_config.prefetch)

  input_config = config
  return input_fn
