"""What each TF_CONFIG role runs, around the one training loop.

  chief / master  trains (`training.loop`), checkpoints, exports at the end;
                  records its step count in model_dir/cluster/<task>.json and
                  can hold its first step until the workers joined
  worker          trains; records its step count; no checkpoints or exports
  ps              serves the variables and never returns (`serve_parameters`)
  evaluator       evaluates each new checkpoint with the loop's evaluator,
                  records the results in model_dir/cluster/evaluator-0.json

What a cluster cannot do that a local run does is refused here, at start-up,
before anything is written (`check_role`): restoring the best checkpoint on a
regression rewinds the chief's weights behind the asynchronous workers' backs.
"""
import logging
import os
import time
from typing import Dict, List, Optional, Tuple

import tensorflow as tf

from estimator_transfer import files
from estimator_transfer.cluster import tf_config as cluster
from estimator_transfer.cluster.tf_config import EVALUATOR, MASTER, PS, WORKER, Task
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.errors import ConfigError
from estimator_transfer.training import run_config

log = logging.getLogger("estimator_transfer")

# Per-task step records (written by TaskStepsHook, EvaluationRecord) live here.
TASKS_DIRNAME = "cluster"


def check_role(task: Task, config: ExperimentConfig) -> None:
  """Refuses, before anything is written, what this role cannot do with `config`.

  Raises:
    ConfigError: restore-best (--regression_tolerance) in a cluster job (it
      rewinds the chief's weights behind the workers' backs); a 'master'
      without --eval_data (it evaluates as it trains); a training task
      without --train_data; an evaluator without --eval_data.
  """
  if task.is_local:
    return
  if config.guards.regression_tolerance is not None:
    raise ConfigError("--regression_tolerance restores the best checkpoint in "
                      "single-machine runs only; drop it for a cluster (TF_CONFIG) job.")
  data = config.input
  if task.task_type == MASTER and not data.eval_data:
    raise ConfigError("a 'master' task evaluates as it trains; give --eval_data "
                      "(or name the job 'chief' and run an evaluator task).")
  if task.trains and not data.train_data:
    raise ConfigError(f"--train_data is required for the {task.task_type} task.")
  if task.task_type == EVALUATOR and not data.eval_data:
    raise ConfigError("the evaluator task needs --eval_data.")


def describe(task: Task, distribution: str, max_steps: int, model_dir: str,
             export_dir: str = "", eval_data: str = "") -> List[str]:
  """Human-readable lines: what this task will do (for `--check_cluster`)."""
  lines = []
  if task.cluster:
    jobs = ", ".join(f"{job} x{len(a)}" for job, a in sorted(task.cluster.items()))
    note = " (evaluator listed in the cluster: dropped, it is not part of it)" \
        if task.dropped_evaluator else ""
    lines.append(f"cluster: {jobs}{note}")
  if task.is_local:
    lines.append("this task: local (no cluster): et-train's local loop trains in "
                 "this process")
  else:
    where = f" at {task.address}" if task.address else ""
    lines.append(f"this task: {task.task_type} {task.index}{where}")
  lines.append(f"distribution: {distribution}: {_distribution_words(task, distribution)}")
  role = task.task_type
  if task.trains:
    what = f"trains until global step {max_steps}"
    if task.is_chief:
      what += f"; writes checkpoints and summaries to {model_dir}"
      if task.is_local and eval_data:
        what += (f"; evaluates {eval_data} as --eval_every_steps / "
                 "--early_stopping_metric ask")
      what += (f"; exports to {export_dir} at the end" if export_dir
               else "; no export (no --export_dir)")
    else:
      what += "; no checkpoints, summaries or exports (the chief's job)"
    lines.append(f"will: {what}")
  elif role == PS:
    lines.append("will: serve variables until the job stops it (a ps never exits)")
  elif role == EVALUATOR:
    lines.append(f"will: evaluate {eval_data or '(no --eval_data!)'} on each new "
                 f"checkpoint in {model_dir} until one reaches step {max_steps}; "
                 "writes eval_results.json there")
  lines.append(f"model_dir: {model_dir}")
  return lines


