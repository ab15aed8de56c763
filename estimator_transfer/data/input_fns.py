"""input_fns over TFRecords of tf.Example, image folders, CSV files and arrays.

Image sources yield ({"image": float32 [batch, size, size, 3] in [0, 1]},
int32 labels) through the same `preprocessing.decode_and_resize` the export
uses; training may add augmentation after it (`augment.py`) and, with mixup,
float32 [batch, num_classes] soft labels. CSV and numeric arrays yield
({"features": float32 [batch, n]}, int32 labels).

How the pipeline is laid out (and why):

* The data is split into units (a TFRecord or CSV file, or a chunk of 64
  image files). When training, the units (and a folder's files) are permuted
  per epoch and records are permuted within windows of each unit, with
  stateless seeds, so `--seed` fixes the order whatever the parallelism;
  under TF_CONFIG each worker takes every n-th file (or, with fewer files
  than workers, every n-th record). A parallel interleave reads the units.
* Inside a unit, records are numbered and decoded by a parallel map that keeps
  their order, then `ignore_errors` drops a record that cannot be parsed or
  decoded; a scan sees the hole in the numbering. A TFRecord file whose bytes
  were not all read (truncated or corrupt framing: TensorFlow skips the rest
  of such a file) counts as one more bad record.
* Per element only integers travel along; once per batch (`_settle`) the
  skipped records are counted (`bad_records.py`), logged by file, or, with
  `--on_bad_record=fail`, turned into an error naming them; labels are checked
  against the label map there too, so a wrong label stops training with the
  record's name instead of becoming a silent wrong class.
"""
import dataclasses
import hashlib
import io
import os
import random
import sys
from concurrent import futures
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from estimator_transfer.errors import ConfigError

from estimator_transfer.config import InputConfig
from estimator_transfer.data import augment as augment_lib
from estimator_transfer.data import bad_records
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import preprocessing
from estimator_transfer.data import tfrecords

IMAGE_FEATURE = "image"
NUMERIC_FEATURE = "features"
FOLDER_CHUNK = 64  # image files per interleaved unit
_RECORD, _TAIL, _END = 0, 1, 2  # element kinds inside a unit
_INSPECT_RECORDS = 5
_INSPECT_FILES = 20


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


def list_image_folder(path: str, class_names: Sequence[str] = ()
                      ) -> Tuple[List[str], List[int], List[str]]:
  """Lists images under class sub-folders (recursively); skips hidden files.

  Args:
    path: the folder with one sub-folder per class.
    class_names: the label map; ids are positions in it. Empty: ids of the
      sorted folder names.

  Returns:
    (file paths, label ids, class folder names).

  Raises:
    ConfigError: no class folders, no images, or a folder not in the label map.
  """
  names = labels_lib.folder_class_names(path)
  if not names:
    raise ConfigError(f"{path} has no class sub-folders; put the images of each "
                      "class in their own folder (e.g. data/cats/*.jpg).")
  ids = labels_lib.label_ids(names, tuple(class_names), f"class folder of {path}")
  files, file_ids = [], []
  for name, label in zip(names, ids):
    for root, dirs, filenames in tf.io.gfile.walk(os.path.join(path, name)):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for filename in sorted(filenames):
        if filename.startswith("."):
          continue
        if filename.lower().endswith(labels_lib.IMAGE_EXTENSIONS):
          files.append(os.path.join(root, filename))
          file_ids.append(label)
  if not files:
    raise ConfigError(f"no images (jpg, png, gif, bmp) found under {path}; check "
                      "the folder.")
  return files, file_ids, names


def is_csv(data: str) -> bool:
  return data.lower().endswith(".csv")


def list_csv_files(data: str) -> List[str]:
  files = sorted(tf.io.gfile.glob(data)) if any(c in data for c in "*?[") else (
      [data] if tf.io.gfile.exists(data) else [])
  if not files:
    raise ConfigError(f"no CSV file found at {data}; give a file or a glob such "
                      "as data/train-*.csv.")
  return files


@dataclasses.dataclass(frozen=True)
class _Source:
  """What one data spec resolved to (plain Python, built once per input_fn)."""
  kind: str  # tfrecord | folder | csv
  files: Tuple[str, ...]
  sizes: Tuple[int, ...] = ()  # tfrecord: bytes per file (truncation check)
  labels: Tuple[int, ...] = ()  # folder: label id per file
  label_is_text: bool = False
  class_names: Tuple[str, ...] = ()
  csv_columns: Tuple[str, ...] = ()
  csv_label_index: int = -1


