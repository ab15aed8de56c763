"""Checkpoint files: check them before a run trusts them; fall back when asked.

TensorFlow treats a garbage `checkpoint` state file, or one that names files
that are gone, as "no checkpoint" (one log line) and then trains from scratch,
silently discarding a long run; a truncated index or a missing data shard only
fails deep inside session creation. `resolve_resume_checkpoint` makes each of
these a `CheckpointError` that names the file, or, with
`on_corrupt="previous"`, resumes from the newest checkpoint that reads back.

What counts as committed: the Saver writes the data and index files first and
the state file last (atomically), so a checkpoint is committed once the state
file names it. Files of a newer step that the state file does not name are the
leftovers of a save that was interrupted (SIGKILL, preemption): they are not
an error, and the next save of that step overwrites them.
"""
import dataclasses
import logging
import os
import re
import time
from typing import List, Optional

import tensorflow as tf
from google.protobuf import text_format
from tensorflow.python.training import checkpoint_state_pb2

from estimator_transfer import config as config_lib
from estimator_transfer import files
from estimator_transfer.errors import ConfigError

log = logging.getLogger("estimator_transfer")

STATE_FILENAME = "checkpoint"
ON_CORRUPT_CHOICES = ("error", "previous")
_INDEX_RE = re.compile(r"^(?P<prefix>.+)-(?P<step>\d+)\.index$")
_SHARD_RE = re.compile(r"\.data-(\d+)-of-(\d+)$")
_FIX = ("restore the file, or re-run et-train with --on_corrupt_checkpoint=previous to "
        "resume from the newest readable checkpoint")


# Settings a checkpoint's variables depend on: resuming with other values is
# refused unless allow_config_change (the restore would fail or, worse, fit).
_RESUME_SETTINGS = (("backbone", "handle"), ("backbone", "output_layer"),
                    ("backbone", "image_size"), ("head", "kind"),
                    ("head", "num_classes"), ("head", "class_names"),
                    ("head", "hidden_units"))


class CheckpointError(ConfigError):
  """A checkpoint file is missing or unreadable; the message names it."""


@dataclasses.dataclass(frozen=True)
class Candidate:
  step: int
  prefix: str  # model_dir/model.ckpt-<step>


def step_of(prefix: str) -> int:
  """The global step encoded in a checkpoint prefix (`.../model.ckpt-120`)."""
  match = re.search(r"-(\d+)$", prefix)
  return int(match.group(1)) if match else -1


def list_candidates(model_dir: str) -> List[Candidate]:
  """Every checkpoint prefix with an index file in `model_dir`, newest first."""
  if not tf.io.gfile.isdir(model_dir):
    return []
  out = []
  for name in tf.io.gfile.listdir(model_dir):
    match = _INDEX_RE.match(name)
    if match:
      out.append(Candidate(int(match.group("step")),
                           os.path.join(model_dir, name[:-len(".index")])))
  return sorted(out, key=lambda c: c.step, reverse=True)


def data_files(prefix: str) -> List[str]:
  """The data shards a checkpoint prefix has on disk."""
  return sorted(tf.io.gfile.glob(glob_escape(prefix) + ".data-*-of-*"))


def glob_escape(path: str) -> str:
  """`path` with glob metacharacters escaped, for tf.io.gfile.glob."""
  return re.sub(r"([*?\[])", r"[\1]", path)


def verify(prefix: str, read_tensors: bool = True) -> None:
  """Checks that checkpoint `prefix` reads back.

  Args:
    prefix: a checkpoint prefix such as `model_dir/model.ckpt-100`.
    read_tensors: also read every tensor (catches truncated or corrupt data
      shards through their checksums); False only checks that the index parses
      and that every data shard exists.

  Raises:
    CheckpointError: the index or a data shard is missing or unreadable; the
      message names the file.
  """
  index = prefix + ".index"
  if not tf.io.gfile.exists(index):
    raise CheckpointError(f"checkpoint index {index} is missing; {_FIX}.")
  try:
    reader = tf.train.load_checkpoint(prefix)
    names = sorted(reader.get_variable_to_shape_map())
  except (tf.errors.OpError, ValueError) as e:
    raise CheckpointError(f"checkpoint index {index} is unreadable "
                          f"({_first_line(e)}); {_FIX}.") from e
  shards = data_files(prefix)
  expected = {int(m.group(2)) for m in map(_SHARD_RE.search, shards) if m}
  count = max(expected) if expected else 1
  for i in range(count):
    shard = f"{prefix}.data-{i:05d}-of-{count:05d}"
    if not tf.io.gfile.exists(shard):
      raise CheckpointError(f"checkpoint data shard {shard} is missing; {_FIX}.")
  if not read_tensors:
    return
  for name in names:
    try:
      reader.get_tensor(name)
    except Exception as e:  # pylint: disable=broad-except
      # OpError for a missing or corrupt shard; IndexError/ValueError for a
      # truncated one.
      files = ", ".join(shards) or f"{prefix}.data-*"
      raise CheckpointError(f"checkpoint data {files} is unreadable at tensor "
                            f"{name} ({_first_line(e)}); {_FIX}.") from e


