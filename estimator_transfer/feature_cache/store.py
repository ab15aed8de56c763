"""The feature cache on disk: snapshots, unit records and their markers.

Layout:

  DIR/<key>/                  one key per backbone (see key.py); key.json
                              says what it hashes
    backbone/                 the snapshot: a checkpoint of the backbone
                              values the features were computed with, and
                              snapshot.json (content id, feature size)
    units/<unit>.tfrecord     features + label of one input unit
    units/<unit>.json         the unit's completion marker (count, size,
                              snapshot id)
  model_dir/feature_cache/
    backbone/                 the snapshot the model's head was trained on
    full/<ckpt>-<tag>/        full checkpoints composed for export

Writers never corrupt the cache: unit files and markers go through
`files.write_atomically`, the marker last; a directory (snapshot, full
checkpoint) is filled under a temporary name and published by renaming it,
which fails if another writer published first. A killed writer's temporary
files are removed after an hour.
"""
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

from estimator_transfer import files
from estimator_transfer.feature_cache import key as key_lib

log = logging.getLogger("estimator_transfer")

KEY_FILENAME = "key.json"
SNAPSHOT_DIRNAME = "backbone"
SNAPSHOT_PREFIX = "backbone.ckpt"
SNAPSHOT_META = "snapshot.json"
UNITS_DIRNAME = "units"
MODEL_DIR_SUBDIR = "feature_cache"  # under model_dir: the pinned snapshot, full/
FULL_DIRNAME = "full"
FEATURE_KEY = "features"  # the cache records' tf.Example keys
LABEL_KEY = "label"
_STALE_SECONDS = 3600


def _now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_json(path: str) -> Optional[dict]:
  """The JSON at `path`; None when it is missing or unreadable (not done yet)."""
  try:
    return files.read_json(path)
  except (OSError, ValueError, tf.errors.OpError):
    return None


def write_key(root: str, details: dict) -> None:
  """Writes root/key.json (what the key hashes) unless it is there."""
  path = os.path.join(root, KEY_FILENAME)
  if not tf.io.gfile.exists(path):
    files.write_atomically(path, json.dumps(details, indent=1, sort_keys=True))


# --- directories ----------------------------------------------------------------


def temp_dir(final: str) -> str:
  """A new, empty temporary directory to fill and then `publish_dir` as `final`."""
  tmp = files.temp_path(final)
  tf.io.gfile.makedirs(tmp)
  return tmp


def publish_dir(tmp: str, final: str) -> bool:
  """Renames directory `tmp` to `final` unless `final` exists; True if published.

  Locally rename(2) refuses to replace a non-empty directory, so of two
  writers exactly one publishes; on remote file systems it is best effort.
  """
  if not files.is_remote(final):
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


def remove_stale_temps(directory: str) -> None:
  """Removes temporary files and directories of writers dead for an hour."""
  if not tf.io.gfile.isdir(directory):
    return
  now = time.time()
  for name in tf.io.gfile.listdir(directory):
    if files.TEMP_MARK not in name:
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


def copy_dir(src: str, dest: str) -> None:
  """Copies the files of directory `src` into `dest` (an unpublished temp dir)."""
  tf.io.gfile.makedirs(dest)
  for name in tf.io.gfile.listdir(src):
    tf.io.gfile.copy(os.path.join(src, name), os.path.join(dest, name), overwrite=True)


# --- checkpoints and snapshots ----------------------------------------------------


def write_checkpoint(prefix: str, values: Dict[str, np.ndarray]) -> None:
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


def read_checkpoint(prefix: str) -> Dict[str, np.ndarray]:
  """Every tensor of the checkpoint at `prefix`, by name."""
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def values_id(values: Dict[str, np.ndarray]) -> str:
  """A content id of variable values (16 hex digits): the snapshot's id."""
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
    return snapshot_prefix(self.directory)


def snapshot_prefix(directory: str) -> str:
  """The checkpoint prefix of the snapshot in `directory`."""
  return os.path.join(directory, SNAPSHOT_PREFIX)


def write_snapshot_meta(directory: str, values: Dict[str, np.ndarray], feature_dim: int,
                        details: dict) -> None:
  """Writes snapshot.json next to a checkpoint of `values` saved in `directory`."""
  meta = {"id": values_id(values), "feature_dim": feature_dim,
          "variables": {n: list(v.shape) for n, v in sorted(values.items())},
          "fingerprint": details, "created": _now()}
  files.write_atomically(os.path.join(directory, SNAPSHOT_META), json.dumps(meta, indent=1))


def read_snapshot(directory: str) -> Optional[Snapshot]:
  """The snapshot published in `directory`, or None."""
  meta = read_json(os.path.join(directory, SNAPSHOT_META))
  if not meta or not tf.io.gfile.exists(os.path.join(directory, SNAPSHOT_PREFIX + ".index")):
    return None
  return Snapshot(directory, str(meta["id"]), int(meta["feature_dim"]))


# --- units ----------------------------------------------------------------------


def unit_paths(root: str, unit_key: str) -> Tuple[str, str]:
  """(records, marker) paths of a unit under the key directory `root`."""
  base = os.path.join(root, UNITS_DIRNAME, unit_key)
  return base + ".tfrecord", base + ".json"


