"""What a --train_data / --eval_data string is, resolved once in Python.

A data spec is a TFRecord file, glob or directory of shards; an image folder
with one sub-folder per class; or a CSV file or glob (`*.csv`).
`resolve_source` lists the files and sniffs the first records (feature keys,
label kind, that the image feature holds an image) so that a wrong key or
label fails at start-up with one sentence instead of inside the pipeline.
"""
import dataclasses
import io
import os
from concurrent import futures
from typing import List, Sequence, Tuple

from PIL import Image
import tensorflow as tf

from estimator_transfer import files as files_lib
from estimator_transfer.config import InputConfig
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import tfrecords
from estimator_transfer.errors import ConfigError

_INSPECT_RECORDS = 5
_INSPECT_FILES = 20


def _is_temporary(path: str) -> bool:
  # A shard still being written: `<name>.tmp` or `<name>.tmp-<id>` (files.temp_path).
  return path.endswith(".tmp") or files_lib.TEMP_MARK in os.path.basename(path)


def list_tfrecord_files(data: str) -> List[str]:
  """Expands a TFRecord spec: a file, a glob, or a directory of shards.

  Args:
    data: a file, a glob such as data/train-*, or a directory whose
      `*.tfrecord*` / `*-of-*` files are the shards.

  Returns:
    The sorted file paths, without shards still being written.

  Raises:
    ConfigError: nothing matches.
  """
  if tf.io.gfile.isdir(data):
    found = [os.path.join(data, f) for f in tf.io.gfile.listdir(data)
             if ".tfrecord" in f or "-of-" in f]
  elif any(c in data for c in "*?["):
    found = tf.io.gfile.glob(data)
  elif tf.io.gfile.exists(data):
    found = [data]
  else:
    found = []
  found = sorted(f for f in found if not _is_temporary(f))
  special = [f for f in found if not _is_plain_file(f)]
  if special:
    raise ConfigError(f"{special[0]} is not a regular file (a directory, FIFO or "
                      "device); give TFRecord files, a directory of shards or an "
                      "image folder.")
  if not found and os.path.islink(data):
    raise ConfigError(f"{data} is a broken symbolic link (to {os.readlink(data)}); "
                      "fix the link or give the data's real path.")
  if not found:
    raise ConfigError(f"no TFRecord files found at {data}; give a file, a glob "
                      "such as data/train-*, a directory of *.tfrecord shards, "
                      "or an image folder with one sub-folder per class.")
  return found


def _is_plain_file(path: str) -> bool:
  """True for a regular file (or any remote path): a FIFO would block readers."""
  return files_lib.is_remote(path) or os.path.isfile(path)


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
  found, found_ids = [], []
  for name, label in zip(names, ids):
    for root, dirs, filenames in tf.io.gfile.walk(os.path.join(path, name)):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for filename in sorted(filenames):
        if filename.startswith("."):
          continue
        full = os.path.join(root, filename)
        if filename.lower().endswith(labels_lib.IMAGE_EXTENSIONS) and _is_plain_file(full):
          found.append(full)
          found_ids.append(label)
  if not found:
    raise ConfigError(f"no images (jpg, png, gif, bmp) found under {path}; check "
                      "the folder.")
  return found, found_ids, names


def is_csv(data: str) -> bool:
  """Whether a data spec names CSV files (by the `.csv` extension)."""
  return data.lower().endswith(".csv")


def list_csv_files(data: str) -> List[str]:
  """Expands a CSV spec (a file or a glob).

  Raises:
    ConfigError: nothing matches.
  """
  found = sorted(tf.io.gfile.glob(data)) if any(c in data for c in "*?[") else (
      [data] if tf.io.gfile.exists(data) else [])
  if not found:
    raise ConfigError(f"no CSV file found at {data}; give a file or a glob such "
                      "as data/train-*.csv.")
  return found


@dataclasses.dataclass(frozen=True)
class Source:
  """What one data spec resolved to (plain Python, built once per input_fn)."""
  kind: str  # tfrecord | folder | csv
  files: Tuple[str, ...]
  sizes: Tuple[int, ...] = ()  # tfrecord: bytes per file (truncation check)
  labels: Tuple[int, ...] = ()  # folder: label id per file
  label_is_text: bool = False
  class_names: Tuple[str, ...] = ()
  csv_columns: Tuple[str, ...] = ()
  csv_label_index: int = -1


def _file_sizes(paths: Sequence[str]) -> List[int]:
  # One stat per shard; threads hide the latency of remote file systems.
  with futures.ThreadPoolExecutor(max_workers=16) as pool:
    return list(pool.map(lambda f: tf.io.gfile.stat(f).length, paths))


