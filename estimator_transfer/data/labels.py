"""Label maps: class names <-> ids, from labels.txt or class folders."""
import os
from typing import List, Optional

import tensorflow as tf

from estimator_transfer import files
from estimator_transfer.errors import ConfigError

LABELS_FILENAME = "labels.txt"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def _read_names(path: str) -> List[str]:
  """The names, one per line; trailing blank lines are allowed, inner ones not.

  Raises:
    ConfigError: not a regular text file, or a blank line between names
      (line i is class i, so a blank line would shift every id after it).
  """
  if "://" not in path and os.path.exists(path) and not os.path.isfile(path):
    raise ConfigError(f"label map {path} is not a regular file (a directory, FIFO "
                      "or device); give a text file with one class name per line.")
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      text = f.read().decode("utf-8")
  except UnicodeDecodeError:
    raise ConfigError(f"label map {path} is not UTF-8 text (a binary file?); give a "
                      "text file with one class name per line.") from None
  lines = [line.strip() for line in text.splitlines()]
  while lines and not lines[-1]:
    lines.pop()
  if any(not line for line in lines) and any(lines):
    blank = lines.index("") + 1
    raise ConfigError(f"line {blank} of label map {path} is blank; line i names class "
                      "i, so remove the blank line (or name the class).")
  return [line for line in lines if line]


def read_labels_file(path: str) -> List[str]:
  """Reads one class name per line (line i is class id i).

  Raises:
    ConfigError: a class name is listed twice.
  """
  names = _read_names(path)
  if len(set(names)) != len(names):
    raise ConfigError(f"{path} lists a class name twice; each line must be a "
                      "distinct class.")
  return names


def _require_label_map(path: str) -> None:
  if tf.io.gfile.isdir(path):
    raise ConfigError(f"--label_map={path} is a directory; give a text file with "
                      "one class name per line.")
  if not tf.io.gfile.exists(path):
    raise ConfigError(f"--label_map={path} does not exist; give a text "
                      "file with one class name per line.")


def read_label_map(path: str) -> List[str]:
  """Reads a --label_map file that must name at least one class.

  Raises:
    ConfigError: the file is missing, empty or lists a class twice.
  """
  _require_label_map(path)
  names = _read_names(path)
  if len(set(names)) != len(names) or not names:
    raise ConfigError(f"--label_map={path} is empty or lists a class twice; give "
                      "one distinct class name per line.")
  return names


def write_labels_file(path: str, names) -> None:
  """Writes `names` one per line (line i is class id i), atomically."""
  files.write_atomically(path, "".join(f"{n}\n" for n in names))


def is_image_folder(path: str) -> bool:
  """True when `path` is a directory with class sub-folders (and no TFRecords)."""
  if not tf.io.gfile.isdir(path):
    return False
  entries = tf.io.gfile.listdir(path)
  subdirs = [e for e in entries if tf.io.gfile.isdir(os.path.join(path, e))
             and not e.startswith(".")]
  has_records = any(".tfrecord" in e or "-of-" in e for e in entries)
  return bool(subdirs) and not has_records


def folder_class_names(path: str) -> List[str]:
  return sorted(e.rstrip("/") for e in tf.io.gfile.listdir(path)
                if not e.startswith(".") and tf.io.gfile.isdir(os.path.join(path, e)))


def label_ids(names, class_names, what: str = "class folder") -> List[int]:
  """Maps class names to ids through the label map (position in `class_names`).

  Args:
    names: the names to map (e.g. class folder names).
    class_names: the label map, line i is class i; empty keeps `names` order
      sorted (ids of sorted names).
    what: how to call a name in the error (e.g. "class folder").

  Raises:
    ConfigError: a name is not in the label map.
  """
  if not class_names:
    ordered = sorted(names)
    return [ordered.index(n) for n in names]
  index = {n: i for i, n in enumerate(class_names)}
  missing = [n for n in names if n not in index]
  if missing:
    raise ConfigError(f"{what} '{missing[0]}' is not in the label map "
                      f"({len(class_names)} classes: {', '.join(list(class_names)[:5])}"
                      f"{', ...' if len(class_names) > 5 else ''}); add it to "
                      "--label_map / labels.txt or remove it from the data.")
  return [index[n] for n in names]


def data_dir(data: str) -> str:
  """The directory a data spec (dir, file or glob) lives in."""
  if tf.io.gfile.isdir(data):
    return data
  return os.path.dirname(data) or "."


def class_names_for(data: str, label_map: str = "") -> Optional[List[str]]:
  """Class names for a data spec: --label_map, labels.txt, or class folders.

  Returns None when the data carries no names (plain TFRecords without a
  labels.txt next to them).
  """
  if label_map:
    return read_label_map(label_map)
  if not data:
    return None
  if is_image_folder(data):
    return folder_class_names(data)
  candidate = os.path.join(data_dir(data), LABELS_FILENAME)
  if tf.io.gfile.exists(candidate):
    return read_labels_file(candidate)
  return None
