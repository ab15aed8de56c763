"""Feature-cache mode: a frozen backbone runs once, the head trains on its features.

With `--freeze=all` and no augmentation every epoch of ordinary training
recomputes the same backbone features. With `--cache_features=DIR` they are
computed once, in batches, in a standalone graph and session
(`ResolvedBackbone.instantiate(images, "all", training=False)`: the very
computation a frozen backbone does in training, evaluation and serving), from
the pixels `preprocessing.decode_and_resize` gives, and written as TFRecords.
The head then trains in the ordinary Estimator/model_fn machinery
(checkpoints, schedules, EMA, early stopping, hooks, cluster jobs) from
features {"backbone_features": float32 [batch, D]}; evaluation reads the
cache too. Exports still take images (see "Export" below).

Layout:

  DIR/<key>/                  one key per backbone: a hash of its content (the
                              weights / model / module files), architecture,
                              image size, value range, cut point
                              (--backbone_output_layer), freeze point and a
                              hash of the preprocessing code (decoding,
                              resizing, value range); key.json says which
    backbone/                 the snapshot: a checkpoint of the backbone
                              values the features were computed with, and
                              snapshot.json (content id, feature size)
    units/<unit>.tfrecord     features + label of one input unit: one TFRecord
                              file, or up to 256 images of one class folder
    units/<unit>.json         the unit's completion marker (count, size,
                              snapshot id)

A unit's name hashes its input files (path, size, mtime), the label keys
(and the label map, which turns text labels and class folders into ids) and,
for augmented copies, the augmentation settings and copy number: a changed
input file recomputes only its unit, a changed backbone gives another key,
and a unit is used only when its marker names the current snapshot, so
features of different backbone values are never mixed.

Writers never corrupt the cache: unit files are written under temporary names
and renamed, the marker last; the snapshot is published by renaming a
temporary directory, which fails if another writer published first (that
snapshot is then used). Concurrent writers (two jobs, cluster workers) compute
the missing units in random order and re-check each one just before
computing it, so at worst a unit is computed twice, with the same result. A
killed run leaves units without markers, which the next run recomputes, and
temporary files, which are removed after an hour.

The snapshot also pins random initial weights (`--backbone_weights=none`, a
Keras application without weights): the cache keeps the values it drew.

Export: training pins the snapshot into `model_dir/feature_cache/backbone/`
(a run whose cache was rebuilt with other values is refused), and
`FeatureCache.full_checkpoint` composes it with a head checkpoint (head, EMA
averages, optimizer state, global step) into an ordinary checkpoint of the
full model in `model_dir/feature_cache/full/`, which export.py serves like
any other: the exported model takes image bytes exactly like an uncached one.

Augmented copies (`--cache_features_with_augmentation=K`): each training
image is cached K times, each copy with its own fixed random augmentation
(stateless seeds from the unit and copy number, so a recomputed unit is
identical); evaluation data is never augmented. The trade-off: K times the
extraction time and disk, and the head sees only K variants of each image
however many epochs it trains (uncached training draws fresh ones every
epoch), so a large number of epochs over few copies overfits to them; an
"epoch" (epoch boundaries, --train_size) still counts the original images.
Mixup mixes images before the backbone and cannot be cached.
"""
import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import time
import uuid
from concurrent import futures
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from estimator_transfer.model import backbones
from estimator_transfer.errors import ConfigError
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.data import augment as augment_lib
from estimator_transfer.data import input_fns
from estimator_transfer.data import preprocessing
from estimator_transfer.model.model_fn import CACHED_FEATURES_KEY

log = logging.getLogger("estimator_transfer")

FORMAT_VERSION = 1
FOLDER_UNIT = 256  # image files per unit of an image folder
KEY_FILENAME = "key.json"
SNAPSHOT_DIRNAME = "backbone"
SNAPSHOT_PREFIX = "backbone.ckpt"
SNAPSHOT_META = "snapshot.json"
UNITS_DIRNAME = "units"
MODEL_DIR_SUBDIR = "feature_cache"  # under model_dir: the pinned snapshot, full/
FULL_DIRNAME = "full"
FEATURE_KEY = "features"  # the cache records' tf.Example keys
LABEL_KEY = "label"
_TMP = ".tmp-"
_STALE_SECONDS = 3600
_IN_MEMORY_BYTES = 1 << 30  # cached training features held in memory up to this


# --- fingerprints -------------------------------------------------------------


def _is_remote(path: str) -> bool:
  return "://" in path


def _abs(path: str) -> str:
  return path if _is_remote(path) else os.path.abspath(path)


