"""Computing features: the frozen backbone in a standalone graph and session.

`ResolvedBackbone.instantiate(images, "all", training=False)` is the very
computation a frozen backbone does in training, evaluation and serving; it
runs here on the pixels `preprocessing.decode_and_resize` gives, one unit at
a time, with the values of one snapshot. A partial cache runs the frozen
part below its cut instead (`split.instantiate_bottom`), in inference mode
as the full network runs it.

Augmented copies (--cache_features_with_augmentation=K): copy c of a unit
gets its own fixed random augmentation (stateless seeds from the unit and
copy number), so a recomputed unit is identical.
"""
import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from estimator_transfer.config import ExperimentConfig, InputConfig
from estimator_transfer.data import augment as augment_lib
from estimator_transfer.data import pipeline
from estimator_transfer.data import preprocessing
from estimator_transfer.errors import ConfigError
from estimator_transfer.feature_cache import key as key_lib
from estimator_transfer.feature_cache import store
from estimator_transfer.model import backbone_types
from estimator_transfer.model import split as split_lib


@dataclasses.dataclass(frozen=True)
class _Feeds:
  """The placeholders one unit is fed through."""
  files: tf.Tensor
  labels: tf.Tensor  # folder units: label id per file
  names: tf.Tensor  # the label map, for text labels
  copy: tf.Tensor  # augmented copy number; -1: not augmented
  seed: tf.Tensor  # base of the augmentation seeds

  @classmethod
  def build(cls) -> "_Feeds":
    return cls(files=tf.compat.v1.placeholder(tf.string, [None], name="files"),
               labels=tf.compat.v1.placeholder(tf.int32, [None], name="labels"),
               names=tf.compat.v1.placeholder(tf.string, [None], name="class_names"),
               copy=tf.compat.v1.placeholder(tf.int64, [], name="copy"),
               seed=tf.compat.v1.placeholder(tf.int64, [], name="seed"))


def _finish_fn(feeds: _Feeds, augment: Optional[Callable]) -> Callable:
  """Augments a copy's image (not the plain features) with its fixed seed."""

  def finish(index, image, label):
    if augment is not None:
      # Copy c of record i gets seed [unit seed, c * 2^32 + i]: fixed, so a
      # recomputed unit is identical, and different for every copy.
      seed = tf.stack([feeds.seed, feeds.copy * (1 << 32) + index])
      image = tf.cond(feeds.copy >= 0, lambda: augment(image, seed), lambda: image)
    return index, image, label

  return finish


def _record_fn(i: InputConfig, size: int, feeds: _Feeds, text: bool,
               finish: Callable) -> Callable:
  """Parses one tf.Example of a TFRecord unit (text labels: via the label map)."""

  def parse(index, record):
    keys = {i.image_key: tf.io.FixedLenFeature([], tf.string),
            i.label_key: tf.io.FixedLenFeature([], tf.string if text else tf.int64)}
    parsed = tf.io.parse_single_example(record, keys)
    image = preprocessing.decode_and_resize(parsed[i.image_key], size)
    if text:
      ids = tf.range(tf.size(feeds.names), dtype=tf.int32)
      label = tf.reduce_max(tf.concat(
          [tf.where(tf.equal(feeds.names, parsed[i.label_key]), ids, -1), [-1]], 0))
    else:
      label = tf.cast(parsed[i.label_key], tf.int32) - i.label_offset  # as units.py
    return finish(index, image, label)

  return parse


def _folder_fn(size: int, finish: Callable) -> Callable:
  """Reads one image file of a folder unit."""

  def read(index, pair):
    path, label = pair
    image = preprocessing.decode_and_resize(tf.io.read_file(path), size)
    return finish(index, image, label)

  return read


def _datasets(i: InputConfig, size: int, feeds: _Feeds) -> Dict[Tuple[str, bool],
                                                                 tf.data.Dataset]:
  """The batched datasets of each unit kind: (kind, text labels) -> dataset."""
  augment = augment_lib.build_augment_fn(i, size) if i.cache_features_with_augmentation \
      else None
  finish = _finish_fn(feeds, augment)
  autotune = tf.data.AUTOTUNE
  datasets = {
      ("tfrecord", False): tf.data.TFRecordDataset(feeds.files).enumerate().map(
          _record_fn(i, size, feeds, False, finish), num_parallel_calls=autotune),
      ("tfrecord", True): tf.data.TFRecordDataset(feeds.files).enumerate().map(
          _record_fn(i, size, feeds, True, finish), num_parallel_calls=autotune),
      ("folder", False): tf.data.Dataset.from_tensor_slices(
          (feeds.files, feeds.labels)).enumerate().map(
              _folder_fn(size, finish), num_parallel_calls=autotune),
  }
  batch = max(1, i.eval_batch_size or i.batch_size)
  for kind, ds in datasets.items():
    if i.on_bad_record != "fail":
      ds = ds.ignore_errors()
    # A unit's pass is too short to tune, and the session lives to the end of
    # the process, whose exit would wait for the autotuning thread.
    datasets[kind] = pipeline.without_autotune(ds.batch(batch).prefetch(2))
  return datasets


