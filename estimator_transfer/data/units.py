"""One unit of the input pipeline, and the per-batch settling of bad records.

A unit is a TFRecord or CSV file, or a chunk of image files (see
`pipeline.py` for how units are listed, shuffled and interleaved).

* Inside a unit, records are numbered (and, when training, sharded by record
  and permuted within windows, with stateless seeds) and decoded by a
  parallel map that keeps their order; then `ignore_errors` drops a record
  that cannot be parsed or decoded, and a scan sees the hole in the
  numbering. A TFRecord file whose bytes were not all read (truncated or
  corrupt framing: TensorFlow skips the rest of such a file) counts as one
  more bad record.
* Every element carries a status (kind, skipped, first, index, unit,
  detail): `skipped` records were dropped just before it (the first of them
  at position `first` of the unit), `index` is its own record number, `unit`
  its file, `detail` the text label (or, for folders, the path of the first
  skipped file). Only integer arithmetic runs per element.
* Once per batch `BatchSettler` counts the skipped records
  (`bad_records.py`), logs them by file or, with `--on_bad_record=fail`,
  turns them into an error naming them, and checks the labels against the
  label map, so a wrong label stops training with the record's name instead
  of becoming a silent wrong class. That keeps the bookkeeping off the
  per-image cost.
"""
import io
import sys

from PIL import Image
import tensorflow as tf

from estimator_transfer.config import InputConfig
from estimator_transfer.data import bad_records
from estimator_transfer.data import preprocessing
from estimator_transfer.data.sources import Source

RECORD, TAIL, END = 0, 1, 2  # element kinds inside a unit


def stateless_seed(base_seed: int, epoch, unit_id, salt: int):
  """int64 [2] seed for stateless shuffles of one (epoch, unit).

  Stateless ops instead of Dataset.shuffle(seed=tensor): the latter breaks
  when the graph-level seed is 0, and its order would depend on threads.
  """
  return tf.stack([tf.constant(base_seed, tf.int64),
                   tf.cast(epoch, tf.int64) * 1000003 + tf.cast(unit_id, tf.int64) * 31
                   + salt])


def permuted(tensors, seed):
  """The same stateless permutation of the first axis of every tensor."""
  order = tf.random.experimental.stateless_shuffle(
      tf.range(tf.shape(tensors[0])[0]), seed=seed)
  return tuple(tf.gather(t, order) for t in tensors)


def record_sharded(source: Source, num_shards: int) -> bool:
  """Whether workers share files and each keeps every num_shards-th record.

  Whole files go to workers when there are enough of them; otherwise every
  worker reads every file and keeps every num_shards-th record.
  """
  return num_shards > 1 and source.kind != "folder" and \
      len(source.files) < num_shards


def _text_to_id(text, class_names):
  names = tf.constant(list(class_names))
  ids = tf.range(len(class_names), dtype=tf.int32)
  return tf.reduce_max(tf.where(tf.equal(names, text), ids, -1))