def _content_hash(paths: Sequence[str]) -> str:
  """sha256 of the files (directories: every file, by relative name)."""
  digest = hashlib.sha256()
  for path in paths:
    files = []
    if tf.io.gfile.isdir(path):
      for root, dirs, names in tf.io.gfile.walk(path):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names)]
    else:
      files = [path]
    for name in files:
      digest.update(os.path.relpath(name, path).encode() + b"\0")
      with tf.io.gfile.GFile(name, "rb") as f:
        while True:
          chunk = f.read(1 << 22)
          if not chunk:
            break
          digest.update(chunk)
  return digest.hexdigest()


def _weights_files(path: str) -> List[str]:
  """A Keras weights file, or a TF-format prefix's index and data files."""
  if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
    return [path]
  return sorted([path + ".index"] + tf.io.gfile.glob(path + ".data-*"))


def _policy(config: ExperimentConfig) -> str:
  return getattr(config.run, "mixed_precision", "float32") or "float32"


def _preprocessing_version() -> str:
  """A hash of the code between image bytes and the backbone's input.

  Any edit of the decoding/resizing or of the value-range mapping gives new
  keys, so features of other pixels are never reused.
  """
  import inspect  # pylint: disable=g-import-not-at-top
  code = inspect.getsource(preprocessing.decode_and_resize) + inspect.getsource(
      backbones.to_value_range)
  return hashlib.sha1(code.encode()).hexdigest()[:12]


def fingerprint(config: ExperimentConfig,
                resolved: backbones.ResolvedBackbone) -> Tuple[str, dict]:
  """The cache key of a backbone: (16 hex digits, what they hash).

  Files are hashed by content, so a moved file keeps its key and a changed
  one (same name) gets a new one.
  """
  b = config.backbone
  details = {"format": FORMAT_VERSION, "preprocessing": _preprocessing_version(),
             "kind": resolved.kind, "image_size": resolved.image_size,
             "value_range": resolved.value_range, "output_layer": b.output_layer,
             "freeze": "all"}
  description = resolved.description
  if resolved.kind in ("hub_tf1", "hub_tf2"):
    details["module"] = _content_hash([resolved.hub_path])
  elif description.startswith("keras application "):
    details["architecture"] = b.handle.strip()
  else:
    details["model"] = _content_hash([description[len("Keras model "):]])
  if _policy(config) != "float32":
    details["policy"] = _policy(config)
  weights = b.weights.strip()
  if weights.lower() == "none" or (not weights and "architecture" in details):
    details["weights"] = "random (pinned by the snapshot)"
  elif weights:
    details["weights"] = _content_hash(_weights_files(weights))
  text = json.dumps(details, sort_keys=True)
  return hashlib.sha1(text.encode()).hexdigest()[:16], details


# --- units --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
  """One cached piece of an input: a TFRecord file or a chunk of a class folder."""
  key: str
  kind: str  # tfrecord | folder
  files: Tuple[str, ...]
  labels: Tuple[int, ...]  # folder: label id per file
  label_is_text: bool
  copy: int  # augmented copy number; -1: not augmented
  seed: int  # base of the augmentation seeds
  describe: str


def _stats(files: Sequence[str]) -> List[Tuple[int, int]]:
  def stat(path):
    s = tf.io.gfile.stat(path)
    return int(s.length), int(s.mtime_nsec)
  with futures.ThreadPoolExecutor(max_workers=16) as pool:
    return list(pool.map(stat, files))


def _augmentation_settings(config) -> dict:
  i = config.input
  return {k: getattr(i, k) for k in ("random_flip", "random_crop", "crop_min_area",
                                     "rotation_degrees", "brightness", "contrast",
                                     "saturation")}