def _file_sizes(files: Sequence[str]) -> List[int]:
  # One stat per shard; threads hide the latency of remote file systems.
  with futures.ThreadPoolExecutor(max_workers=16) as pool:
    return list(pool.map(lambda f: tf.io.gfile.stat(f).length, files))


def _inspect_tfrecords(files: Sequence[str], sizes: Sequence[int],
                       config: InputConfig) -> bool:
  """Checks the feature keys on the first records; True for text labels.

  Raises:
    ConfigError: the keys are missing or of the wrong type, or no record is
      readable, naming the file and the keys it has.
  """
  examples, where = [], ""
  for path, size in list(zip(files, sizes))[:_INSPECT_FILES]:
    if not size:
      continue
    for raw in tfrecords.read_records(path, _INSPECT_RECORDS):
      try:
        examples.append(tf.train.Example.FromString(raw))
        where = where or path
      except Exception:  # pylint: disable=broad-except
        continue  # a corrupt record: the pipeline will count it
    if examples:
      break
  if not examples:
    if not any(sizes):
      raise ConfigError(f"the TFRecord files {files[0]}... are all empty; "
                        "re-create them (et-prepare-data).")
    raise ConfigError(f"no tf.Example could be read from the first records of "
                      f"{files[0]}; check that the data is uncompressed TFRecord "
                      "files of tf.Example.")
  kinds = tfrecords.feature_kinds(examples[0])
  available = ", ".join(sorted(kinds)) or "none"
  if kinds.get(config.image_key) != "bytes":
    raise ConfigError(f"records of {where} have no bytes feature "
                      f"'{config.image_key}' (their features: {available}); set "
                      "--image_key to the key of the encoded image.")
  label_kind = kinds.get(config.label_key)
  if label_kind not in ("int64", "bytes"):
    hint = (f" (e.g. --label_key={tfrecords.TEXT_KEY})"
            if kinds.get(tfrecords.TEXT_KEY) == "bytes" else "")
    raise ConfigError(f"records of {where} have no int64 or text label "
                      f"'{config.label_key}' (their features: {available}); set "
                      f"--label_key{hint}.")
  feature = examples[0].features.feature
  counts = {key: len(getattr(feature[key], feature[key].WhichOneof("kind")).value)
            for key in (config.image_key, config.label_key)}
  if any(n != 1 for n in counts.values()):
    raise ConfigError(f"records of {where} hold {counts[config.image_key]} image(s) and "
                      f"{counts[config.label_key]} label(s) under --image_key / "
                      "--label_key; these input_fns read exactly one of each.")
  images = [e.features.feature[config.image_key].bytes_list.value[:1]
            for e in examples]
  if not any(v and _looks_like_image(v[0]) for v in images):
    raise ConfigError(f"the '{config.image_key}' feature of the first records of "
                      f"{where} is not a JPEG, PNG, GIF or BMP image; check "
                      "--image_key.")
  return label_kind == "bytes"


def _looks_like_image(data: bytes) -> bool:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as image:
      return image.format in ("JPEG", "PNG", "GIF", "BMP")
  except Exception:  # pylint: disable=broad-except
    return False


def _inspect_csv(files: Sequence[str], label_column: str) -> Tuple[Tuple[str, ...], int, bool]:
  with tf.io.gfile.GFile(files[0]) as f:
    header = f.readline().strip()
    first = f.readline().strip()
  columns = tuple(c.strip() for c in header.split(","))
  if label_column not in columns:
    raise ConfigError(f"{files[0]} has no column '{label_column}' in its header "
                      f"({header[:200]}); set --csv_label_column.")
  index = columns.index(label_column)
  values = first.split(",")
  if len(values) != len(columns):
    raise ConfigError(f"line 2 of {files[0]} has {len(values)} values for "
                      f"{len(columns)} header columns; fix the file.")
  try:
    int(values[index])
    text = False
  except ValueError:
    text = True
  return columns, index, text