def _distribution_words(task: Task, distribution: str) -> str:
  if distribution == "none":
    if task.is_local or not task.num_ps:
      return "one device, no strategy"
    return (f"asynchronous between-graph replication, variables on {task.num_ps} ps "
            "task(s)")
  return {
      "mirrored": "synchronous in-graph replication over this machine's devices",
      "multi_worker_mirrored": (f"synchronous all-reduce over {task.num_trainers} "
                                "trainer(s)"),
      "parameter_server": (f"parameter-server strategy over {task.num_ps} ps "
                           "task(s) (distribute coordinator)"),
  }[distribution]


def task_steps_path(model_dir: str, task: Task) -> str:
  """Where a training task records how many steps it ran (see TaskStepsHook)."""
  return os.path.join(model_dir, TASKS_DIRNAME, f"{task.name}.json")


def trainer_hooks(task: Task, config: ExperimentConfig) -> Tuple[list, Optional["TaskStepsHook"]]:
  """The hooks a training task adds to the loop's guards.

  Every trainer counts its steps; a cluster task also records them in
  model_dir/cluster/<task>.json, and the chief may wait for the workers and
  copy its summaries to --summary_dir.

  Returns:
    (hooks, the task's TaskStepsHook; None for a task that does not train).
  """
  if not task.trains:
    return [], None
  model_dir, every = config.run.model_dir, config.run.log_every_steps
  steps = TaskStepsHook("" if task.is_local else task_steps_path(model_dir, task),
                        task.name, every)
  out = [steps]
  if task.is_local:
    return out, steps
  workers = [Task(WORKER, i, task.cluster)
             for i in range(len(task.cluster.get(WORKER, ())))]
  if task.is_chief and workers and config.cluster.wait_for_workers_secs:
    out.append(WaitForWorkersHook(model_dir, workers, config.cluster.wait_for_workers_secs))
  if task.is_chief and config.cluster.summary_dir:
    out.append(ExtraSummaryHook(every, config.cluster.summary_dir))
  return out, steps


class TaskStepsHook(tf.compat.v1.train.SessionRunHook):
  """Counts the training steps this process runs; records them in a JSON file.

  In asynchronous training every trainer advances the shared global step;
  this is how much of it each one did. With no `path` (a local run) it only
  counts. One instance serves every training segment of a run.
  """

  def __init__(self, path: str, task_name: str, every_steps: int):
    self.path = path
    self._task_name = task_name
    self._every = max(1, every_steps)
    self.local_steps = 0
    self._first_global_step = None
    self._last_global_step = None
    self._joined_at = None

  def begin(self):
    self._global_step = tf.compat.v1.train.get_global_step()

  def after_create_session(self, session, coord):
    self._joined_at = time.time()
    self._write(final=False)  # "joined": what the chief's WaitForWorkersHook waits for

  def before_run(self, run_context):
    return tf.compat.v1.train.SessionRunArgs(self._global_step)

  def after_run(self, run_context, run_values):
    step = int(run_values.results)
    self.local_steps += 1
    if self._first_global_step is None:
      self._first_global_step = step
    self._last_global_step = step
    if self.local_steps % self._every == 0:
      self._write(final=False)

  def end(self, session):
    self._write(final=True)
    if self.path:
      log.info("%s ran %d training steps (global steps %s..%s)", self._task_name,
               self.local_steps, self._first_global_step, self._last_global_step)

  def _write(self, final: bool):
    if not self.path:
      return
    files.write_json(self.path, {
        "task": self._task_name, "local_steps": self.local_steps,
        "first_global_step": self._first_global_step,
        "last_global_step": self._last_global_step, "finished": final,
        "joined_at": self._joined_at}, indent=1, sort_keys=False)


