"""The training graph built once in a scratch graph, before anything is written.

A setting that only the backbone can judge (a freeze spec matching no layer,
an unfreeze stage without variables, nothing left trainable, a dtype policy a
saved module cannot take) fails while the model_fn builds its graph. The
training loop calls `check_training_graph` after the data checks and before
its first write, so such a setting is refused with model_dir untouched
(config.json and flags.txt are never rewritten with a value that fails).
"""
import logging
from typing import Optional

import tensorflow as tf

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
