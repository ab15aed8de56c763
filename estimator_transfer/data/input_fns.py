"""input_fns over TFRecords of tf.Example and over image folders.

Both yield ({"image": float32 [batch, size, size, 3] in [0, 1]}, int32 labels)
through the same `preprocessing.decode_and_resize` the export uses.
"""
import os
from typing import List, Optional, Tuple

import tensorflow as tf

from estimator_transfer.config import ConfigError, InputConfig
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import preprocessing

IMAGE_FEATURE = "image"


def list_tfrecord_files(data: str) -> List[str]:
  """Expands a TFRecord spec: a file, a glob, or a directory of shards.

  Raises:
    ConfigError: nothing matches.
  """
  if tf.io.gfile.isdir(data):
    files = [os.path.join(data, f) for f in tf.io.gfile.listdir(data)
             if (".tfrecord" in f or "-of-" in f) and not f.endswith(".tmp")]
  elif any(c in data for c in "*?["):
    files = tf.io.gfile.glob(data)
  elif tf.io.gfile.exists(data):
    files = [data]
  else:
    files = []
  files = sorted(f for f in files if not f.endswith(".tmp"))
  if not files:
    raise ConfigError(f"no TFRecord files found at {data}; give a file, a glob "
                      "such as data/train-*, a directory of *.tfrecord shards, "
                      "or an image folder with one sub-folder per class.")
  return files


def list_image_folder(path: str) -> Tuple[List[str], List[int], List[str]]:
  """Lists images under class sub-folders (recursively); skips hidden files.

  Returns:
    (file paths, label ids, class names) with ids from sorted folder names.

  Raises:
    ConfigError: no class folders or no images.
  """
  names = labels_lib.folder_class_names(path)
  if not names:
    raise ConfigError(f"{path} has no class sub-folders; put the images of each "
                      "class in their own folder (e.g. data/cats/*.jpg).")
  files, ids = [], []
  for label, name in enumerate(names):
    for root, dirs, filenames in tf.io.gfile.walk(os.path.join(path, name)):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for filename in sorted(filenames):
        if filename.startswith("."):
          continue
        if filename.lower().endswith(labels_lib.IMAGE_EXTENSIONS):
          files.append(os.path.join(root, filename))
          ids.append(label)
  if not files:
    raise ConfigError(f"no images (jpg, png, gif, bmp) found under {path}; check "
                      "the folder.")
  return files, ids, names


def _parse_example_fn(config: InputConfig, image_size: int):
  keys = {
      config.image_key: tf.io.FixedLenFeature([], tf.string),
      config.label_key: tf.io.FixedLenFeature([], tf.int64),
  }

  def parse(serialized):
    parsed = tf.io.parse_single_example(serialized, keys)
    image = preprocessing.decode_and_resize(parsed[config.image_key], image_size)
    return {IMAGE_FEATURE: image}, tf.cast(parsed[config.label_key], tf.int32)

  return parse


def build_input_fn(config: InputConfig, data: str, image_size: int,
                   training: bool, seed: Optional[int] = None,
                   num_epochs: Optional[int] = None):
  """Returns an Estimator input_fn for a TFRecord spec or an image folder.

  Args:
    config: the input config (batch size, feature keys, parallelism).
    data: TFRecord file/glob/dir, or an image folder with class sub-folders.
    image_size: the backbone's input size.
    training: shuffle and repeat (for `num_epochs`, or forever when None).
    seed: shuffle seed; None for nondeterministic order.
    num_epochs: epochs when training; ignored for evaluation (one pass).

  Raises:
    ConfigError: the data cannot be found.
  """
  if not data:
    raise ConfigError("no data was given; set --train_data / --eval_data.")
  parallel = tf.data.AUTOTUNE if config.num_parallel_calls < 0 else config.num_parallel_calls
  batch_size = config.batch_size if training else (config.eval_batch_size or config.batch_size)
  if labels_lib.is_image_folder(data):
    files, ids, _ = list_image_folder(data)
    source = ("folder", files, ids)
  else:
    source = ("tfrecord", list_tfrecord_files(data), None)

  def input_fn(params=None):
    del params
    kind, files, ids = source
    if kind == "folder":
      ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(ids, tf.int32)))
      if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
      ds = ds.map(lambda path, label: (
          {IMAGE_FEATURE: preprocessing.decode_and_resize(tf.io.read_file(path), image_size)},
          label), num_parallel_calls=parallel, deterministic=seed is not None or not training)
    else:
      ds = tf.data.Dataset.from_tensor_slices(files)
      if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
      ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                         num_parallel_calls=parallel,
                         deterministic=seed is not None or not training)
      if training:
        ds = ds.shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
      ds = ds.map(_parse_example_fn(config, image_size), num_parallel_calls=parallel,
                  deterministic=seed is not None or not training)
    # A corrupt image must not kill a long job: skip it (TF logs each one).
    ds = ds.ignore_errors(log_warning=True)
    if training:
      ds = ds.repeat(num_epochs)
    ds = ds.batch(batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)

  return input_fn