class UnitReader:
  """Builds the dataset of one unit: (value, label, status) per element."""

  def __init__(self, source: Source, config: InputConfig, image_size: int,
               training: bool, parallel: int, cycle_length: int, base_seed: int,
               nonce: bytes, value_shape):
    self.source = source
    self.config = config
    self.image_size = image_size
    self.training = training
    self.parallel = parallel
    self.cycle_length = cycle_length
    self.base_seed = base_seed
    self.nonce = nonce  # ends a TFRecord file's stream
    self.value_shape = value_shape

  def decode(self, payload, label):
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
    # --label_offset: slim-style 1-based ids become 0-based class ids here, so
    # everything downstream (label checks, the head) sees the model's ids.
    label = tf.cast(parsed[c.label_key], tf.int32) - c.label_offset
    return image, label, tf.constant("")

  def _marker_payload(self):
    """A record that decodes: markers go through the same decode, no tf.cond."""
    s = self.source
    if s.kind == "csv":
      return ",".join("0" for _ in s.csv_columns)
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    label = (tf.train.Feature(bytes_list=tf.train.BytesList(value=[b""]))
             if s.label_is_text else
             tf.train.Feature(int64_list=tf.train.Int64List(value=[0])))
    return tf.train.Example(features=tf.train.Features(feature={
        self.config.image_key: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[buf.getvalue()])),
        self.config.label_key: label})).SerializeToString()

  def read(self, unit_id, names, labels, size, epoch, shards):
    """One unit's examples: (value, label, status) with kind RECORD, plus the
    markers that carry skipped records."""
    marker = tf.constant("" if self.source.kind == "folder" else self._marker_payload())
    if self.source.kind == "folder":
      count = tf.size(names, tf.int64)
      raw = tf.data.Dataset.from_tensor_slices((
          names, labels, tf.fill([count], RECORD), tf.range(count)))
    else:
      raw = self._numbered_records(names, unit_id, size, epoch, shards, marker)
    raw = raw.concatenate(tf.data.Dataset.from_tensors(
        (marker, tf.constant(-1, tf.int32), tf.constant(END), tf.constant(-1, tf.int64))))
    return self._decoded(raw, names, unit_id)

  def _numbered_records(self, names, unit_id, size, epoch, shards, marker):
    """A file's (payload, -1, kind, record number), sharded and permuted."""
    s = self.source
    num_shards, shard_index = shards
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
    window = max(2, self.config.shuffle_buffer // self.cycle_length) if shuffled else 256
    by_record = record_sharded(s, num_shards)
    seed = stateless_seed(self.base_seed, epoch, unit_id, 2)

    def number(state, payloads):
      index, read, w = state
      kind = tf.fill(tf.shape(payloads), RECORD)
      if s.kind == "tfrecord":
        # The tail counts as a bad record only when the file's bytes were
        # not all read; otherwise it becomes a no-op marker.
        tail = tf.equal(payloads, self.nonce)
        # TFRecord framing: 8 bytes length, 4 + 4 bytes CRCs around the data.
        sizes = tf.cast(tf.strings.length(payloads), tf.int64) + 16
        before = read + tf.cumsum(sizes, exclusive=True)
        kind = tf.where(tail, tf.where(tf.not_equal(before, size), TAIL, END), kind)
        payloads = tf.where(tail, marker, payloads)
        read += tf.reduce_sum(sizes)
      is_record = tf.cast(tf.equal(kind, RECORD), tf.int64)
      indices = index + tf.cumsum(is_record, exclusive=True)
      parts = (payloads, tf.fill(tf.shape(payloads), -1), kind, indices)
      if by_record:
        keep = tf.logical_or(tf.not_equal(kind, RECORD),
                             tf.equal(indices % num_shards, shard_index))
        parts = tuple(tf.boolean_mask(p, keep) for p in parts)
      if shuffled:
        parts = permuted(parts, seed + tf.stack([tf.constant(0, tf.int64), w * 7]))
      return (index + tf.reduce_sum(is_record), read, w + 1), parts

    return raw.batch(window).scan(
        (tf.constant(0, tf.int64), tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
        number).unbatch()

  def _decoded(self, raw, names, unit_id):
    """Decodes in order, drops what fails, and notes the holes it leaves."""
    s = self.source
    zeros = tf.zeros(self.value_shape, tf.float32)
    no_label = tf.constant(-1, tf.int32)

    def decode(seq, element):
      payload, label, kind, index = element
      if s.kind == "folder":  # reading a file: the cond costs nothing next to it
        value, label_id, text = tf.cond(
            tf.equal(kind, RECORD), lambda: self.decode(payload, label),
            lambda: (zeros, no_label, tf.constant("")))
      else:
        value, label_id, text = self.decode(payload, label)
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
        tf.equal(st[0], RECORD), tf.logical_or(st[1] > 0, tf.equal(st[0], TAIL))))