def list_units(config: ExperimentConfig, data: str, training: bool,
               class_names: Sequence[str] = ()) -> List[Unit]:
  """The units of a data spec (augmented copies for training with K > 0).

  Raises:
    ConfigError: the data cannot be read, or is not images (CSV).
  """
  source = input_fns.resolve_source(config.input, data, class_names)
  if source.kind == "csv":
    raise ConfigError(f"--cache_features caches backbone features of images, but "
                      f"{data} is CSV data without a backbone; drop --cache_features.")
  i = config.input
  # Int labels are cached as they are (the label map only bounds them); text
  # labels become ids through the label map; folder ids are in the key below.
  labels_part = {"image_key": i.image_key, "label_key": i.label_key,
                 "text": source.label_is_text,
                 "class_names": list(source.class_names) if source.label_is_text else []}
  stats = _stats(source.files)
  groups = []  # (files, labels, stats, describe)
  if source.kind == "tfrecord":
    for path, stat in zip(source.files, stats):
      groups.append(((path,), (), (stat,), path))
  else:
    start = 0
    for end in range(1, len(source.files) + 1):
      if (end == len(source.files) or source.labels[end] != source.labels[start] or
          end - start == FOLDER_UNIT):
        files = source.files[start:end]
        groups.append((tuple(files), tuple(source.labels[start:end]),
                       tuple(stats[start:end]),
                       f"{len(files)} images in {os.path.dirname(files[0])} "
                       f"({os.path.basename(files[0])}...)"))
        start = end
  copies = [-1]
  if training and i.cache_features_with_augmentation:
    copies = list(range(i.cache_features_with_augmentation))
  units = []
  for files, labels, file_stats, describe in groups:
    base = {"kind": source.kind, "labels": labels_part, "label_ids": list(labels),
            "files": [[_abs(f), size, mtime] for f, (size, mtime) in zip(files, file_stats)]}
    base_key = hashlib.sha1(json.dumps(base, sort_keys=True).encode()).hexdigest()
    for copy in copies:
      keyed = dict(base, copy=copy,
                   augmentation=_augmentation_settings(config) if copy >= 0 else None)
      key = hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:24]
      units.append(Unit(key, source.kind, files, labels, source.label_is_text, copy,
                        int(base_key[:12], 16),
                        describe + (f" (augmented copy {copy})" if copy >= 0 else "")))
  return units


# --- files ----------------------------------------------------------------------


def _write_text(path: str, text: str) -> None:
  tmp = f"{path}{_TMP}{uuid.uuid4().hex[:8]}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def _read_json(path: str) -> Optional[dict]:
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.loads(f.read())
  except (tf.errors.OpError, ValueError):
    return None


def _publish_dir(tmp: str, final: str) -> bool:
  """Renames directory `tmp` to `final` unless `final` exists; True if published.

  Locally rename(2) refuses to replace a non-empty directory, so of two
  writers exactly one publishes; on remote file systems it is best effort.
  """
  if not _is_remote(final):
    try:
      os.rename(tmp, final)
      return True
    except OSError as e:
      if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(final):
        raise
      shutil.rmtree(tmp, ignore_errors=True)
      return False
  if tf.io.gfile.exists(final):
    tf.io.gfile.rmtree(tmp)
    return False
  tf.io.gfile.rename(tmp, final)
  return True


def _remove_stale_temps(directory: str) -> None:
  """Removes temporary files and directories of writers dead for an hour."""
  if not tf.io.gfile.isdir(directory):
    return
  now = time.time()
  for name in tf.io.gfile.listdir(directory):
    if _TMP not in name:
      continue
    path = os.path.join(directory, name.rstrip("/"))
    try:
      if now - tf.io.gfile.stat(path).mtime_nsec / 1e9 < _STALE_SECONDS:
        continue
      if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
      else:
        tf.io.gfile.remove(path)
      log.info("feature cache: removed %s left by an interrupted run", path)
    except tf.errors.OpError:
      continue  # another process removed it first


def _copy_dir(src: str, dest: str) -> None:
  tf.io.gfile.makedirs(dest)
  for name in tf.io.gfile.listdir(src):
    tf.io.gfile.copy(os.path.join(src, name), os.path.join(dest, name), overwrite=True)


def _write_checkpoint(prefix: str, values: Dict[str, np.ndarray]) -> None:
  """Writes a name-based (tf.compat.v1 Saver format) checkpoint of `values`."""
  names = sorted(values)
  with tf.Graph().as_default():
    feeds, tensors = {}, []
    for name in names:
      value = np.asarray(values[name])
      dtype = tf.string if value.dtype.kind in "OSU" else tf.as_dtype(value.dtype)
      placeholder = tf.compat.v1.placeholder(dtype, value.shape)
      feeds[placeholder] = value
      tensors.append(placeholder)
    save = tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                             shape_and_slices=[""] * len(names), tensors=tensors)
    with tf.compat.v1.Session() as sess:
      sess.run(save, feeds)


def _read_checkpoint(prefix: str) -> Dict[str, np.ndarray]:
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _values_id(values: Dict[str, np.ndarray]) -> str:
  digest = hashlib.sha256()
  for name in sorted(values):
    value = np.ascontiguousarray(values[name])
    digest.update(f"{name}|{value.dtype}|{value.shape}|".encode())
    digest.update(value.tobytes() if value.dtype.kind != "O" else repr(value).encode())
  return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """Backbone values features were computed with (a published directory)."""
  directory: str
  id: str
  feature_dim: int

  @property
  def prefix(self) -> str:
    return os.path.join(self.directory, SNAPSHOT_PREFIX)


