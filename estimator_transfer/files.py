"""Writing files so that a reader never sees half of one.

Every file the product writes next to checkpoints or exports (config.json,
ledgers, reports, state files, labels) goes through `write_atomically`: the
bytes land in a temporary file in the same directory, are flushed to disk,
and only then renamed over the target, so a crash, a full disk or a SIGKILL
leaves either the old file or the new one, never a torn one.

Local paths use the os module (with fsync); paths with a URL scheme
(`gs://`, `s3://`, `hdfs://`) go through `tf.io.gfile`, imported only then
so that writing a config never loads TensorFlow.
"""
import json
import os
import uuid
from typing import Any, Optional, Union

TEMP_MARK = ".tmp-"  # temporary files are <name>.tmp-<id>; readers skip them


def is_remote(path: str) -> bool:
  """Whether `path` names a file system TensorFlow reaches by URL scheme."""
  return "://" in str(path)


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # heavy: remote paths only
  return tf.io.gfile


def temp_path(path: str) -> str:
  """A unique temporary name next to `path` (same directory: rename stays atomic)."""
  return f"{path}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_atomically(path: str, data: Union[str, bytes]) -> str:
  """Writes `data` to `path` so that readers see the old or the new file only.

  Args:
    path: the target file; its directory is created when missing.
    data: text (written as UTF-8) or bytes.

  Returns:
    `path`.

  Raises:
    OSError (or a tf.errors.OpError for remote paths): the write failed; the
      previous file at `path`, if any, is unchanged and no temporary is left.
  """
  raw = data.encode("utf-8") if isinstance(data, str) else data
  tmp = temp_path(path)
  if is_remote(path):
    gfile = _gfile()
    gfile.makedirs(os.path.dirname(path) or ".")
    try:
      with gfile.GFile(tmp, "wb") as f:
        f.write(raw)
      gfile.rename(tmp, path, overwrite=True)
    except Exception:
      _remove_quietly(tmp)
      raise
    return path
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  try:
    with open(tmp, "wb") as f:
      f.write(raw)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    _remove_quietly(tmp)
    raise
  return path


def copy_atomically(src: str, dest: str) -> str:
  """Copies `src` to `dest` through a temporary file; returns `dest`."""
  if is_remote(src) or is_remote(dest):
    gfile = _gfile()
    tmp = temp_path(dest)
    try:
      gfile.copy(src, tmp, overwrite=True)
      gfile.rename(tmp, dest, overwrite=True)
    except Exception:
      _remove_quietly(tmp)
      raise
    return dest
  with open(src, "rb") as f:
    return write_atomically(dest, f.read())


def write_json(path: str, data: Any, **dump_args) -> str:
  """`write_atomically` of `data` as JSON (indent 2, sorted keys by default)."""
  dump_args.setdefault("indent", 2)
  dump_args.setdefault("sort_keys", True)
  return write_atomically(path, json.dumps(data, **dump_args) + "\n")


def read_text(path: str) -> Optional[str]:
  """The file's text, or None when it does not exist."""
  try:
    if is_remote(path):
      gfile = _gfile()
      if not gfile.exists(path):
        return None
      with gfile.GFile(path, "r") as f:
        return f.read()
    with open(path, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    return None


def read_json(path: str, default: Any = None) -> Any:
  """The parsed JSON at `path`; `default` when the file does not exist.

  Raises:
    ValueError: the file exists but is not JSON.
  """
  text = read_text(path)
  if text is None:
    return default
  return json.loads(text)


def _remove_quietly(path: str) -> None:
  try:
    if is_remote(path):
      _gfile().remove(path)
    else:
      os.remove(path)
  except Exception:  # pylint: disable=broad-except  # best effort: the write already failed
    pass
