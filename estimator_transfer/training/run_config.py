"""The one RunConfig builder: local runs and every TF_CONFIG role."""
import random
from typing import Optional

import tensorflow as tf

from estimator_transfer.cluster import tf_config as cluster
from estimator_transfer.config import ExperimentConfig


_determinism = {"on": False}  # whether a seeded run of this process turned it on


def enable_determinism(seed: Optional[int]) -> None:
  """With --seed: TensorFlow's op determinism, for the rest of this process.

  Process-global state (`tf.config.experimental.enable_op_determinism`), so
  only a seeded run turns it on, before its first graph runs, and nothing
  turns it off: it stays on for every later graph of the process. Ops
  without a deterministic kernel raise instead of varying (none that
  training uses on CPU), tf.data keeps its order (a seeded pipeline asks for
  that anyway), and random ops with no seed at all raise: an unseeded run
  later in the same process gets a graph seed of its own (`graph_seed`).
  """
  if seed is not None:
    tf.config.experimental.enable_op_determinism()
    _determinism["on"] = True


def graph_seed(seed: Optional[int]) -> Optional[int]:
  """The Estimator's graph seed: --seed; without it None, or a fresh one.

  A fresh one only once op determinism is on (a seeded run came first in
  this process): unseeded random ops would raise there, and the run stays
  as random as without determinism.
  """
  if seed is not None or not _determinism["on"]:
    return seed
  return random.SystemRandom().randrange(1, 2**31)


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
  enable_determinism(r.seed)
  if task is None:
    task, distribution, train_distribute = cluster.Task(), "none", None
  else:
    distribution = config.cluster.distribution
    cluster.check(task, distribution, r.model_dir)
    train_distribute = strategy or cluster.build_strategy(distribution, task)
  return tf.estimator.RunConfig(
      model_dir=r.model_dir,
      tf_random_seed=graph_seed(r.seed),
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