def resolve_source(config: InputConfig, data: str,
                   class_names: Sequence[str] = ()) -> _Source:
  """Resolves a data spec (files, label kind, label map) once, in Python.

  Raises:
    ConfigError: nothing found, or keys/labels do not fit the data.
  """
  if not data:
    raise ConfigError("no data was given; set --train_data / --eval_data.")
  class_names = tuple(class_names or ())
  if labels_lib.is_image_folder(data):
    files, ids, _ = list_image_folder(data, class_names)
    return _Source("folder", tuple(files), labels=tuple(ids), class_names=class_names)
  if is_csv(data):
    files = list_csv_files(data)
    columns, index, text = _inspect_csv(files, config.csv_label_column)
    class_names = class_names or tuple(labels_lib.class_names_for(data) or ())
    if text and not class_names:
      raise ConfigError(f"the '{config.csv_label_column}' column of {files[0]} "
                        "holds class names; give --label_map (one name per line).")
    return _Source("csv", tuple(files), label_is_text=text, class_names=class_names,
                   csv_columns=columns, csv_label_index=index)
  files = list_tfrecord_files(data)
  sizes = _file_sizes(files)
  text = _inspect_tfrecords(files, sizes, config)
  if text and not class_names:
    class_names = tuple(labels_lib.class_names_for(data) or ())
    if not class_names:
      raise ConfigError(f"the records' labels ('{config.label_key}') are class "
                        "names; give --label_map or put labels.txt next to the data.")
  return _Source("tfrecord", tuple(files), sizes=tuple(sizes), label_is_text=text,
                 class_names=class_names)


def _shard_spec(run_config, input_context) -> Tuple[int, int]:
  """(number of input pipelines, this one's index) for disjoint worker data."""
  if input_context is not None and input_context.num_input_pipelines > 1:
    return input_context.num_input_pipelines, input_context.input_pipeline_id
  if run_config is not None:
    workers = getattr(run_config, "num_worker_replicas", 1) or 1
    index = getattr(run_config, "global_id_in_cluster", None)
    if workers > 1 and index is not None and index < workers:
      return workers, index
  return 1, 0


def _text_to_id(text, class_names):
  names = tf.constant(list(class_names))
  ids = tf.range(len(class_names), dtype=tf.int32)
  return tf.reduce_max(tf.where(tf.equal(names, text), ids, -1))


