"""The growing data folder: which of its units are complete, and their records.

A unit is one top-level entry of the watched folder, written by someone else:

* a TFRecord file of images (labels: int ids into the folder's labels.txt,
  which may grow, or class names in a bytes feature);
* a CSV file of numeric features (`--backbone=identity`), with a header;
* a sub-folder of images with one sub-folder per class.

A unit is consumed only when it is complete: never while it has a temporary
name (`*.tmp`, `*.tmp-<id>`, `*.partial`, `*.part`, hidden or `_`-prefixed
names), never while its size or mtime changed within the settle interval, and
only after every record read back whole (TFRecord CRCs checked, the last
record ending exactly at the end of the file; CSV rows complete with a final
newline; images decodable; every label known). Records are normalised
(class *names* carried in the records) so that a round's copy stays valid
whatever the model's class order becomes.
"""
import dataclasses
import io
import logging
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image
import tensorflow as tf

from estimator_transfer import files
from estimator_transfer.config import InputConfig
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import sources
from estimator_transfer.data import tfrecords
from estimator_transfer.errors import ConfigError

log = logging.getLogger("estimator_transfer")

TEXT_KEY = tfrecords.TEXT_KEY  # the class name every normalised record carries
TFRECORD, CSV, FOLDER = "tfrecord", "csv", "folder"
_RECORD_OVERHEAD = 16  # TFRecord framing: 8-byte length, 2 x 4-byte CRC
_TEMP_SUFFIXES = (".tmp", ".partial", ".part", ".crdownload", ".inprogress", ".lock")
_NOT_UNITS = (labels_lib.LABELS_FILENAME,)


class NotReady(Exception):
  """A unit that cannot be consumed (yet): the message says why."""


@dataclasses.dataclass
class Records:
  """A unit's (or the validation data's) normalised records.

  Attributes:
    kind: TFRECORD (payloads are serialized tf.Examples holding the class
      name under TEXT_KEY) or CSV (payloads are rows of strings).
    names: the class name of each record.
    payloads: one per record.
    header: CSV only: the column names.
    label_index: CSV only: the label column.
  """
  kind: str
  names: List[str] = dataclasses.field(default_factory=list)
  payloads: list = dataclasses.field(default_factory=list)
  header: Tuple[str, ...] = ()
  label_index: int = -1

  def class_counts(self) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for name in self.names:
      counts[name] = counts.get(name, 0) + 1
    return counts


def is_temporary(name: str) -> bool:
  """Whether a file name says it is still being written (or is not data)."""
  base = os.path.basename(name.rstrip("/"))
  return (base.startswith((".", "_")) or base.endswith(_TEMP_SUFFIXES) or
          files.TEMP_MARK in base or ".tmp." in base)


def list_candidates(data_dir: str, numeric: bool) -> Dict[str, str]:
  """name -> kind of the data folder's entries that may be units.

  Args:
    data_dir: the watched folder.
    numeric: numeric features (CSV units) rather than images.
  """
  out = {}
  for name in sorted(os.listdir(data_dir)):
    path = os.path.join(data_dir, name)
    if is_temporary(name) or name in _NOT_UNITS:
      continue
    if os.path.isdir(path):
      kind = FOLDER
    elif os.path.isfile(path):
      kind = CSV if name.lower().endswith(".csv") else TFRECORD
    else:
      continue  # a FIFO or a dangling link would block or fail a reader
    if (kind == CSV) == numeric:
      out[name] = kind
  return out


def signature(path: str, kind: str) -> Optional[Tuple[int, int, int]]:
  """(bytes, newest mtime in ns, files) of a unit; None while a part is temporary."""
  if kind != FOLDER:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, 1)
  size = mtime = count = 0
  for root, dirs, names in os.walk(path):
    for name in dirs + names:
      if is_temporary(name):
        return None
    for name in names:
      st = os.stat(os.path.join(root, name))
      size, mtime, count = size + st.st_size, max(mtime, st.st_mtime_ns), count + 1
  return (size, mtime, count)


class Settler:
  """Says when a unit's signature stayed the same for `settle_secs`."""

  def __init__(self, settle_secs: float):
    self.settle_secs = settle_secs
    self._seen: Dict[str, Tuple[tuple, float]] = {}

  def settled(self, name: str, sig: Optional[tuple], now: Optional[float] = None) -> bool:
    now = time.monotonic() if now is None else now
    if sig is None:
      self._seen.pop(name, None)
      return False
    previous = self._seen.get(name)
    if previous is None or previous[0] != sig:
      self._seen[name] = (sig, now)
      return self.settle_secs <= 0
    return now - previous[1] >= self.settle_secs