def read_state(model_dir: str):
  """Parses `model_dir/checkpoint` strictly.

  Returns:
    The CheckpointState proto, or None when there is no state file.

  Raises:
    CheckpointError: the state file exists but does not parse or names no
      checkpoint.
  """
  path = os.path.join(model_dir, STATE_FILENAME)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      state = text_format.Parse(f.read(), checkpoint_state_pb2.CheckpointState())
  except (text_format.ParseError, UnicodeDecodeError, tf.errors.OpError) as e:
    raise CheckpointError(f"checkpoint state file {path} is unreadable "
                          f"({_first_line(e)}); {_FIX}.") from e
  if not state.model_checkpoint_path:
    raise CheckpointError(f"checkpoint state file {path} names no checkpoint; {_FIX}.")
  return state


def _state_prefix(model_dir: str, path: str) -> str:
  return path if os.path.isabs(path) else os.path.join(model_dir, path)


def resolve_resume_checkpoint(model_dir: str, on_corrupt: str = "error",
                              read_tensors: bool = True) -> Optional[str]:
  """The checkpoint a run in `model_dir` will resume from, checked.

  Args:
    model_dir: the run's directory.
    on_corrupt: "error" raises on a broken committed checkpoint; "previous"
      falls back to the newest readable one, moves the broken files into
      `model_dir/corrupt-<time>/` and rewrites the state file to name the
      fallback (so Estimator resumes from it).
    read_tensors: see `verify`.

  Returns:
    The checkpoint prefix to resume from, or None for a fresh start (no
    checkpoint, or only the leftovers of an interrupted very first save).

  Raises:
    CheckpointError: a committed checkpoint or the state file is broken and
      `on_corrupt` is "error", or nothing readable is left to fall back to.
  """
  if on_corrupt not in ON_CORRUPT_CHOICES:
    raise ConfigError(f"--on_corrupt_checkpoint={on_corrupt} is not supported; "
                      f"use one of {', '.join(ON_CORRUPT_CHOICES)}.")
  candidates = list_candidates(model_dir)
  broken = None
  try:
    state = read_state(model_dir)
    if state is None:
      committed = [c for c in candidates if c.step > 0]
      if not committed:
        if candidates:
          # Estimator's first save is at step 0: nothing was trained yet.
          log.warning("ignoring files of an interrupted first save in %s", model_dir)
        return None
      raise CheckpointError(
          f"{model_dir} holds checkpoints (newest {committed[0].prefix}) but its "
          f"state file {os.path.join(model_dir, STATE_FILENAME)} is missing; {_FIX}.")
    latest = _state_prefix(model_dir, state.model_checkpoint_path)
    broken = latest
    verify(latest, read_tensors=read_tensors)
    return latest
  except CheckpointError as error:
    if on_corrupt == "error":
      raise
    return _fall_back(model_dir, candidates, broken, error, read_tensors)


def _fall_back(model_dir, candidates, broken, error, read_tensors) -> str:
  for candidate in candidates:
    if broken and candidate.prefix == broken:
      continue
    try:
      verify(candidate.prefix, read_tensors=read_tensors)
    except CheckpointError as e:
      log.warning("checkpoint %s is unreadable too: %s", candidate.prefix, e)
      continue
    quarantine = _quarantine(model_dir, broken)
    readable = [c.prefix for c in reversed(candidates)
                if c.step <= candidate.step and c.prefix != broken]
    write_state(model_dir, candidate.prefix, readable)
    log.warning("%s; --on_corrupt_checkpoint=previous: resuming from %s (step %d)%s",
                str(error).split("; restore the file")[0], candidate.prefix,
                candidate.step, f"; broken files moved to {quarantine}" if quarantine
                else "")
    return candidate.prefix
  raise CheckpointError(
      f"{str(error).split('; restore the file')[0]}, and no other checkpoint in "
      f"{model_dir} is readable; start a new --model_dir (--warm_start_from can "
      "reuse a readable checkpoint or export).") from error