class BatchSettler:
  """Per batch: counts and reports skipped records, checks labels, drops markers."""

  def __init__(self, source: Source, counter, fail: bool, num_classes: int,
               exact: bool):
    """Args: `exact`: record numbers name the skipped records (no shuffle,
    no record sharding); otherwise a count per file does."""
    self.source = source
    self.counter = counter
    self.fail = fail
    self.num_classes = num_classes
    self.exact = exact

  def __call__(self, values, labels, status):
    kind, skipped, _, _, _, _ = status
    is_record = tf.equal(kind, RECORD)
    bad = skipped + tf.cast(tf.equal(kind, TAIL), tf.int64)
    total_bad = tf.reduce_sum(bad)
    # Folders name their files through `detail` (the list may be huge).
    files = tf.constant([""] if self.source.kind == "folder" else list(self.source.files))
    ops = [self.counter.assign_add(total_bad),
           self._report_bad(status, bad, total_bad, files)]
    if self.source.kind != "folder":
      ops.append(self._check_labels(labels, status, is_record, files))
    with tf.control_dependencies(ops):
      all_records = tf.reduce_all(is_record)
      # Markers are rare (only where records were skipped): copy only then.
      values = tf.cond(all_records, lambda: tf.identity(values),
                       lambda: tf.boolean_mask(values, is_record))
      labels = tf.cond(all_records, lambda: tf.identity(labels),
                       lambda: tf.boolean_mask(labels, is_record))
    return values, labels

  def _describe_bad(self, status, bad, files):
    """'; '-joined names of this batch's skipped records."""
    kind, skipped, first, index, unit, detail = status
    s = self.source
    file = tf.gather(files, tf.minimum(unit, files.shape[0] - 1))
    if s.kind == "folder":
      gap = detail
    elif self.exact:
      line = first + 2 if s.kind == "csv" else first
      gap = tf.strings.join(["line " if s.kind == "csv" else "record ",
                             tf.strings.as_string(line), " of ", file])
    else:
      gap = tf.strings.join([tf.strings.as_string(skipped), " record(s) of ", file])
    tail = tf.strings.join(["the rest of ", file, " after its first ",
                            tf.strings.as_string(index), " record(s) (a truncated or "
                            "corrupt TFRecord file)"])
    both = tf.where(skipped > 0, tf.strings.join([gap, " and ", tail]), tail)
    each = tf.where(tf.equal(kind, TAIL), both, gap)
    return tf.strings.reduce_join(tf.boolean_mask(each, bad > 0), separator="; ")

  def _report_bad(self, status, bad, total_bad, files):
    if self.fail:
      def fail_bad():
        message = tf.strings.join([
            bad_records.ERROR_PREFIX, self._describe_bad(status, bad, files),
            " cannot be read or decoded; fix or remove it, or pass "
            "--on_bad_record=skip to skip and count such records."])
        return tf.debugging.Assert(tf.constant(False), [message])
      return tf.cond(total_bad > 0, fail_bad, tf.no_op)

    def print_bad():
      return tf.print(tf.strings.join([
          "estimator_transfer: skipped ", tf.strings.as_string(total_bad),
          " corrupt record(s): ", self._describe_bad(status, bad, files)]),
                      output_stream=sys.stderr)
    return tf.cond(total_bad > 0, print_bad, tf.no_op)

  def _check_labels(self, labels, status, is_record, files):
    """An assertion that names the first record whose label is out of range."""
    _, _, _, index, unit, detail = status
    s = self.source
    out_of_range = labels < 0
    if self.num_classes:
      out_of_range |= labels >= self.num_classes
    wrong = is_record & out_of_range

    def label_error():
      i = tf.argmax(tf.cast(wrong, tf.int32))
      file = tf.gather(files, tf.minimum(unit[i], files.shape[0] - 1))
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

    return tf.cond(tf.reduce_any(wrong), label_error, tf.no_op)