def read_unit(path: str, kind: str, cfg: InputConfig,
              class_names: Optional[Sequence[str]]) -> Records:
  """Reads a whole unit into normalised records.

  Args:
    path: the unit.
    kind: TFRECORD, CSV or FOLDER.
    cfg: the input settings (image_key, label_key, csv_label_column).
    class_names: the folder's labels.txt (id -> name), None without one.

  Raises:
    NotReady: incomplete, corrupt, or a label the label map lacks (yet).
  """
  try:
    if kind == TFRECORD:
      return _read_tfrecord(path, cfg, class_names)
    if kind == CSV:
      return _read_csv(path, cfg.csv_label_column, class_names)
    return _read_folder(path, cfg.image_key)
  except (ConfigError, OSError, ValueError, tf.errors.OpError) as e:
    raise NotReady(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def _name_of(value, class_names, where: str) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if class_names is None:
    raise NotReady(f"{where} has class id {value} but no labels.txt says its name")
  if not 0 <= int(value) < len(class_names):
    raise NotReady(f"{where} has class id {value}, beyond the {len(class_names)} "
                   "names of labels.txt (not written yet?)")
  return class_names[int(value)]


def _read_tfrecord(path: str, cfg: InputConfig, class_names) -> Records:
  size = os.path.getsize(path)
  out = Records(TFRECORD)
  read = 0
  for raw in tfrecords.read_records(path, limit=1 << 40):
    read += len(raw) + _RECORD_OVERHEAD
    example = tf.train.Example.FromString(raw)
    feature = example.features.feature
    where = f"record {len(out.names) + 1} of {path}"
    if cfg.image_key not in feature:
      raise NotReady(f"{where} has no '{cfg.image_key}' feature")
    label = feature.get(cfg.label_key)
    if label is None or not (label.int64_list.value or label.bytes_list.value):
      raise NotReady(f"{where} has no '{cfg.label_key}' label")
    value = label.bytes_list.value[0] if label.bytes_list.value else \
        label.int64_list.value[0] - cfg.label_offset  # --label_offset, as training reads it
    name = _name_of(value, class_names, where)
    feature[TEXT_KEY].bytes_list.value[:] = [name.encode("utf-8")]
    out.names.append(name)
    out.payloads.append(example.SerializeToString())
  if read != size:
    raise NotReady(f"{path} ends inside a record or fails a CRC after "
                   f"{len(out.names)} records ({read} of {size} bytes read)")
  if not out.names:
    raise NotReady(f"{path} holds no records")
  return out


def _read_csv(path: str, label_column: str, class_names) -> Records:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if not text.endswith("\n"):
    raise NotReady(f"{path} does not end with a newline (still being written?)")
  lines = [line for line in text.splitlines() if line.strip()]
  header = tuple(c.strip() for c in lines[0].split(",")) if lines else ()
  if label_column not in header:
    raise NotReady(f"{path} has no '{label_column}' column in its header")
  index = header.index(label_column)
  out = Records(CSV, header=header, label_index=index)
  for number, line in enumerate(lines[1:], start=2):
    row = [v.strip() for v in line.split(",")]
    if len(row) != len(header):
      raise NotReady(f"line {number} of {path} has {len(row)} values for "
                     f"{len(header)} columns")
    value = row[index]
    name = _name_of(int(value), class_names, f"line {number} of {path}") if (
        value.isdigit() and class_names is not None) else value
    out.names.append(name)
    out.payloads.append(row)
  if not out.names:
    raise NotReady(f"{path} holds no rows")
  return out


def _read_folder(path: str, image_key: str) -> Records:
  out = Records(TFRECORD)
  names = labels_lib.folder_class_names(path)
  if not names:
    raise NotReady(f"{path} has no class sub-folders")
  for name in names:
    for root, dirs, filenames in os.walk(os.path.join(path, name)):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for filename in sorted(filenames):
        if not filename.lower().endswith(labels_lib.IMAGE_EXTENSIONS):
          continue
        with open(os.path.join(root, filename), "rb") as f:
          encoded = f.read()
        with Image.open(io.BytesIO(encoded)) as image:
          image.load()  # a truncated image fails here
        example = tf.train.Example()
        example.features.feature[image_key].bytes_list.value.append(encoded)
        example.features.feature[TEXT_KEY].bytes_list.value.append(name.encode("utf-8"))
        out.names.append(name)
        out.payloads.append(example.SerializeToString())
  if not out.names:
    raise NotReady(f"{path} holds no images")
  return out


def write_records(path: str, records: Records, class_names: Sequence[str],
                  keep=None) -> int:
  """Writes records (those whose class `keep` accepts) to `path`, atomically.

  TFRecords carry their class names; CSV rows get the label column as the id
  in `class_names` (a CSV of digit-named classes would read names as ids).

  Returns:
    The number of records written.
  """
  index = {name: i for i, name in enumerate(class_names)}
  chosen = [(n, p) for n, p in zip(records.names, records.payloads)
            if keep is None or keep(n)]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temp = files.temp_path(path)
  try:
    if records.kind == TFRECORD:
      with tf.io.TFRecordWriter(temp) as writer:
        for _, payload in chosen:
          writer.write(payload)
    else:
      lines = [",".join(records.header)]
      for name, row in chosen:
        row = list(row)
        row[records.label_index] = str(index[name])
        lines.append(",".join(row))
      with open(temp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(temp, path)
  finally:
    if os.path.exists(temp):
      os.remove(temp)
  return len(chosen)


def read_data(data: str, cfg: InputConfig) -> Records:
  """Reads a whole fixed data spec (the validation data) into normalised records.

  Raises:
    ConfigError: the data cannot be read or a label has no name.
  """
  from_names = labels_lib.class_names_for(data)
  try:
    if labels_lib.is_image_folder(data):
      return _read_folder(data, cfg.image_key)
    if data.lower().endswith(".csv"):
      paths = sorted(tf.io.gfile.glob(data))
      if not paths:
        raise ConfigError(f"--eval_data={data} matches no CSV file; check the path.")
      parts = [_read_csv(p, cfg.csv_label_column, from_names) for p in paths]
    else:
      parts = [_read_tfrecord(p, cfg, from_names) for p in sources.list_tfrecord_files(data)]
  except NotReady as e:
    raise ConfigError(f"--eval_data={data}: {e}; fix the validation data.") from None
  out = dataclasses.replace(parts[0], names=[], payloads=[])
  for part in parts:
    out.names += part.names
    out.payloads += part.payloads
  return out