def _quarantine(model_dir: str, broken: Optional[str]) -> Optional[str]:
  """Moves the broken checkpoint's files and the state file aside (kept, not deleted)."""
  dest = os.path.join(model_dir, time.strftime("corrupt-%Y%m%d-%H%M%S"))
  moved = False
  paths = [os.path.join(model_dir, STATE_FILENAME)]
  if broken and os.path.dirname(os.path.abspath(broken)) == os.path.abspath(model_dir):
    paths += tf.io.gfile.glob(glob_escape(broken) + ".*")
  for path in paths:
    if tf.io.gfile.exists(path):
      tf.io.gfile.makedirs(dest)
      tf.io.gfile.rename(path, os.path.join(dest, os.path.basename(path)), overwrite=True)
      moved = True
  return dest if moved else None


def write_state(model_dir: str, latest: str, all_paths: List[str]) -> None:
  """Writes the `checkpoint` state file atomically, with relative paths."""
  def rel(path):
    same_dir = os.path.dirname(os.path.abspath(path)) == os.path.abspath(model_dir)
    return os.path.basename(path) if same_dir else path
  lines = [f'model_checkpoint_path: "{rel(latest)}"']
  lines += [f'all_model_checkpoint_paths: "{rel(p)}"' for p in all_paths]
  files.write_atomically(os.path.join(model_dir, STATE_FILENAME), "\n".join(lines) + "\n")


def copy_checkpoint(prefix: str, dest_dir: str) -> str:
  """Copies a checkpoint's index and data files into `dest_dir`.

  Each file is written under a temporary name and renamed, and the index last,
  so a half-copied checkpoint never has an index. Older checkpoints in
  `dest_dir` are removed afterwards.

  Returns:
    The new prefix in `dest_dir`.
  """
  tf.io.gfile.makedirs(dest_dir)
  new_prefix = os.path.join(dest_dir, os.path.basename(prefix))
  for src in data_files(prefix) + [prefix + ".index"]:
    dst = os.path.join(dest_dir, os.path.basename(src))
    files.copy_atomically(src, dst)
  keep = os.path.basename(prefix) + "."
  for name in tf.io.gfile.listdir(dest_dir):
    if (_INDEX_RE.match(name) or _SHARD_RE.search(name)) and not name.startswith(keep):
      tf.io.gfile.remove(os.path.join(dest_dir, name))
  return new_prefix


def check_graph_fits(checkpoint: str, model_dir: str) -> None:
  """Checks every global variable of the default graph against `checkpoint`.

  Raises:
    ConfigError: a variable is missing from the checkpoint or has another
      shape there (the restore would fail, or silently fit the wrong shape).
  """
  shapes = tf.train.load_checkpoint(checkpoint).get_variable_to_shape_map()
  problems = []
  for var in tf.compat.v1.global_variables():
    name, shape = var.op.name, var.shape.as_list()
    if name not in shapes:
      problems.append(f"{name} is not in the checkpoint")
    elif list(shapes[name]) != shape:
      problems.append(f"{name} is {list(shapes[name])} in the checkpoint, {shape} here")
  if problems:
    more = f"; {len(problems) - 1} more" if len(problems) > 1 else ""
    raise ConfigError(
        f"the checkpoint {checkpoint} does not fit the model this config builds "
        f"({problems[0]}{more}); resume with the settings it was trained with, or "
        f"start a new --model_dir with --warm_start_from={model_dir}.")


def check_resume_compatible(config: config_lib.ExperimentConfig, resume: str,
                            allow: bool) -> None:
  """Refuses to resume a checkpoint trained with other backbone/head settings.

  Raises:
    ConfigError: settings in `_RESUME_SETTINGS` differ from model_dir's saved
      config and `allow` (--allow_config_change) is off.
  """
  model_dir = config.run.model_dir
  saved = config_lib.load(model_dir)
  if saved is None:
    return
  changes = []
  for section, field in _RESUME_SETTINGS:
    old = getattr(getattr(saved, section), field, None)
    new = getattr(getattr(config, section), field, None)
    if field == "image_size" and not (old and new):
      continue
    if old != new:
      changes.append(f"{section}.{field} {_short(old)} -> {_short(new)}")
  if not changes:
    return
  if not allow:
    raise ConfigError(
        f"{model_dir} holds a model ({os.path.basename(resume)}) trained with other "
        f"settings ({'; '.join(changes)}); resume with its saved settings (drop those "
        f"flags), start a new --model_dir (--warm_start_from={model_dir} reuses its "
        "weights), or pass --allow_config_change.")
  log.warning("--allow_config_change: resuming %s with changed settings: %s",
              model_dir, "; ".join(changes))


def _short(value) -> str:
  text = repr(tuple(value) if isinstance(value, list) else value)
  return text if len(text) <= 60 else text[:57] + "..."


def _first_line(error: Exception) -> str:
  text = getattr(error, "message", None) or str(error) or type(error).__name__
  return text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