def _session(config: ExperimentConfig, graph: tf.Graph) -> tf.compat.v1.Session:
  session_config = tf.compat.v1.ConfigProto(
      intra_op_parallelism_threads=config.run.intra_op_threads,
      inter_op_parallelism_threads=config.run.inter_op_threads,
      allow_soft_placement=True)
  return tf.compat.v1.Session(graph=graph, config=session_config)


class Extractor:
  """The backbone in a standalone graph and session, fed one unit at a time."""

  def __init__(self, config: ExperimentConfig, resolved: backbone_types.ResolvedBackbone,
               cut: Union[None, split_lib.Split, Callable[[], split_lib.Split]] = None):
    """Builds the graph and session (no snapshot values loaded yet).

    Args:
      config: the experiment (input keys, batch size, augmentation, threads).
      resolved: the backbone.
      cut: a partial cache's split (or a function giving it, called once the
        model is built): the features are the output of its cut layer
        (flattened); None: the whole frozen backbone's.
    """
    self.graph = tf.Graph()
    with self.graph.as_default():
      self._feeds = _Feeds.build()
      datasets = _datasets(config.input, resolved.image_size, self._feeds)
      first = datasets[("tfrecord", False)]
      iterator = tf.compat.v1.data.Iterator.from_structure(
          tf.compat.v1.data.get_output_types(first),
          tf.compat.v1.data.get_output_shapes(first))
      self._init = {kind: iterator.make_initializer(ds) for kind, ds in datasets.items()}
      _, images, self._label_out = iterator.get_next()
      # The dtype policy (--mixed_precision) the model_fn builds the backbone
      # with: cached features are what training and serving would compute.
      policy = key_lib.policy(config)
      self.cut = None
      if cut is not None:
        features, self._init_fn, self.cut = split_lib.instantiate_bottom(resolved, cut, images,
                                                                         policy)
        self.features = tf.reshape(features, [-1, self.cut.feature_dim])
      else:
        out = resolved.instantiate(images, "all", training=False,
                                   **({"policy": policy} if policy != "float32" else {}))
        self.features, self._init_fn = out.features, out.init_fn
      self.feature_dim = int(self.features.shape[-1])
      self._variables = {v.op.name: v for v in tf.compat.v1.global_variables()}
      self._saver = tf.compat.v1.train.Saver(self._variables, sharded=False)
      init = [tf.compat.v1.global_variables_initializer(),
              tf.compat.v1.local_variables_initializer(),
              tf.compat.v1.tables_initializer()]
    self.session = _session(config, self.graph)
    self.session.run(init)
    self._restored = None

  def new_snapshot(self, directory: str, details: dict) -> None:
    """Writes the source's values (pretrained, or freshly drawn) as a snapshot."""
    if self._init_fn is not None:
      self._init_fn(None, self.session)  # Keras pretrained weights
    values = self.session.run(self._variables)
    with self.graph.as_default():
      self._saver.save(self.session, store.snapshot_prefix(directory),
                       write_meta_graph=False, write_state=False)
    store.write_snapshot_meta(directory, values, self.feature_dim, details)

  def use(self, snapshot: store.Snapshot) -> None:
    """Loads the snapshot's values: every unit is computed with exactly these.

    Raises:
      ConfigError: the snapshot does not fit this backbone.
    """
    if self._restored == snapshot.id:
      return
    try:
      with self.graph.as_default():
        self._saver.restore(self.session, snapshot.prefix)
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
      raise ConfigError(f"the backbone snapshot {snapshot.directory} does not fit "
                        f"this backbone ({e.message.splitlines()[0][:160]}); delete "
                        "it (and the feature cache key directory) to rebuild it.") from e
    if snapshot.feature_dim != self.feature_dim:
      raise ConfigError(f"the backbone snapshot {snapshot.directory} has "
                        f"{snapshot.feature_dim} features but the backbone gives "
                        f"{self.feature_dim}; delete it to rebuild it.")
    self._restored = snapshot.id

  def run(self, unit: key_lib.Unit,
          class_names: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(features [n, D], labels [n]) of a unit's examples, in record order.

    Raises:
      ConfigError: a record cannot be read or decoded (--on_bad_record=fail).
    """
    feeds = self._feeds
    feed = {feeds.files: list(unit.files),
            feeds.labels: list(unit.labels) or [0] * len(unit.files),
            feeds.names: list(class_names) or [""], feeds.copy: unit.copy,
            feeds.seed: unit.seed}
    kind = (unit.kind, unit.label_is_text and unit.kind == "tfrecord")
    self.session.run(self._init[kind], feed)
    features, labels = [], []
    while True:
      try:
        f, l = self.session.run([self.features, self._label_out])
      except tf.errors.OutOfRangeError:
        break
      except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
        raise ConfigError(f"{unit.describe} has a record that cannot be read or "
                          f"decoded ({e.message.splitlines()[0][:160]}); fix or "
                          "remove it, or use --on_bad_record=skip.") from e
      features.append(f)
      labels.append(l)
    if not features:
      return np.zeros([0, self.feature_dim], np.float32), np.zeros([0], np.int32)
    return (np.concatenate(features).astype(np.float32),
            np.concatenate(labels).astype(np.int32))

  def close(self) -> None:
    """Closes the session."""
    self.session.close()
