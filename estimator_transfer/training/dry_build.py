"""The training graph built once in a scratch graph, before anything is written.

A setting that only the backbone can judge (a freeze spec matching no layer,
an unfreeze stage without variables, nothing left trainable, a dtype policy a
saved module cannot take) fails while the model_fn builds its graph. The
training loop calls `check_training_graph` after the data checks and before
its first write, so such a setting is refused with model_dir untouched
(config.json and flags.txt are never rewritten with a value that fails).

A new local run (its model_dir missing or empty) has nothing to protect and
skips the scratch build (a quarter of a small model's start-up): the real
build makes the same checks, and when it refuses a setting the loop removes
what the run wrote (`undo_new_run`), leaving the model_dir as empty as it was.
"""
import logging
import os
from typing import Dict, Optional

import tensorflow as tf

from estimator_transfer import config as config_lib
from estimator_transfer import files
from estimator_transfer import specs
from estimator_transfer.model import model_fn as model_fn_lib
from estimator_transfer.training import checkpoints
from estimator_transfer.training import run_config

log = logging.getLogger("estimator_transfer")


def check_training_graph(experiment, input_fn, resume: Optional[str] = None) -> None:
  """Builds `experiment`'s TRAIN graph on `input_fn` in a scratch graph.

  Nothing runs and nothing is written: the config's model_dir is blanked (the
  model_fn writes trainable_variables.json only for a graph with one), a
  training size is set so that epoch-based settings do not count the data a
  second time, and `balanced` class weights become none (their count is a
  data question, answered when training starts). The feature-cache mode has
  no backbone in its training graph and is skipped.

  Args:
    experiment: the resolved `training.experiment.Experiment`.
    input_fn: the training input_fn (its pipeline is built, never run).
    resume: the checkpoint a resume starts from: every variable of the graph
      is matched against it by name and shape.

  Raises:
    ConfigError: a setting does not fit the backbone, the head or the checkpoint.
  """
  cfg = experiment.config
  if cfg.input.cache_features:
    return
  dry = cfg.replace(run__model_dir="", schedule__train_size=cfg.schedule.train_size or 1,
                    head__class_weights=("" if cfg.head.class_weights == specs.BALANCED
                                         else cfg.head.class_weights))
  level = log.level
  log.setLevel(logging.WARNING)  # the real build logs the freeze plan
  try:
    with tf.Graph().as_default():
      # As the Estimator's graph: under op determinism unseeded ops would raise.
      tf.compat.v1.set_random_seed(run_config.graph_seed(cfg.run.seed))
      dataset = input_fn()
      if isinstance(dataset, tf.data.Dataset):
        features, labels = tf.compat.v1.data.make_initializable_iterator(dataset).get_next()
      else:
        features, labels = dataset
      model_fn = model_fn_lib.build_model_fn(dry, experiment.backbone)
      model_fn(features, labels, tf.estimator.ModeKeys.TRAIN, None)
      if resume:
        checkpoints.check_graph_fits(resume, cfg.run.model_dir)
  finally:
    log.setLevel(level)


def is_new_local_run(model_dir: str, local_without_checkpoint: bool) -> bool:
  """A local run into a missing or empty local model_dir (its lock file aside)."""
  if not local_without_checkpoint or files.is_remote(model_dir):
    return False
  if not os.path.isdir(model_dir):
    return True
  return not [n for n in os.listdir(model_dir) if n != files.LOCK_NAME]


def undo_new_run(model_dir: str, lock: Optional[files.ModelDirLock]) -> None:
  """Removes what a refused new run wrote, unless it saved a checkpoint.

  The lock file is the lock's own to remove.
  """
  if not os.path.isdir(model_dir) or tf.train.latest_checkpoint(model_dir):
    return
  keep = {files.LOCK_NAME} if lock is not None and lock.held else set()
  for name in os.listdir(model_dir):
    if name not in keep:
      files.remove_tree(os.path.join(model_dir, name))


def may_change_model_dir(cfg, resume: Optional[str],
                         extra_files: Optional[Dict[str, str]]) -> bool:
  """False when the chief's first writes would rewrite model_dir's records unchanged.

  The scratch build guards those writes; a resume (`resume`: the chief's
  readable checkpoint) with the same config and flags (re-running a
  preempted command) changes nothing there, so it skips the scratch build
  and the real graph build makes the same checks. Workers write nothing but
  check before joining (they pass no `resume`).
  """
  if not resume:
    return True
  model_dir = cfg.run.model_dir
  records = {config_lib.CONFIG_FILENAME: cfg.to_json(), **(extra_files or {})}
  return any(files.read_text(os.path.join(model_dir, name)) != text
             for name, text in records.items())