class _Pipeline:
  """Builds the tf.data graph for one _Source (see the module docstring)."""

  def __init__(self, source: _Source, config: InputConfig, image_size: int,
               training: bool, seed: Optional[int], num_epochs: Optional[int],
               num_classes: int):
    self.source = source
    self.config = config
    self.image_size = image_size
    self.training = training
    self.seed = seed
    self.num_epochs = num_epochs
    self.num_classes = max(num_classes, len(source.class_names))
    self.parallel = (tf.data.AUTOTUNE if config.num_parallel_calls < 0
                     else config.num_parallel_calls)
    self.deterministic = seed is not None or not training
    self.fail = config.on_bad_record == "fail"
    self.base_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    # Ends a TFRecord file's stream; no real record equals 32 random bytes.
    self.nonce = os.urandom(32)
    if source.kind == "csv":
      self.feature_key = NUMERIC_FEATURE
      self.value_shape = [len(source.csv_columns) - 1]
    else:
      self.feature_key = IMAGE_FEATURE
      self.value_shape = [image_size, image_size, 3]

  # --- decoding one record ---------------------------------------------------

  def _decode(self, payload, label):
    """(value, label id, label text) of one record; raises if it is corrupt."""
    s = self.source
    if s.kind == "folder":
      image = preprocessing.decode_and_resize(tf.io.read_file(payload), self.image_size)
      return image, label, tf.constant("")
    if s.kind == "csv":
      # Every value is required: an empty or non-numeric cell is a bad record.
      fields = tf.io.decode_csv(payload, record_defaults=[
          tf.constant([], tf.string) if i == s.csv_label_index
          else tf.constant([], tf.float32) for i in range(len(s.csv_columns))])
      values = [f for i, f in enumerate(fields) if i != s.csv_label_index]
      raw = fields[s.csv_label_index]
      if s.label_is_text:
        return tf.stack(values), _text_to_id(raw, s.class_names), raw
      return tf.stack(values), tf.strings.to_number(raw, tf.int32), tf.constant("")
    c = self.config
    keys = {c.image_key: tf.io.FixedLenFeature([], tf.string),
            c.label_key: tf.io.FixedLenFeature(
                [], tf.string if s.label_is_text else tf.int64)}
    parsed = tf.io.parse_single_example(payload, keys)
    image = preprocessing.decode_and_resize(parsed[c.image_key], self.image_size)
    if s.label_is_text:
      text = parsed[c.label_key]
      return image, _text_to_id(text, s.class_names), text
    return image, tf.cast(parsed[c.label_key], tf.int32), tf.constant("")

  # --- one unit: records -> examples with their status -----------------------
  #
  # Every element carries a status (kind, skipped, first, index, unit, detail):
  # `skipped` records were dropped just before it (the first of them at
  # position `first` of the unit), `index` is its own record number, `unit`
  # its file, `detail` the text label (or, for folders, the path of the first
  # skipped file). Only integer arithmetic runs per element; messages, the
  # counter and assertions run once per batch (`_settle`), which keeps the
  # bookkeeping off the per-image cost.

  def _marker_payload(self):
    """A record that decodes: markers go through the same decode, no tf.cond."""
    s = self.source
    if s.kind == "csv":
      return ",".join("0" for _ in s.csv_columns)
    from PIL import Image  # pylint: disable=g-import-not-at-top
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    label = (tf.train.Feature(bytes_list=tf.train.BytesList(value=[b""]))
             if s.label_is_text else
             tf.train.Feature(int64_list=tf.train.Int64List(value=[0])))
    return tf.train.Example(features=tf.train.Features(feature={
        self.config.image_key: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[buf.getvalue()])),
        self.config.label_key: label})).SerializeToString()

  def _unit(self, unit_id, names, labels, size, epoch, shards):
    """One unit's examples: (value, label, status) with kind _RECORD, plus the
    markers that carry skipped records."""
    s = self.source
    num_shards, shard_index = shards
    marker = tf.constant("" if s.kind == "folder" else self._marker_payload())
    no_label = tf.constant(-1, tf.int32)
    if s.kind == "folder":
      count = tf.size(names, tf.int64)
      raw = tf.data.Dataset.from_tensor_slices((
          names, labels, tf.fill([count], _RECORD), tf.range(count)))
    else:
      if s.kind == "csv":
        raw = tf.data.TextLineDataset(names[0]).skip(1).ignore_errors()
      else:
        # After a DataLoss error TensorFlow moves on to the next file, so
        # ignore_errors drops the unreadable rest of this one; the byte count
        # below notices it. The nonce marks the end of the file.
        raw = tf.data.TFRecordDataset(names[0], buffer_size=1 << 20).ignore_errors()
        raw = raw.concatenate(tf.data.Dataset.from_tensors(tf.constant(self.nonce)))
      shuffled = self.training and self.config.shuffle_buffer > 0
      # Records are numbered (and, when training, sharded and permuted) a
      # window at a time: one function call per window, not per record. The
      # window is this unit's share of --shuffle_buffer; the interleave then
      # mixes the units.
      window = max(2, self.config.shuffle_buffer // self._cycle_length()) if shuffled else 256
      record_sharded = self._record_sharded(num_shards)
      seed = self._stateless_seed(epoch, unit_id, 2)

      def number(state, payloads):
        index, read, w = state
        kind = tf.fill(tf.shape(payloads), _RECORD)
        if s.kind == "tfrecord":
          # The tail counts as a bad record only when the file's bytes were
          # not all read; otherwise it becomes a no-op marker.
          tail = tf.equal(payloads, self.nonce)
          # TFRecord framing: 8 bytes length, 4 + 4 bytes CRCs around the data.
          sizes = tf.cast(tf.strings.length(payloads), tf.int64) + 16
          before = read + tf.cumsum(sizes, exclusive=True)
          kind = tf.where(tail, tf.where(tf.not_equal(before, size), _TAIL, _END), kind)
          payloads = tf.where(tail, marker, payloads)
          read += tf.reduce_sum(sizes)
        is_record = tf.cast(tf.equal(kind, _RECORD), tf.int64)
        indices = index + tf.cumsum(is_record, exclusive=True)
        parts = (payloads, tf.fill(tf.shape(payloads), -1), kind, indices)
        if record_sharded:
          keep = tf.logical_or(tf.not_equal(kind, _RECORD),
                               tf.equal(indices % num_shards, shard_index))
          parts = tuple(tf.boolean_mask(p, keep) for p in parts)
        if shuffled:
          parts = self._permuted(parts, seed + tf.stack([tf.constant(0, tf.int64), w * 7]))
        return (index + tf.reduce_sum(is_record), read, w + 1), parts

      raw = raw.batch(window).scan(
          (tf.constant(0, tf.int64), tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
          number).unbatch()
    raw = raw.concatenate(tf.data.Dataset.from_tensors(
        (marker, no_label, tf.constant(_END), tf.constant(-1, tf.int64))))

    zeros = tf.zeros(self.value_shape, tf.float32)

    def decode(seq, element):
      payload, label, kind, index = element
      if s.kind == "folder":  # reading a file: the cond costs nothing next to it
        value, label_id, text = tf.cond(
            tf.equal(kind, _RECORD), lambda: self._decode(payload, label),
            lambda: (zeros, no_label, tf.constant("")))
      else:
        value, label_id, text = self._decode(payload, label)
      value = tf.ensure_shape(value, self.value_shape)
      return seq, value, label_id, text, kind, index

    examples = raw.enumerate().map(decode, num_parallel_calls=self.parallel,
                                   deterministic=True)
    examples = examples.ignore_errors()
    unit = tf.cast(unit_id, tf.int64)

    def check(previous, element):
      seq, value, label_id, text, kind, index = element
      skipped = seq - previous - 1
      first = previous + 1
      detail = (tf.gather(names, tf.minimum(first, tf.size(names, tf.int64) - 1))
                if s.kind == "folder" else text)
      return seq, (value, label_id, (kind, skipped, first, index, unit, detail))

    examples = examples.scan(tf.constant(-1, tf.int64), check)
    return examples.filter(lambda v, l, st: tf.logical_or(
        tf.equal(st[0], _RECORD), tf.logical_or(st[1] > 0, tf.equal(st[0], _TAIL))))

  def _record_sharded(self, num_shards: int) -> bool:
    # Whole files go to workers when there are enough of them (see
    # _python_units); otherwise every worker reads every file and keeps every
    # num_shards-th record.
    return num_shards > 1 and self.source.kind != "folder" and \
        len(self.source.files) < num_shards

  def _settle(self, values, labels, status, exact: bool):
    """Per batch: count and report skipped records, check labels, drop markers."""
    kind, skipped, first, index, unit, detail = status
    s = self.source
    is_record = tf.equal(kind, _RECORD)
    truncated = tf.equal(kind, _TAIL)
    bad = skipped + tf.cast(truncated, tf.int64)
    total_bad = tf.reduce_sum(bad)
    ops = [self.counter.assign_add(total_bad)]
    # Folders name their files through `detail` (the list may be huge).
    files = tf.constant([""] if s.kind == "folder" else list(s.files))

    def file_of(units):
      return tf.gather(files, tf.minimum(units, files.shape[0] - 1))

    def describe_bad():
      file = file_of(unit)
      if s.kind == "folder":
        gap = detail
      elif exact:
        line = first + 2 if s.kind == "csv" else first
        gap = tf.strings.join(["line " if s.kind == "csv" else "record ",
                               tf.strings.as_string(line), " of ", file])
      else:
        gap = tf.strings.join([tf.strings.as_string(skipped), " record(s) of ", file])
      tail = tf.strings.join(["the rest of ", file, " after its first ",
                              tf.strings.as_string(index), " record(s) (a truncated or "
                              "corrupt TFRecord file)"])
      both = tf.where(skipped > 0, tf.strings.join([gap, " and ", tail]), tail)
      each = tf.where(truncated, both, gap)
      return tf.strings.reduce_join(tf.boolean_mask(each, bad > 0), separator="; ")

    if self.fail:
      def fail_bad():
        message = tf.strings.join([
            bad_records.ERROR_PREFIX, describe_bad(), " cannot be read or decoded; fix "
            "or remove it, or pass --on_bad_record=skip to skip and count such records."])
        return tf.debugging.Assert(tf.constant(False), [message])
      ops.append(tf.cond(total_bad > 0, fail_bad, tf.no_op))
    else:
      def print_bad():
        return tf.print(tf.strings.join([
            "estimator_transfer: skipped ", tf.strings.as_string(total_bad),
            " corrupt record(s): ", describe_bad()]), output_stream=sys.stderr)
      ops.append(tf.cond(total_bad > 0, print_bad, tf.no_op))
    if s.kind != "folder":
      out_of_range = labels < 0
      if self.num_classes:
        out_of_range |= labels >= self.num_classes
      wrong = is_record & out_of_range

      def label_error():
        i = tf.argmax(tf.cast(wrong, tf.int32))
        file = file_of(unit[i])
        name = tf.strings.join(["line " if s.kind == "csv" else "record ",
                                tf.strings.as_string(index[i] + (2 if s.kind == "csv" else 0)),
                                " of ", file])
        if s.label_is_text:
          message = tf.strings.join([
              bad_records.ERROR_PREFIX, name, " has label '", detail[i], "', which is "
              "not in the label map; add it to --label_map / labels.txt or fix the data."])
        else:
          message = tf.strings.join([
              bad_records.ERROR_PREFIX, name, " has label ", tf.strings.as_string(labels[i]),
              f", outside [0, {self.num_classes or 'num_classes'}); fix the data, "
              "--label_map or --num_classes."])
        return tf.debugging.Assert(tf.constant(False), [message])

      ops.append(tf.cond(tf.reduce_any(wrong), label_error, tf.no_op))
    with tf.control_dependencies(ops):
      all_records = tf.reduce_all(is_record)
      # Markers are rare (only where records were skipped): copy only then.
      values = tf.cond(all_records, lambda: tf.identity(values),
                       lambda: tf.boolean_mask(values, is_record))
      labels = tf.cond(all_records, lambda: tf.identity(labels),
                       lambda: tf.boolean_mask(labels, is_record))
    return values, labels

  # --- units, epochs, batching -----------------------------------------------

  def _cycle_length(self) -> int:
    units = len(self._units_python)
    if self.source.kind == "folder" and self.training:
      units = -(-len(self._units_python[0][0]) // FOLDER_CHUNK)
    return max(1, min(units, max(4, os.cpu_count() or 1)))

  def _stateless_seed(self, epoch, unit_id, salt: int):
    """int64 [2] seed for stateless shuffles of one (epoch, unit).

    Stateless ops instead of Dataset.shuffle(seed=tensor): the latter breaks
    when the graph-level seed is 0, and its order would depend on threads.
    """
    return tf.stack([tf.constant(self.base_seed, tf.int64),
                     tf.cast(epoch, tf.int64) * 1000003 + tf.cast(unit_id, tf.int64) * 31
                     + salt])

  @staticmethod
  def _permuted(tensors, seed):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(tf.shape(tensors[0])[0]), seed=seed)
    return tuple(tf.gather(t, order) for t in tensors)

  def _python_units(self, num_shards: int, shard_index: int):
    """Units as Python lists: (names, labels, size, id) per unit, this worker's share."""
    s = self.source
    if s.kind == "folder":
      pairs = list(zip(s.files, s.labels))
      if self.training and num_shards > 1:
        pairs = pairs[shard_index::num_shards]
      if self.training and pairs:
        # Folder units are rebuilt per epoch from the shuffled list (see
        # _epoch_units); here: one unit with every file.
        return [([p for p, _ in pairs], [l for _, l in pairs], -1, 0)]
      return [([p for p, _ in pairs[i:i + FOLDER_CHUNK]],
               [l for _, l in pairs[i:i + FOLDER_CHUNK]], -1, i // FOLDER_CHUNK)
              for i in range(0, len(pairs), FOLDER_CHUNK)]
    sizes = s.sizes or (-1,) * len(s.files)
    # The unit id is the file's index in the source: messages name it by that.
    units = [([f], [-1], size, i) for i, (f, size) in enumerate(zip(s.files, sizes))]
    if self.training and num_shards > 1 and len(units) >= num_shards:
      units = units[shard_index::num_shards]
    return units

  def _epoch_units(self, epoch):
    """This epoch's units, shuffled when training, as (id, names, labels, size)."""
    if self.source.kind == "folder" and self.training:
      (paths, ids, _, _), = self._units_python
      files = tf.data.Dataset.from_tensor_slices(self._permuted(
          (tf.constant(paths), tf.constant(ids, tf.int32)),
          self._stateless_seed(epoch, 0, 1)))
      chunks = files.batch(FOLDER_CHUNK)
      return chunks.enumerate().map(
          lambda i, c: (i, c[0], c[1], tf.constant(-1, tf.int64), epoch))
    units = self._units_python
    width = max(len(u[0]) for u in units)
    names = [u[0] + [""] * (width - len(u[0])) for u in units]
    labels = [u[1] + [-1] * (width - len(u[1])) for u in units]
    counts = [len(u[0]) for u in units]
    table = (tf.constant([u[3] for u in units], tf.int64), tf.constant(names),
             tf.constant(labels, tf.int32), tf.constant(counts, tf.int64),
             tf.constant([u[2] for u in units], tf.int64))
    if self.training:
      table = self._permuted(table, self._stateless_seed(epoch, 0, 1))
    ds = tf.data.Dataset.from_tensor_slices(table)
    return ds.map(lambda i, n, l, c, size: (i, n[:c], l[:c], size, epoch))

  def _one_pass_or_epochs(self, epochs, shards):
    units = epochs.flat_map(self._epoch_units)
    return units.interleave(
        lambda i, n, l, size, epoch: self._unit(i, n, l, size, epoch, shards),
        cycle_length=self._cycle_length(), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=self.deterministic)

  def dataset(self, batch_size: int, shards: Tuple[int, int]) -> tf.data.Dataset:
    """The batched dataset of (features, labels)."""
    self.counter = bad_records.get_or_create_counter()
    num_shards, shard_index = shards
    self._units_python = self._python_units(num_shards, shard_index)
    if not self._units_python or not any(u[0] for u in self._units_python):
      raise ConfigError(f"worker {shard_index} of {num_shards} has no data to read; "
                        "give more files or shards than workers.")
    cache = self.config.cache
    repeat_outside = not self.training or bool(cache)
    if repeat_outside:
      epochs = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))
    else:
      count = -1 if self.num_epochs is None else self.num_epochs
      epochs = tf.data.Dataset.range(count) if count >= 0 else \
          tf.data.Dataset.range(sys.maxsize)
    ds = self._one_pass_or_epochs(epochs, shards)
    if cache:
      ds = ds.cache("" if cache == "memory" else self._cache_path(shards))
      if self.training:
        if self.config.shuffle_buffer > 0:
          ds = ds.shuffle(self.config.shuffle_buffer, seed=self.seed,
                          reshuffle_each_iteration=True)
        ds = ds.repeat(self.num_epochs)
    if self.training:
      ds = self._augment(ds)
    ds = ds.batch(batch_size)
    exact = not (self.training and self.source.kind != "folder" and
                 self.config.shuffle_buffer > 0) and not self._record_sharded(num_shards)
    ds = ds.map(lambda v, l, st: self._settle(v, l, st, exact),
                num_parallel_calls=self.parallel, deterministic=self.deterministic)
    # A batch of nothing but skipped records (rare) is dropped, not trained on.
    ds = ds.filter(lambda v, l: tf.shape(l)[0] > 0)
    ds = ds.map(lambda v, l: ({self.feature_key: v}, l))
    if self.training and self.config.mixup_alpha > 0 and self.feature_key == IMAGE_FEATURE:
      ds = self._mixup(ds)
    options = tf.data.Options()
    options.deterministic = self.deterministic
    # One thread per tf.data op: the pipeline's parallelism comes from its
    # parallel maps and interleave, and it must not spread single ops over
    # the cores the training step needs (the tf.data performance guide's
    # advice; measured by scripts/benchmark.py --only=input).
    options.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(options)
    return prefetch(ds, self.config.prefetch)

  def _augment(self, ds):
    fn = augment_lib.build_augment_fn(self.config, self.image_size)
    if fn is None or self.feature_key != IMAGE_FEATURE:
      return ds
    base = self.base_seed + 1
    return ds.enumerate().map(
        lambda i, example: (fn(example[0], tf.stack([tf.constant(base, tf.int64), i])),
                            example[1], example[2]),
        num_parallel_calls=self.parallel, deterministic=self.deterministic)

  def _mixup(self, ds):
    alpha, num_classes = self.config.mixup_alpha, self.num_classes
    base = self.base_seed + 2

    def mix(i, batch):
      features, labels = batch
      images, soft = augment_lib.mixup(features[IMAGE_FEATURE], labels, num_classes,
                                       alpha, tf.stack([tf.constant(base, tf.int64), i]))
      return {IMAGE_FEATURE: images}, soft

    return ds.enumerate().map(mix, num_parallel_calls=self.parallel,
                              deterministic=self.deterministic)

  def _cache_path(self, shards) -> str:
    key = "|".join([self.source.kind, *self.source.files, str(self.image_size),
                    str(shards), str(self.training)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    directory = os.path.dirname(self.config.cache)
    if directory:
      tf.io.gfile.makedirs(directory)
    return f"{self.config.cache}-{'train' if self.training else 'eval'}-{digest}"


def _autograph_off():
  """Builds the pipeline's functions as written, without autograph's conversion.

  Every function here is plain graph code (tf.cond, tf.where; Python `if`s
  test Python values only), and converting them (and everything they call)
  took ~1.3 s of each input_fn call: of every start, and of every evaluation
  in the train/evaluate loop (scripts/benchmark.py --only=startup). A Python
  `if` on a tensor now fails loudly at tracing time instead of being
  converted. (Nested functions traced inside inherit the status.)
  """
  from tensorflow.python.autograph.core import ag_ctx  # pylint: disable=g-import-not-at-top
  return ag_ctx.ControlStatusCtx(status=ag_ctx.Status.DISABLED)


def prefetch(ds: tf.data.Dataset, batches: int) -> tf.data.Dataset:
  """`--prefetch`: batches prepared ahead of the step (-1: AUTOTUNE, 0: none)."""
  if batches == 0:
    return ds
  return ds.prefetch(tf.data.AUTOTUNE if batches < 0 else batches)


def build_input_fn(config: InputConfig, data: str, image_size: int,
                   training: bool, seed: Optional[int] = None,
                   num_epochs: Optional[int] = None, *,
                   class_names: Sequence[str] = (), num_classes: int = 0):
  """Returns an Estimator input_fn for TFRecords, an image folder or CSV files.

  Args:
    config: the input config (batch size, feature keys, parallelism, bad-record
      policy, cache, augmentation).
    data: TFRecord file/glob/dir, an image folder with class sub-folders, or a
      CSV file/glob (`*.csv`).
    image_size: the backbone's input size.
    training: shuffle, augment, shard by worker and repeat (for `num_epochs`,
      or forever when None).
    seed: seed of the order and the augmentations; None: nondeterministic.
    num_epochs: epochs when training; ignored for evaluation (one pass).
    class_names: the label map (line i = class i): maps class folders and text
      labels to ids and bounds int labels.
    num_classes: bounds int labels when there is no label map (0: unchecked).

  Returns:
    input_fn(params=None, config=None, input_context=None) -> tf.data.Dataset;
    Estimator passes its RunConfig as `config`, which gives the worker shard
    under TF_CONFIG.

  Raises:
    ConfigError: the data cannot be found or does not fit the keys/labels.
  """
  source = resolve_source(config, data, class_names)
  if training and config.mixup_alpha > 0 and max(num_classes,
                                                 len(source.class_names)) < 2:
    raise ConfigError("--mixup_alpha needs the number of classes; set --num_classes "
                      "or give a label map.")
  batch_size = config.batch_size if training else (config.eval_batch_size or
                                                   config.batch_size)

  def input_fn(params=None, config=None, input_context=None):  # pylint: disable=redefined-outer-name
    del params
    shards = _shard_spec(config, input_context) if training else (1, 0)
    pipeline = _Pipeline(source, input_config, image_size, training, seed, num_epochs,
                         num_classes)
    with _autograph_off():
      ds = pipeline.dataset(batch_size, shards)
    input_fn.bad_record_counter = pipeline.counter
    return ds

  input_config = config
  input_fn.source = source
  return input_fn


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
  is_image = features.ndim == 4
  if is_image and features.dtype != np.uint8 and features.size and (
      features.min() < 0 or features.max() > 1):
    raise ConfigError("float in-memory images must be in [0, 1]; scale them or pass "
                      "uint8 pixels.")
  size = image_size or (features.shape[1] if is_image else 0)
  batch_size = config.batch_size if training else (config.eval_batch_size or
                                                   config.batch_size)
  key = IMAGE_FEATURE if is_image else NUMERIC_FEATURE

  def prepare(value, label):
    if is_image:
      value = tf.image.convert_image_dtype(value, tf.float32)
      if value.shape[0] != size or value.shape[1] != size:
        value = tf.clip_by_value(tf.image.resize(value, [size, size], method="bilinear",
                                                 antialias=True), 0.0, 1.0)
    else:
      value = tf.cast(value, tf.float32)
    return value, tf.cast(label, tf.int32)

  def input_fn(params=None, config=None, input_context=None):  # pylint: disable=redefined-outer-name
    del params
    ds = tf.data.Dataset.from_tensor_slices((features, labels))
    if training:
      num_shards, index = _shard_spec(config, input_context)
      if num_shards > 1:
        ds = ds.shard(num_shards, index)
      if input_config.shuffle_buffer > 0:
        ds = ds.shuffle(min(len(labels), max(input_config.shuffle_buffer, 1)),
                        seed=seed, reshuffle_each_iteration=True)
      ds = ds.repeat(num_epochs)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if training and is_image:
      fn = augment_lib.build_augment_fn(input_config, size)
      if fn is not None:
        base = seed if seed is not None else random.SystemRandom().randrange(2**31)
        ds = ds.enumerate().map(
            lambda i, e: (fn(e[0], tf.stack([tf.constant(base, tf.int64), i])), e[1]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=seed is not None)
    ds = ds.batch(batch_size).map(lambda v, l: ({key: v}, l))
    if training and is_image and input_config.mixup_alpha > 0:
      base = (seed if seed is not None else random.SystemRandom().randrange(2**31)) + 1
      ds = ds.enumerate().map(lambda i, b: _mix(b[0], b[1], num_classes,
                                                input_config.mixup_alpha, base, i))
    return prefetch(ds, input_config.prefetch)

  def _mix(f, l, n, alpha, base, i):
    images, soft = augment_lib.mixup(f[IMAGE_FEATURE], l, n, alpha,
                                     tf.stack([tf.constant(base, tf.int64), i]))
    return {IMAGE_FEATURE: images}, soft

  input_config = config
  return input_fn