def read_snapshot(directory: str) -> Optional[Snapshot]:
  """The snapshot published in `directory`, or None."""
  meta = _read_json(os.path.join(directory, SNAPSHOT_META))
  if not meta or not tf.io.gfile.exists(os.path.join(directory, SNAPSHOT_PREFIX + ".index")):
    return None
  return Snapshot(directory, str(meta["id"]), int(meta["feature_dim"]))


# --- extraction ---------------------------------------------------------------


class _Extractor:
  """The backbone in a standalone graph and session, fed one unit at a time."""

  def __init__(self, config: ExperimentConfig, resolved: backbones.ResolvedBackbone):
    i, size = config.input, resolved.image_size
    self._fail = i.on_bad_record == "fail"
    augment = (augment_lib.build_augment_fn(i, size)
               if i.cache_features_with_augmentation else None)
    self.graph = tf.Graph()
    with self.graph.as_default():
      self._files = tf.compat.v1.placeholder(tf.string, [None], name="files")
      self._labels = tf.compat.v1.placeholder(tf.int32, [None], name="labels")
      self._names = tf.compat.v1.placeholder(tf.string, [None], name="class_names")
      self._copy = tf.compat.v1.placeholder(tf.int64, [], name="copy")
      self._seed = tf.compat.v1.placeholder(tf.int64, [], name="seed")

      def finish(index, image, label):
        if augment is not None:
          # Copy c of record i gets seed [unit seed, c * 2^32 + i]: fixed, so a
          # recomputed unit is identical, and different for every copy.
          seed = tf.stack([self._seed, self._copy * (1 << 32) + index])
          image = tf.cond(self._copy >= 0, lambda: augment(image, seed),
                          lambda: image)
        return index, image, label

      def parse(text):
        def fn(index, record):
          keys = {i.image_key: tf.io.FixedLenFeature([], tf.string),
                  i.label_key: tf.io.FixedLenFeature([], tf.string if text else tf.int64)}
          parsed = tf.io.parse_single_example(record, keys)
          image = preprocessing.decode_and_resize(parsed[i.image_key], size)
          if text:
            ids = tf.range(tf.size(self._names), dtype=tf.int32)
            label = tf.reduce_max(tf.concat(
                [tf.where(tf.equal(self._names, parsed[i.label_key]), ids, -1), [-1]], 0))
          else:
            label = tf.cast(parsed[i.label_key], tf.int32)
          return finish(index, image, label)
        return fn

      def folder(index, pair):
        path, label = pair
        image = preprocessing.decode_and_resize(tf.io.read_file(path), size)
        return finish(index, image, label)

      batch = max(1, i.eval_batch_size or i.batch_size)
      datasets = {
          ("tfrecord", False): tf.data.TFRecordDataset(self._files).enumerate().map(
              parse(False), num_parallel_calls=tf.data.AUTOTUNE),
          ("tfrecord", True): tf.data.TFRecordDataset(self._files).enumerate().map(
              parse(True), num_parallel_calls=tf.data.AUTOTUNE),
          ("folder", False): tf.data.Dataset.from_tensor_slices(
              (self._files, self._labels)).enumerate().map(
                  folder, num_parallel_calls=tf.data.AUTOTUNE),
      }
      for key, ds in datasets.items():
        if not self._fail:
          ds = ds.ignore_errors()
        datasets[key] = ds.batch(batch).prefetch(2)
      first = datasets[("tfrecord", False)]
      iterator = tf.compat.v1.data.Iterator.from_structure(
          tf.compat.v1.data.get_output_types(first),
          tf.compat.v1.data.get_output_shapes(first))
      self._init = {key: iterator.make_initializer(ds) for key, ds in datasets.items()}
      self._index, images, self._label_out = iterator.get_next()
      # The dtype policy (--mixed_precision) the model_fn builds the backbone
      # with: cached features are what training and serving would compute.
      policy = _policy(config)
      out = resolved.instantiate(images, "all", training=False,
                                 **({"policy": policy} if policy != "float32" else {}))
      self.features = out.features
      self.feature_dim = int(out.features.shape[-1])
      self._init_fn = out.init_fn
      variables = tf.compat.v1.global_variables()
      self._variables = {v.op.name: v for v in variables}
      self._saver = tf.compat.v1.train.Saver(self._variables, sharded=False)
      init = [tf.compat.v1.global_variables_initializer(),
              tf.compat.v1.local_variables_initializer(),
              tf.compat.v1.tables_initializer()]
    session_config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=config.run.intra_op_threads,
        inter_op_parallelism_threads=config.run.inter_op_threads,
        allow_soft_placement=True)
    self.session = tf.compat.v1.Session(graph=self.graph, config=session_config)
    self.session.run(init)
    self._restored = None

  def new_snapshot(self, directory: str, details: dict) -> None:
    """Writes the source's values (pretrained, or freshly drawn) as a snapshot."""
    if self._init_fn is not None:
      self._init_fn(None, self.session)  # Keras pretrained weights
    values = self.session.run(self._variables)
    with self.graph.as_default():
      self._saver.save(self.session, os.path.join(directory, SNAPSHOT_PREFIX),
                       write_meta_graph=False, write_state=False)
    meta = {"id": _values_id(values), "feature_dim": self.feature_dim,
            "variables": {n: list(v.shape) for n, v in sorted(values.items())},
            "fingerprint": details,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_text(os.path.join(directory, SNAPSHOT_META), json.dumps(meta, indent=1))

  def use(self, snapshot: Snapshot) -> None:
    """Loads the snapshot's values: every unit is computed with exactly these."""
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

  def run(self, unit: Unit, class_names: Sequence[str]):
    """(features [n, D], labels [n]) of a unit's examples, in record order."""
    feed = {self._files: list(unit.files),
            self._labels: list(unit.labels) or [0] * len(unit.files),
            self._names: list(class_names) or [""], self._copy: unit.copy,
            self._seed: unit.seed}
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
    self.session.close()


def _count_records(path: str) -> int:
  count = 0
  try:
    for _ in tf.compat.v1.io.tf_record_iterator(path):
      count += 1
  except tf.errors.OpError:
    count += 1  # a truncated file: its tail counts as one bad record
  return count


def _example(features: np.ndarray, label: int) -> bytes:
  return tf.train.Example(features=tf.train.Features(feature={
      FEATURE_KEY: tf.train.Feature(float_list=tf.train.FloatList(value=features)),
      LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
  })).SerializeToString()


# --- the cache ------------------------------------------------------------------


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
  """
  files: List[str]
  counts: List[int]
  feature_dim: int
  computed: int
  units: List[Unit]
  compute_seconds: float = 0.0

  @property
  def num_examples(self) -> int:
    return sum(self.counts)


class FeatureCache:
  """The feature cache of one config (its backbone's key under --cache_features)."""

  def __init__(self, config: ExperimentConfig,
               resolved: Optional[backbones.ResolvedBackbone] = None):
    """Resolves the key (hashes the backbone's files); computes nothing yet.

    Raises:
      ConfigError: no --cache_features, or a backbone that cannot be resolved.
    """
    if not config.input.cache_features:
      raise ConfigError("--cache_features=DIR is required for the feature cache.")
    self.config = config
    self.resolved = resolved or backbones.resolve(config.backbone)
    self.key, self.details = fingerprint(config, self.resolved)
    self.root = os.path.join(config.input.cache_features, self.key)
    model_dir = config.run.model_dir
    self.model_dir_root = os.path.join(model_dir, MODEL_DIR_SUBDIR) if model_dir else ""
    self._extractor = None

  @property
  def snapshot_dir(self) -> str:
    return os.path.join(self.root, SNAPSHOT_DIRNAME)

  @property
  def pinned_snapshot_dir(self) -> str:
    return os.path.join(self.model_dir_root, SNAPSHOT_DIRNAME) if self.model_dir_root else ""

  def _unit_paths(self, unit: Unit) -> Tuple[str, str]:
    base = os.path.join(self.root, UNITS_DIRNAME, unit.key)
    return base + ".tfrecord", base + ".json"

  def _extractor_for(self) -> _Extractor:
    if self._extractor is None:
      self._extractor = _Extractor(self.config, self.resolved)
    return self._extractor

  def close(self) -> None:
    """Frees the extraction graph and session (rebuilt when needed again)."""
    if self._extractor is not None:
      self._extractor.close()
      self._extractor = None

  # --- snapshot --------------------------------------------------------------

  def snapshot(self, pin: bool = False) -> Snapshot:
    """The snapshot the cache computes with: found, restored from the pin, or made.

    Args:
      pin: also pin it into model_dir (training does).

    Raises:
      ConfigError: model_dir pins another snapshot than the cache holds.
    """
    tf.io.gfile.makedirs(self.root)
    _remove_stale_temps(self.root)
    if not tf.io.gfile.exists(os.path.join(self.root, KEY_FILENAME)):
      _write_text(os.path.join(self.root, KEY_FILENAME),
                  json.dumps(self.details, indent=1, sort_keys=True))
    cached = read_snapshot(self.snapshot_dir)
    pinned = read_snapshot(self.pinned_snapshot_dir) if self.model_dir_root else None
    if cached is None:
      tmp = f"{self.snapshot_dir}{_TMP}{uuid.uuid4().hex[:8]}"
      if pinned is not None:
        # The cache was deleted: rebuild it from the values the head knows.
        _copy_dir(pinned.directory, tmp)
      else:
        tf.io.gfile.makedirs(tmp)
        log.info("feature cache: writing the backbone snapshot of %s into %s",
                 self.resolved.description, self.snapshot_dir)
        self._extractor_for().new_snapshot(tmp, self.details)
      _publish_dir(tmp, self.snapshot_dir)  # or another writer's went first
      cached = read_snapshot(self.snapshot_dir)
      if cached is None:
        raise ConfigError(f"the backbone snapshot {self.snapshot_dir} is incomplete; "
                          "delete it to rebuild it.")
    if pinned is not None and pinned.id != cached.id:
      raise ConfigError(
          f"{self.config.run.model_dir} was trained on features of backbone snapshot "
          f"{pinned.id} but the feature cache {self.root} now holds {cached.id} (it "
          "was rebuilt with other backbone values, e.g. new random weights); start a "
          f"new --model_dir, or delete {self.snapshot_dir} to rebuild the cache from "
          "the model's snapshot.")
    if pinned is None and self.model_dir_root:
      self._check_checkpoint_agrees(cached)
    if pin and pinned is None and self.model_dir_root:
      tmp = f"{self.pinned_snapshot_dir}{_TMP}{uuid.uuid4().hex[:8]}"
      _copy_dir(cached.directory, tmp)
      _publish_dir(tmp, self.pinned_snapshot_dir)
      pinned = read_snapshot(self.pinned_snapshot_dir)
      if pinned is None or pinned.id != cached.id:
        raise ConfigError(f"{self.pinned_snapshot_dir} could not be written or "
                          "holds another snapshot; start a new --model_dir.")
    return cached

  def _check_checkpoint_agrees(self, snapshot: Snapshot) -> None:
    """A model_dir trained without the cache must hold the snapshot's values.

    Otherwise (e.g. random backbone weights drawn twice) its head would train
    on, or be evaluated on, features of another backbone than its own.
    """
    latest = tf.train.latest_checkpoint(self.config.run.model_dir)
    if not latest:
      return
    try:
      reader = tf.train.load_checkpoint(latest)
    except (tf.errors.OpError, ValueError):
      return  # a broken checkpoint: the resume logic reports or skips it
    names = reader.get_variable_to_shape_map()
    snapshot_reader = tf.train.load_checkpoint(snapshot.prefix)
    for name in snapshot_reader.get_variable_to_shape_map():
      if name in names and not np.array_equal(reader.get_tensor(name),
                                              snapshot_reader.get_tensor(name)):
        raise ConfigError(
            f"the checkpoint {latest} holds other backbone values ({name}) than the "
            f"feature cache's snapshot {snapshot.directory}; start a new --model_dir "
            f"(--warm_start_from={self.config.run.model_dir} keeps the head) or train "
            "it without --cache_features.")

  # --- units -----------------------------------------------------------------

  def _is_done(self, unit: Unit, snapshot: Snapshot) -> Optional[dict]:
    path, marker_path = self._unit_paths(unit)
    marker = _read_json(marker_path)
    if not marker or marker.get("snapshot") != snapshot.id or \
        marker.get("feature_dim") != snapshot.feature_dim:
      return None
    try:
      if tf.io.gfile.stat(path).length != marker.get("bytes"):
        return None
    except tf.errors.NotFoundError:
      return None
    return marker

  def _compute(self, unit: Unit, snapshot: Snapshot, class_names: Sequence[str],
               num_classes: int) -> dict:
    extractor = self._extractor_for()
    extractor.use(snapshot)
    features, labels = extractor.run(unit, class_names)
    bound = max(num_classes, len(class_names))
    wrong = (labels < 0) | ((labels >= bound) if bound else False)
    if wrong.any():
      detail = ("a class name that is not in the label map" if unit.label_is_text
                else f"label {labels[wrong][0]}, outside [0, {bound or 'num_classes'})")
      raise ConfigError(f"{unit.describe} has {detail}; fix the data, --label_map "
                        "or --num_classes.")
    total = (sum(_count_records(f) for f in unit.files) if unit.kind == "tfrecord"
             else len(unit.files))
    skipped = max(0, total - len(labels))
    if skipped:
      log.warning("feature cache: skipped %d corrupt record(s) of %s "
                  "(--on_bad_record=skip)", skipped, unit.describe)
    path, marker_path = self._unit_paths(unit)
    tmp = f"{path}{_TMP}{uuid.uuid4().hex[:8]}"
    with tf.io.TFRecordWriter(tmp) as writer:
      for f, l in zip(features, labels):
        writer.write(_example(f, l))
    tf.io.gfile.rename(tmp, path, overwrite=True)
    marker = {"count": int(len(labels)), "skipped": int(skipped),
              "bytes": int(tf.io.gfile.stat(path).length), "snapshot": snapshot.id,
              "feature_dim": snapshot.feature_dim, "source": unit.describe,
              "copy": unit.copy,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_text(marker_path, json.dumps(marker, indent=1))  # last: the unit is done
    return marker

  def prepare(self, data: str, training: bool, class_names: Sequence[str] = (),
              num_classes: int = 0) -> CachedData:
    """Computes what is missing of `data`'s features; returns where they are.

    Args:
      data: TFRecords (file, glob, dir) or an image folder.
      training: the training data (augmented copies with K > 0; pins the
        snapshot into model_dir).
      class_names: the label map (text labels, class folders; bounds labels).
      num_classes: bounds int labels without a label map (0: unchecked).

    Raises:
      ConfigError: the data cannot be read or has a wrong label or, with
        --on_bad_record=fail, a corrupt record; a snapshot mismatch.
    """
    units = list_units(self.config, data, training, class_names)
    snapshot = self.snapshot(pin=training)
    units_dir = os.path.join(self.root, UNITS_DIRNAME)
    tf.io.gfile.makedirs(units_dir)
    _remove_stale_temps(units_dir)
    markers = {u.key: self._is_done(u, snapshot) for u in units}
    missing = [u for u in units if markers[u.key] is None]
    computed, compute_seconds = 0, 0.0
    if missing:
      log.info("feature cache %s: %d of %d units of %s to compute (%s)", self.root,
               len(missing), len(units), data, self.resolved.description)
      # Random order: concurrent writers mostly take different units.
      random.SystemRandom().shuffle(missing)
      examples = 0
      for n, unit in enumerate(missing):
        markers[unit.key] = self._is_done(unit, snapshot)  # another writer's?
        if markers[unit.key] is None:
          self._extractor_for().use(snapshot)  # graph built before the clock starts
          unit_start = time.time()
          markers[unit.key] = self._compute(unit, snapshot, class_names, num_classes)
          compute_seconds += time.time() - unit_start
          computed += 1
          examples += markers[unit.key]["count"]
        log.info("feature cache: %d/%d units, %d examples, %.0f examples/s", n + 1,
                 len(missing), examples, examples / max(compute_seconds, 1e-9))
    counts = [int(markers[u.key]["count"]) for u in units]
    if not sum(counts):
      raise ConfigError(f"no example of {data} could be read for the feature cache; "
                        "check the data (and --image_key/--label_key).")
    return CachedData([self._unit_paths(u)[0] for u in units], counts,
                      snapshot.feature_dim, computed, units, compute_seconds)

  # --- export ------------------------------------------------------------------

  def full_checkpoint(self, head_checkpoint: str) -> str:
    """An ordinary checkpoint of the full model: pinned backbone + `head_checkpoint`.

    Every tensor of the head checkpoint (head, EMA averages, optimizer state,
    global step) is kept; the backbone's values are the snapshot the head
    was trained on. Written once per head checkpoint (under a temporary
    name, then renamed) into model_dir/feature_cache/full/; the newest
    keep_checkpoint_max are kept.

    Raises:
      ConfigError: model_dir pins no snapshot (not trained with the cache).
    """
    pinned = read_snapshot(self.pinned_snapshot_dir) if self.model_dir_root else None
    if pinned is None:
      raise ConfigError(
          f"{self.config.run.model_dir} holds no backbone snapshot "
          f"({MODEL_DIR_SUBDIR}/{SNAPSHOT_DIRNAME}/), so it was not trained with "
          "--cache_features; export it without --cache_features.")
    name = os.path.basename(head_checkpoint)
    stat = tf.io.gfile.stat(head_checkpoint + ".index")
    tag = hashlib.sha1(json.dumps([_abs(head_checkpoint), stat.length, stat.mtime_nsec,
                                   pinned.id]).encode()).hexdigest()[:10]
    full_root = os.path.join(self.model_dir_root, FULL_DIRNAME)
    final = os.path.join(full_root, f"{name}-{tag}")
    if tf.io.gfile.exists(os.path.join(final, name + ".index")):
      return os.path.join(final, name)
    values = _read_checkpoint(pinned.prefix)
    values.update(_read_checkpoint(head_checkpoint))
    tf.io.gfile.makedirs(full_root)
    _remove_stale_temps(full_root)
    tmp = f"{final}{_TMP}{uuid.uuid4().hex[:8]}"
    tf.io.gfile.makedirs(tmp)
    _write_checkpoint(os.path.join(tmp, name), values)
    _publish_dir(tmp, final)
    log.info("feature cache: composed %s (backbone snapshot %s + %s)", final, pinned.id,
             head_checkpoint)
    self._prune(full_root)
    return os.path.join(final, name)

  def _prune(self, full_root: str) -> None:
    keep = max(2, self.config.run.keep_checkpoint_max)
    entries = []
    for entry in tf.io.gfile.listdir(full_root):
      entry = entry.rstrip("/")
      if _TMP in entry:
        continue
      path = os.path.join(full_root, entry)
      entries.append((tf.io.gfile.stat(path).mtime_nsec, path))
    for _, path in sorted(entries)[:-keep]:
      tf.io.gfile.rmtree(path)


# --- input_fn -------------------------------------------------------------------


def build_input_fn(cache: FeatureCache, data: str, training: bool,
                   seed: Optional[int] = None, num_epochs: Optional[int] = None, *,
                   class_names: Sequence[str] = (), num_classes: int = 0):
  """An Estimator input_fn over `data`'s cached features (computed now if missing).

  Yields ({"backbone_features": float32 [batch, D]}, int32 labels [batch]).
  Training shuffles (every cached example, when they fit in 1 GiB of memory;
  else the files and a --shuffle_buffer window), repeats and, under
  TF_CONFIG, takes this worker's files (or records, with fewer files than
  workers); evaluation reads everything once, in order.

  Args:
    cache: the FeatureCache.
    data: TFRecords (file, glob, dir) or an image folder.
    training: shuffle, repeat, shard by worker; augmented copies (K > 0).
    seed: shuffle seed; None: nondeterministic.
    num_epochs: epochs when training (None: forever).
    class_names: the data's label map.
    num_classes: bounds int labels without a label map.

  Raises:
    ConfigError: see `FeatureCache.prepare`.
  """
  cached = cache.prepare(data, training, class_names, num_classes)
  i = cache.config.input
  batch_size = i.batch_size if training else (i.eval_batch_size or i.batch_size)
  dim = cached.feature_dim
  spec = {FEATURE_KEY: tf.io.FixedLenFeature([dim], tf.float32),
          LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}

  # Plain graph code: autograph's conversion would only add tracing time.
  @tf.autograph.experimental.do_not_convert
  def parse(records):
    parsed = tf.io.parse_example(records, spec)
    return parsed[FEATURE_KEY], tf.cast(parsed[LABEL_KEY], tf.int32)

  @tf.autograph.experimental.do_not_convert
  def as_features(features, labels):
    return {CACHED_FEATURES_KEY: features}, labels

  @tf.autograph.experimental.do_not_convert
  def read(path):
    return tf.data.TFRecordDataset(path)

  def input_fn(params=None, config=None, input_context=None):
    del params
    files = [f for f, c in zip(cached.files, cached.counts) if c]
    total = sum(c for c in cached.counts if c)
    if not training:
      ds = tf.data.TFRecordDataset(files).batch(batch_size).map(parse)
      return ds.map(as_features).prefetch(tf.data.AUTOTUNE)
    # pylint: disable=protected-access
    num_shards, index = input_fns._shard_spec(config, input_context)
    # pylint: enable=protected-access
    record_shards = num_shards > 1 and len(files) < num_shards
    if num_shards > 1 and not record_shards:
      files = files[index::num_shards]
      total = sum(c for f, c in zip(cached.files, cached.counts) if f in set(files))
    in_memory = total * dim * 4 <= _IN_MEMORY_BYTES
    shuffle = i.shuffle_buffer > 0
    file_ds = tf.data.Dataset.from_tensor_slices(files)
    if not in_memory:
      # Too big to hold: a new file order every epoch, then a window shuffle.
      if shuffle:
        file_ds = file_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
      file_ds = file_ds.repeat(num_epochs)
    ds = file_ds.flat_map(read)
    if record_shards:
      ds = ds.shard(num_shards, index)
    ds = ds.batch(1024).map(parse, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
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
    return ds.batch(batch_size).map(as_features).prefetch(tf.data.AUTOTUNE)

  input_fn.cached = cached
  return input_fn
