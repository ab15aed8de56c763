"""Estimator input_fns over cached features.

They yield ({"backbone_features": float32 [batch, D]}, int32 labels [batch]),
the features the model_fn's feature-cache mode takes instead of images.
"""
import dataclasses
from typing import Callable, List, Optional, Tuple

import tensorflow as tf

from estimator_transfer.config import InputConfig
from estimator_transfer.data import pipeline
from estimator_transfer.feature_cache import key as key_lib
from estimator_transfer.feature_cache import store
from estimator_transfer.model.model_fn import CACHED_FEATURES_KEY

_IN_MEMORY_BYTES = 1 << 30  # cached training features held in memory up to this


@dataclasses.dataclass
class CachedData:
  """One data spec's cached features, ready for an input_fn.

  Attributes:
    files: the unit TFRecord files, in unit order.
    counts: examples per file.
    feature_dim: D.
    computed: units computed by this call (0 when everything was cached).
    units: the units.
    compute_seconds: time this call spent computing units (not building the
      backbone graph or the snapshot).
    feature_shape: the features' shape per example (a partial cache's cut
      layer output, e.g. [7, 7, 320]); the records hold them flattened.
  """
  files: List[str]
  counts: List[int]
  feature_dim: int
  computed: int
  units: List[key_lib.Unit]
  compute_seconds: float = 0.0
  feature_shape: Tuple[int, ...] = ()  # per example; () is (feature_dim,)

  @property
  def shape(self) -> Tuple[int, ...]:
    return tuple(self.feature_shape) or (self.feature_dim,)

  @property
  def num_examples(self) -> int:
    return sum(self.counts)


# Plain graph code: autograph's conversion would only add tracing time.


def _parser(shape: Tuple[int, ...]) -> Callable:
  dim = 1
  for d in shape:
    dim *= int(d)
  spec = {store.FEATURE_KEY: tf.io.FixedLenFeature([dim], tf.float32),
          store.LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}

  @tf.autograph.experimental.do_not_convert
  def parse(records):
    parsed = tf.io.parse_example(records, spec)
    features = parsed[store.FEATURE_KEY]
    if len(shape) > 1:
      features = tf.reshape(features, [-1, *shape])
    return features, tf.cast(parsed[store.LABEL_KEY], tf.int32)

  return parse


@tf.autograph.experimental.do_not_convert
def _as_features(features, labels):
  return {CACHED_FEATURES_KEY: features}, labels


@tf.autograph.experimental.do_not_convert
def _read(path):
  return tf.data.TFRecordDataset(path)


def _in_memory(cached: CachedData) -> bool:
  return sum(c for c in cached.counts if c) * cached.feature_dim * 4 <= _IN_MEMORY_BYTES


def _train_dataset(cached: CachedData, i: InputConfig, seed: Optional[int],
                   num_epochs: Optional[int], num_shards: int, index: int) -> tf.data.Dataset:
  """This worker's examples, shuffled and repeated, unbatched."""
  files = [f for f, c in zip(cached.files, cached.counts) if c]
  total = sum(c for c in cached.counts if c)
  record_shards = num_shards > 1 and len(files) < num_shards
  if num_shards > 1 and not record_shards:
    files = files[index::num_shards]
    total = sum(c for f, c in zip(cached.files, cached.counts) if f in set(files))
  in_memory = total * cached.feature_dim * 4 <= _IN_MEMORY_BYTES
  shuffle = i.shuffle_buffer > 0
  file_ds = tf.data.Dataset.from_tensor_slices(files)
  if not in_memory:
    # Too big to hold: a new file order every epoch, then a window shuffle.
    if shuffle:
      file_ds = file_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    file_ds = file_ds.repeat(num_epochs)
  ds = file_ds.flat_map(_read)
  if record_shards:
    ds = ds.shard(num_shards, index)
  ds = ds.batch(1024).map(_parser(cached.shape),
                          num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  if in_memory:
    # Cached features are small: keep them after the first pass and shuffle
    # all of them every epoch.
    ds = ds.cache()
    if shuffle:
      ds = ds.shuffle(max(1, total // (num_shards if record_shards else 1)), seed=seed,
                      reshuffle_each_iteration=True)
    ds = ds.repeat(num_epochs)
  elif shuffle:
    ds = ds.shuffle(i.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  return ds


def build_cached_input_fn(cached: CachedData, input_config: InputConfig, training: bool,
                          seed: Optional[int] = None,
                          num_epochs: Optional[int] = None) -> Callable:
  """An Estimator input_fn over cached features (see `cache.build_input_fn`).

  Training shuffles (every cached example, when they fit in 1 GiB of memory;
  else the files and a --shuffle_buffer window), repeats and, under
  TF_CONFIG, takes this worker's files (or records, with fewer files than
  workers); evaluation reads everything once, in order.

  Args:
    cached: the prepared features.
    input_config: batch sizes and --shuffle_buffer.
    training: shuffle, repeat, shard by worker.
    seed: shuffle seed; None: nondeterministic.
    num_epochs: epochs when training (None: forever).

  Returns:
    input_fn(params=None, config=None, input_context=None), with the
    attribute `cached`.
  """
  i = input_config
  batch_size = i.batch_size if training else (i.eval_batch_size or i.batch_size)

  def input_fn(params=None, config=None, input_context=None):
    del params
    if not training:
      files = [f for f, c in zip(cached.files, cached.counts) if c]
      ds = tf.data.TFRecordDataset(files).batch(batch_size).map(_parser(cached.shape))
      return ds.map(_as_features).prefetch(tf.data.AUTOTUNE)
    num_shards, index = pipeline.shard_spec(config, input_context)
    ds = _train_dataset(cached, i, seed, num_epochs, num_shards, index)
    ds = ds.batch(batch_size).map(_as_features).prefetch(tf.data.AUTOTUNE)
    # Held in memory from the second epoch on: nothing to tune.
    return pipeline.without_autotune(ds) if _in_memory(cached) else ds

  input_fn.cached = cached
  return input_fn