def done_marker(root: str, unit_key: str, snapshot: Snapshot) -> Optional[dict]:
  """The unit's marker if the unit is complete and of `snapshot`; else None."""
  path, marker_path = unit_paths(root, unit_key)
  marker = read_json(marker_path)
  if not marker or marker.get("snapshot") != snapshot.id or \
      marker.get("feature_dim") != snapshot.feature_dim:
    return None
  try:
    if tf.io.gfile.stat(path).length != marker.get("bytes"):
      return None
  except tf.errors.NotFoundError:
    return None
  return marker


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    low, value = value & 0x7F, value >> 7
    out.append(low | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
  """One length-delimited protobuf field (tag = field number << 3 | 2)."""
  return bytes([tag]) + _varint(len(payload)) + payload


def _examples(features: np.ndarray, labels: np.ndarray) -> list:
  """The serialized tf.Examples {FEATURE_KEY: features[i], LABEL_KEY: labels[i]}.

  The float list is framed by hand (Example.features = 1, its map entries =
  1, key = 1 / value = 2, Feature.float_list = 2, FloatList.value = 1,
  packed little-endian float32): a unit's 256 records of 7,840 floats took
  0.3 s through protobuf's per-value conversion, a tenth of their compute.
  The label goes through protobuf; tf.train.Example parses the result to the
  same message (tests/feature_cache/test_feature_cache.py).
  """
  rows = np.ascontiguousarray(features, dtype="<f4")
  key = _field(0x0A, FEATURE_KEY.encode())
  out = []
  for row, label in zip(rows, labels):
    values = _field(0x12, _field(0x0A, row.tobytes()))
    label_feature = tf.train.Feature(
        int64_list=tf.train.Int64List(value=[int(label)])).SerializeToString()
    entries = (_field(0x0A, key + _field(0x12, values)) +
               _field(0x0A, _field(0x0A, LABEL_KEY.encode()) + _field(0x12, label_feature)))
    out.append(_field(0x0A, entries))
  return out


def _tfrecord_bytes(records) -> bytes:
  """The TFRecord file of `records`, framed by TensorFlow's own writer.

  It writes into TF's in-memory file system, so that the real file is
  written in one piece by `files.write_atomically`.
  """
  path = f"ram://estimator_transfer/feature_cache/{uuid.uuid4().hex}.tfrecord"
  try:
    with tf.io.TFRecordWriter(path) as writer:
      for record in records:
        writer.write(record)
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  finally:
    if tf.io.gfile.exists(path):
      tf.io.gfile.remove(path)


def write_unit(root: str, unit: key_lib.Unit, snapshot: Snapshot, features: np.ndarray,
               labels: np.ndarray, skipped: int) -> dict:
  """Writes a unit's records, then its marker (last: the unit is done).

  Args:
    root: the key directory.
    unit: the unit.
    snapshot: the snapshot the features were computed with.
    features: [n, D] float32.
    labels: [n] int.
    skipped: corrupt input records left out (--on_bad_record=skip).

  Returns:
    The marker written.
  """
  path, marker_path = unit_paths(root, unit.key)
  raw = _tfrecord_bytes(_examples(features, labels))
  files.write_atomically(path, raw)
  marker = {"count": int(len(labels)), "skipped": int(skipped),
            "bytes": int(tf.io.gfile.stat(path).length), "snapshot": snapshot.id,
            "feature_dim": snapshot.feature_dim, "source": unit.describe,
            "copy": unit.copy, "created": _now()}
  files.write_atomically(marker_path, json.dumps(marker, indent=1))
  return marker


def count_records(path: str) -> int:
  """Records of a TFRecord file; a truncated tail counts as one bad record."""
  count = 0
  try:
    for _ in tf.compat.v1.io.tf_record_iterator(path):
      count += 1
  except tf.errors.OpError:
    count += 1
  return count


# --- full checkpoints for export --------------------------------------------------


def compose_full_checkpoint(pinned: Snapshot, head_checkpoint: str, full_root: str,
                            keep: int) -> str:
  """A checkpoint of `pinned`'s values and every tensor of `head_checkpoint`.

  Written once per head checkpoint into full_root/<name>-<tag>/ (the tag
  hashes the head checkpoint's path, size, mtime and the snapshot id), as a
  published directory; the newest `keep` (at least 2) are kept.

  Returns:
    The composed checkpoint's prefix.
  """
  name = os.path.basename(head_checkpoint)
  stat = tf.io.gfile.stat(head_checkpoint + ".index")
  tag = hashlib.sha1(json.dumps([key_lib.absolute(head_checkpoint), stat.length, stat.mtime_nsec,
                                 pinned.id]).encode()).hexdigest()[:10]
  final = os.path.join(full_root, f"{name}-{tag}")
  if tf.io.gfile.exists(os.path.join(final, name + ".index")):
    return os.path.join(final, name)
  values = read_checkpoint(pinned.prefix)
  values.update(read_checkpoint(head_checkpoint))
  tf.io.gfile.makedirs(full_root)
  remove_stale_temps(full_root)
  tmp = temp_dir(final)
  write_checkpoint(os.path.join(tmp, name), values)
  publish_dir(tmp, final)
  log.info("feature cache: composed %s (backbone snapshot %s + %s)", final, pinned.id,
           head_checkpoint)
  _prune(full_root, max(2, keep))
  return os.path.join(final, name)


def _prune(full_root: str, keep: int) -> None:
  entries = []
  for entry in tf.io.gfile.listdir(full_root):
    entry = entry.rstrip("/")
    if files.TEMP_MARK in entry:
      continue
    path = os.path.join(full_root, entry)
    entries.append((tf.io.gfile.stat(path).mtime_nsec, path))
  for _, path in sorted(entries)[:-keep]:
    tf.io.gfile.rmtree(path)