def _first_examples(paths: Sequence[str], sizes: Sequence[int]):
  """(the first readable tf.Examples, the file they came from).

  Raises:
    ConfigError: no record is readable.
  """
  examples, where = [], ""
  for path, size in list(zip(paths, sizes))[:_INSPECT_FILES]:
    if not size:
      continue
    for raw in tfrecords.read_records(path, _INSPECT_RECORDS):
      try:
        examples.append(tf.train.Example.FromString(raw))
        where = where or path
      except Exception:  # pylint: disable=broad-except
        continue  # a corrupt record: the pipeline will count it
    if examples:
      return examples, where
  if not any(sizes):
    raise ConfigError(f"the TFRecord files {paths[0]}... are all empty; "
                      "re-create them (et-prepare-data).")
  raise ConfigError(f"no tf.Example could be read from the first records of "
                    f"{paths[0]}; check that the data is uncompressed TFRecord "
                    "files of tf.Example.")


def inspect_tfrecords(paths: Sequence[str], sizes: Sequence[int],
                      config: InputConfig) -> bool:
  """Checks the feature keys on the first records; True for text labels.

  Args:
    paths: the TFRecord files.
    sizes: their sizes in bytes (empty files are passed over).
    config: gives --image_key and --label_key.

  Returns:
    Whether the labels are class names (a bytes feature) rather than ids.

  Raises:
    ConfigError: the keys are missing or of the wrong type, or no record is
      readable, naming the file and the keys it has.
  """
  examples, where = _first_examples(paths, sizes)
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
  try:
    with Image.open(io.BytesIO(data)) as image:
      return image.format in ("JPEG", "PNG", "GIF", "BMP")
  except Exception:  # pylint: disable=broad-except
    return False


def inspect_csv(paths: Sequence[str], label_column: str
                ) -> Tuple[Tuple[str, ...], int, bool]:
  """Reads the header and first row of the first CSV file.

  Args:
    paths: the CSV files.
    label_column: the header name of the label column.

  Returns:
    (column names, index of the label column, whether labels are text).

  Raises:
    ConfigError: no such column, or the first row does not fit the header.
  """
  with tf.io.gfile.GFile(paths[0]) as f:
    header = f.readline().strip()
    first = f.readline().strip()
  columns = tuple(c.strip() for c in header.split(","))
  if label_column not in columns:
    raise ConfigError(f"{paths[0]} has no column '{label_column}' in its header "
                      f"({header[:200]}); set --csv_label_column.")
  index = columns.index(label_column)
  values = first.split(",")
  if len(values) != len(columns):
    raise ConfigError(f"line 2 of {paths[0]} has {len(values)} values for "
                      f"{len(columns)} header columns; fix the file.")
  try:
    int(values[index])
    text = False
  except ValueError:
    text = True
  return columns, index, text


def resolve_source(config: InputConfig, data: str,
                   class_names: Sequence[str] = ()) -> Source:
  """Resolves a data spec (files, label kind, label map) once, in Python.

  Args:
    config: the input config (feature keys, CSV label column).
    data: TFRecord file/glob/dir, an image folder or a CSV file/glob.
    class_names: the label map (line i = class i), if any.

  Returns:
    The Source the pipeline reads.

  Raises:
    ConfigError: nothing found, or keys/labels do not fit the data.
  """
  if not data:
    raise ConfigError("no data was given; set --train_data / --eval_data.")
  class_names = tuple(class_names or ())
  if labels_lib.is_image_folder(data):
    paths, ids, _ = list_image_folder(data, class_names)
    return Source("folder", tuple(paths), labels=tuple(ids), class_names=class_names)
  if is_csv(data):
    return _resolve_csv(config, data, class_names)
  paths = list_tfrecord_files(data)
  sizes = _file_sizes(paths)
  text = inspect_tfrecords(paths, sizes, config)
  if text and not class_names:
    class_names = tuple(labels_lib.class_names_for(data) or ())
    if not class_names:
      raise ConfigError(f"the records' labels ('{config.label_key}') are class "
                        "names; give --label_map or put labels.txt next to the data.")
  return Source("tfrecord", tuple(paths), sizes=tuple(sizes), label_is_text=text,
                class_names=class_names)


def _resolve_csv(config: InputConfig, data: str, class_names: Tuple[str, ...]) -> Source:
  paths = list_csv_files(data)
  columns, index, text = inspect_csv(paths, config.csv_label_column)
  class_names = class_names or tuple(labels_lib.class_names_for(data) or ())
  if text and not class_names:
    raise ConfigError(f"the '{config.csv_label_column}' column of {paths[0]} "
                      "holds class names; give --label_map (one name per line).")
  return Source("csv", tuple(paths), label_is_text=text, class_names=class_names,
                csv_columns=columns, csv_label_index=index)