class WaitForWorkersHook(tf.compat.v1.train.SessionRunHook):
  """Holds the chief's first step until every worker has joined (or a timeout).

  In asynchronous training the chief starts alone and, on a short job, can
  be done before a worker has its session; waiting makes every trainer take
  part. A worker has joined when its step record (written right after its
  session is created) is newer than this chief's start.
  """

  def __init__(self, model_dir: str, workers: List[Task], timeout_secs: float):
    self._paths = {w.name: task_steps_path(model_dir, w) for w in workers}
    self._timeout = timeout_secs
    self._started = time.time()

  def after_create_session(self, session, coord):
    deadline = time.time() + self._timeout
    waiting = dict(self._paths)
    while waiting and time.time() < deadline:
      for name, path in list(waiting.items()):
        if self._joined(path):
          log.info("%s joined", name)
          del waiting[name]
      if waiting:
        time.sleep(0.5)
    if waiting:
      log.warning("starting without %s: not joined after %ds (--wait_for_workers_secs)",
                  ", ".join(sorted(waiting)), self._timeout)

  def _joined(self, path: str) -> bool:
    try:
      record = files.read_json(path) or {}
    except (OSError, ValueError, tf.errors.OpError):
      return False
    # Clocks differ between hosts: allow a minute of skew. A record from an
    # earlier incarnation of the job is older than that.
    return float(record.get("joined_at") or 0) >= self._started - 60


class ExtraSummaryHook(tf.compat.v1.train.SummarySaverHook):
  """Writes the graph's summaries to a second directory (e.g. Vertex TensorBoard)."""

  def __init__(self, every_steps: int, output_dir: str):
    super().__init__(save_steps=every_steps, output_dir=output_dir,
                     summary_op=())  # the graph's merged summaries, set in begin()

  def begin(self):
    self._summary_op = tf.compat.v1.summary.merge_all()
    super().begin()

  def _get_summary_op(self):
    return [self._summary_op] if self._summary_op is not None else None


class EvaluationRecord:
  """An after-evaluation callback: the evaluations of this task, on disk.

  Appends each result to `record_path` (model_dir/cluster/evaluator-0.json)
  and writes its scalars to `summary_dir/eval` for TensorBoard.
  """

  def __init__(self, task_name: str, record_path: str, summary_dir: str, max_steps: int):
    self.path = record_path
    self._task_name = task_name
    self._summary_dir = summary_dir
    self._max_steps = max_steps
    self._history = []
    self._last_checkpoint = ""

  def __call__(self, metrics: Dict[str, float], checkpoint_path: str) -> None:
    self._history.append(dict(metrics))
    self._last_checkpoint = checkpoint_path
    self.write(final=metrics.get("global_step", 0) >= self._max_steps)
    if self._summary_dir:
      writer = tf.summary.create_file_writer(os.path.join(self._summary_dir, "eval"))
      with writer.as_default():
        for key, value in metrics.items():
          if key != "global_step":
            tf.summary.scalar(key, value, step=metrics.get("global_step", 0))
      writer.flush()

  def write(self, final: bool) -> None:
    """(Re)writes the record; `final`: the evaluator is done."""
    if not self._history:
      return
    files.write_json(self.path, {
        "task": self._task_name, "evaluations": len(self._history),
        "last": self._history[-1], "last_checkpoint": self._last_checkpoint,
        "final": bool(final), "history": self._history}, indent=1, sort_keys=False)


def serve_parameters(config: ExperimentConfig, task: Task) -> None:
  """A ps task: start the server and serve the variables, forever.

  The model is never built on a ps, so its estimator needs no backbone.
  """

  def model_fn(features, labels, mode):
    raise RuntimeError("a ps task never builds the model")

  def no_input():
    raise RuntimeError("a ps task never reads data")

  with cluster.tf_config_env(task):
    estimator = tf.compat.v1.estimator.Estimator(
        model_fn=model_fn, config=run_config.build_run_config(config, task))
    log.info("%s: serving variables (stops when the job stops it)", task.name)
    tf.estimator.train_and_evaluate(
        estimator, tf.estimator.TrainSpec(no_input, max_steps=config.run.max_steps),
        tf.estimator.EvalSpec(no_input))
