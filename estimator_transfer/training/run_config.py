"""The one RunConfig builder: local runs and every TF_CONFIG role."""
from typing import Optional

import tensorflow as tf

from estimator_transfer.cluster import tf_config as cluster
from estimator_transfer.config import ExperimentConfig


def build_run_config(config: ExperimentConfig, task: Optional[cluster.Task] = None,
                     strategy=None) -> tf.estimator.RunConfig:
  """The Estimator RunConfig of `config` for `task`.

  Args:
    config: the run's config.
    task: this process's task; None: a local Estimator without a distribution
      strategy (evaluation, export, prediction). Call inside
      `cluster.tf_config_env(task)` for a cluster task: RunConfig reads
      TF_CONFIG from the environment.
    strategy: the train_distribute strategy (`cluster.build_strategy`); built
      here when None and `cluster.distribution` asks for one.

  Returns:
    The RunConfig.

  Raises:
    ConfigError: the distribution does not fit the cluster.
  """
  r = config.run
  if task is None:
    task, distribution, train_distribute = cluster.Task(), "none", None
  else:
    distribution = config.cluster.distribution
    cluster.check(task, distribution, r.model_dir)
    train_distribute = strategy or cluster.build_strategy(distribution, task)
  return tf.estimator.RunConfig(
      model_dir=r.model_dir,
      tf_random_seed=r.seed,
      save_checkpoints_steps=r.save_checkpoints_steps,
      save_checkpoints_secs=None,
      keep_checkpoint_max=r.keep_checkpoint_max,
      log_step_count_steps=r.log_every_steps,
      save_summary_steps=r.log_every_steps,
      # No graph.pbtxt and no .meta file per checkpoint: text-serialising the
      # training graph cost about a second of every start (and of every
      # checkpoint); TensorBoard still gets the graph from the event file,
      # and restores, warm starts and exports read only index + data files.
      checkpoint_save_graph_def=False,
      session_config=cluster.session_config(task, distribution, r.intra_op_threads,
                                            r.inter_op_threads),
      train_distribute=train_distribute)
