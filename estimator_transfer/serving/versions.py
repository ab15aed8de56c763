"""TF Serving's model layout: <export_dir>/<version>/saved_model.pb.

A version is written under `temp-<version>-<id>` (TF Serving ignores
non-numeric names), optionally verified, and renamed to `<version>` only when
complete; on failure the temporary directory is removed, and one left by a
killed export is removed by a later export once it is old enough to be dead.
The newest `keep` versions are kept.
"""
import logging
import os
import time
import uuid
from typing import Callable, List, Optional

import tensorflow as tf

from estimator_transfer.errors import ConfigError

log = logging.getLogger("estimator_transfer")

SAVED_MODEL_FILENAME = "saved_model.pb"
ASSETS_EXTRA = "assets.extra"  # TF Serving's directory for warmup and other extras
TEMP_PREFIX = "temp-"
_STALE_TEMP_SECONDS = 3600


def list_versions(export_dir: str) -> List[str]:
  """Complete version directories under `export_dir`, oldest first."""
  if not tf.io.gfile.isdir(export_dir):
    return []
  versions = [int(d.rstrip("/")) for d in tf.io.gfile.listdir(export_dir)
              if d.rstrip("/").isdigit()]
  return [os.path.join(export_dir, str(v)) for v in sorted(versions)
          if tf.io.gfile.exists(os.path.join(export_dir, str(v), SAVED_MODEL_FILENAME))]


def latest_version(path: str) -> str:
  """`path` itself when it is a SavedModel, else its newest version.

  Raises:
    ConfigError: neither.
  """
  if tf.io.gfile.exists(os.path.join(path, SAVED_MODEL_FILENAME)):
    return path
  if not tf.io.gfile.exists(path):
    raise ConfigError(f"{path} does not exist; give a SavedModel version directory or "
                      "a TF Serving base path.")
  versions = list_versions(path)
  if not versions:
    raise ConfigError(f"{path} is not a SavedModel and has no version "
                      "directories (<n>/saved_model.pb); check the path.")
  newest = int(os.path.basename(versions[-1]))
  for name in tf.io.gfile.listdir(path):
    name = name.rstrip("/")
    if name.isdigit() and int(name) > newest:
      log.warning("%s has no %s (an incomplete version: TF Serving would fail to load "
                  "it); using %s", os.path.join(path, name), SAVED_MODEL_FILENAME,
                  versions[-1])
  return versions[-1]


def _version_of(name: str) -> Optional[int]:
  """The version a numeric or temporary directory name stands for."""
  name = name.rstrip("/")
  if name.startswith(TEMP_PREFIX):
    name = name[len(TEMP_PREFIX):].split("-")[0]
  return int(name) if name.isdigit() else None


def new_version(export_dir: str) -> int:
  """A version number above every version (complete or not) in `export_dir`."""
  # Seconds like Estimator, but always above what is there: two exports in
  # one second, or a clock that went back, must not reuse or lower a version.
  taken = [_version_of(n) for n in tf.io.gfile.listdir(export_dir)]
  return max([int(time.time())] + [t + 1 for t in taken if t is not None])


def remove_stale_temps(export_dir: str) -> None:
  """Removes temp dirs left by a killed export (old enough to be dead)."""
  now = time.time()
  for name in tf.io.gfile.listdir(export_dir):
    if not name.startswith(TEMP_PREFIX):
      continue
    path = os.path.join(export_dir, name.rstrip("/"))
    try:
      age = now - tf.io.gfile.stat(path).mtime_nsec / 1e9
    except tf.errors.OpError:
      continue
    if age > _STALE_TEMP_SECONDS:
      log.info("export: removing %s left by an interrupted export", path)
      tf.io.gfile.rmtree(path)


def publish_version(export_dir: str, write: Callable[[str], None]) -> str:
  """Writes a new version under a temporary name, then renames it into place.

  Args:
    export_dir: the TF Serving model base path (created when missing).
    write: called with the temporary directory to fill; raising there (a
      failed save, a failed verification) publishes nothing.

  Returns:
    `<export_dir>/<version>`.

  Raises:
    Whatever `write` raises; the temporary directory is removed first.
  """
  tf.io.gfile.makedirs(export_dir)
  remove_stale_temps(export_dir)
  version = new_version(export_dir)
  temp = os.path.join(export_dir, f"{TEMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}")
  final = os.path.join(export_dir, str(version))
  try:
    write(temp)
    tf.io.gfile.rename(temp, final)
  except BaseException:
    if tf.io.gfile.exists(temp):
      tf.io.gfile.rmtree(temp)
    raise
  return final


def prune_versions(export_dir: str, keep: int) -> None:
  """Removes all but the newest `keep` versions (0 keeps every one)."""
  for old in list_versions(export_dir)[:-keep]:
    tf.io.gfile.rmtree(old)
