"""Checks the read-only scripts (et-evaluate, et-export, et-predict) run first.

Each names what is wrong with a --model_dir, a --checkpoint_path or an output
location in one sentence, before any graph is built or anything is written,
so that a wrong path never surfaces as a TensorFlow traceback half way.
"""
import errno
import json
import os
import re
import tempfile
from typing import Optional

from estimator_transfer import files
from estimator_transfer.config import experiment as config_experiment
from estimator_transfer.errors import ConfigError
from estimator_transfer.training import checkpoints
from estimator_transfer.training import early_stopping

CONFIG_FILENAME = config_experiment.CONFIG_FILENAME
_SHARD_SUFFIX = re.compile(r"\.(index|data-\d+-of-\d+)$")


def check_model_dir(model_dir: str, checkpoint_path: str = "") -> None:
  """Refuses a --model_dir that holds no trained model.

  Args:
    model_dir: the --model_dir value.
    checkpoint_path: --checkpoint_path; a model_dir without checkpoints is
      fine when it names one elsewhere.

  Raises:
    ConfigError: missing, not a directory, an unreadable config.json, or
      neither a config.json nor a checkpoint.
  """
  if not model_dir or files.is_remote(model_dir):
    return  # flags_to_config names a missing --model_dir
  if not os.path.exists(model_dir):
    raise ConfigError(f"--model_dir={model_dir} does not exist; give the directory "
                      "et-train wrote (it holds config.json and model.ckpt-* files).")
  if not os.path.isdir(model_dir):
    raise ConfigError(f"--model_dir={model_dir} is a file, not a directory; give the "
                      "directory et-train wrote.")
  config = os.path.join(model_dir, CONFIG_FILENAME)
  if os.path.lexists(config):
    _check_config_file(config)
  elif not checkpoints.list_candidates(model_dir) and not checkpoint_path:
    raise ConfigError(f"--model_dir={model_dir} holds no trained model (no "
                      "config.json, no checkpoint); train first with et-train or give "
                      "the model_dir of a trained model.")


def _check_config_file(path: str) -> None:
  fix = "restore it from a backup, or start a new --model_dir"
  if not os.path.isfile(path):
    raise ConfigError(f"{path} is not a regular file (a directory, FIFO or broken "
                      f"link); {fix}.")
  try:
    with open(path, "rb") as f:
      data = json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise ConfigError(f"{path} is not a valid estimator-transfer config ({e}); "
                      f"{fix}.") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{path} is not a valid estimator-transfer config (it holds a "
                      f"JSON {type(data).__name__}, not an object); {fix}.")


def resolve_checkpoint(model_dir: str, value: str) -> Optional[str]:
  """The checkpoint prefix --checkpoint_path names, read back in full.

  Args:
    model_dir: the run's directory.
    value: "" or "latest" (the latest), "best" (kept by et-train's eval
      loop), or a prefix; a path to one of its files (`.index`, `.data-*`) is
      taken as its prefix.

  Returns:
    The prefix, or None for the latest of a model_dir that has none (the
    caller then names the missing checkpoint).

  Raises:
    ConfigError: no best checkpoint, a missing prefix, or an unreadable
      index or data shard (the message names the file).
  """
  if value == "best":
    prefix = early_stopping.LoopState.load(model_dir).best_path(model_dir)
    if not prefix:
      raise ConfigError(f"{model_dir} has no best checkpoint yet; train with "
                        "--eval_data and --early_stopping_metric, or use "
                        "--checkpoint_path=latest.")
  elif value in ("", "latest"):
    prefix = checkpoints.resolve_resume_checkpoint(model_dir, read_tensors=False)
    if not prefix:
      return None
  else:
    prefix = _SHARD_SUFFIX.sub("", value)
    if not os.path.lexists(prefix + ".index") and not files.is_remote(prefix):
      what = ("a directory" if os.path.isdir(value) else
              "a file but not a checkpoint" if os.path.exists(value) else "missing")
      raise ConfigError(f"--checkpoint_path={value} is {what}; give a checkpoint "
                        "prefix such as model_dir/model.ckpt-1000 (the name before "
                        ".index), 'latest' or 'best'.")
  checkpoints.verify(prefix, read_tensors=True)
  return prefix


def check_output_dir(path: str, flag: str) -> None:
  """Refuses an output directory that cannot be created or written.

  Raises:
    ConfigError: `path` or a parent is a file, or the place is read-only or
      not writable (named with the cause).
  """
  if not path or files.is_remote(path):
    return
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = "is a file" if existing == os.path.abspath(path) else f"is under the file {existing}"
    raise ConfigError(f"{flag}={path} {where}, not a directory; choose another {flag}.")
  try:
    with tempfile.NamedTemporaryFile(dir=existing, prefix=".et-write-probe-"):
      pass
  except OSError as e:
    error = files.storage_error(e, existing) or ConfigError(
        f"cannot write to {existing} ({os.strerror(e.errno or errno.EIO)}); choose "
        f"another {flag}.")
    raise error from None


def check_output_file(path: str, flag: str) -> None:
  """Like `check_output_dir` for a file: it must not be an existing directory."""
  if os.path.isdir(path):
    raise ConfigError(f"{flag}={path} is a directory; give a file name in it.")
  parent = os.path.dirname(os.path.abspath(path))
  existing = parent
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"{flag}={path} is under the file {existing}, which is not a "
                      f"directory; choose another {flag}.")
  check_output_dir(parent, flag)


def check_same_classes(cfg, model_dir: str) -> None:
  """Refuses a --label_map or data that changes the classes of a trained model.

  Raises:
    ConfigError: `cfg` has other classes than the config saved in model_dir.
  """
  saved = config_experiment.load(model_dir)
  if saved is None or not saved.head.class_names:
    return
  old, new = list(saved.head.class_names), list(cfg.head.class_names)
  if new and new != old:
    extra = [n for n in new if n not in old]
    what = f"classes {', '.join(extra[:5])}" if extra else "another class order"
    raise ConfigError(f"--label_map / the data give {what}, but the model in "
                      f"{model_dir} has {len(old)} classes ({', '.join(old[:5])}"
                      f"{', ...' if len(old) > 5 else ''}); drop --label_map or use data "
                      "of the model's classes.")
