"""et-train as one task of a cluster job (TF_CONFIG), and `--check_cluster`.

`et-train` runs this instead of its local path when TF_CONFIG names a cluster
(more than a lone chief) or --distribution asks for a strategy; the same
command line runs on every task and TF_CONFIG picks the role. Every role goes
through the library's one training loop (`training.loop.TrainingLoop`).
"""
import json
import logging

from estimator_transfer import files
from estimator_transfer.cli import common
from estimator_transfer.cli import flags as et_flags
from estimator_transfer.cluster import roles
from estimator_transfer.cluster import tf_config as cluster
from estimator_transfer.evaluation import tb_images
from estimator_transfer.serving import exporters
from estimator_transfer.training import experiment as experiment_lib
from estimator_transfer.training import hooks
from estimator_transfer.training import loop as loop_lib

log = logging.getLogger("estimator_transfer")


def main(flag_values) -> None:
  """Checks the cluster, then trains / serves / evaluates in this task's role.

  Raises:
    ConfigError: TF_CONFIG, the flags or the data do not fit this role
      (before anything is written).
  """
  task = cluster.current_task()
  cfg = et_flags.flags_to_config(flag_values)
  warnings = cluster.check(task, cfg.cluster.distribution, cfg.run.model_dir)
  if flag_values.check_cluster:
    _print_check(task, cfg, warnings)
    return
  for warning in warnings:
    log.warning("%s", warning)
  roles.check_role(task, cfg)
  if task.task_type == cluster.PS:
    roles.serve_parameters(cfg, task)  # until the job stops it
    return
  with cluster.tf_config_env(task):
    # First: multi_worker_mirrored must set up collectives before any op runs.
    strategy = cluster.build_strategy(cfg.cluster.distribution, task)
  experiment = experiment_lib.Experiment(cfg)  # its estimator stays local
  # The chief's best exporter (a bad export setting fails now, not after
  # training); the evaluator never publishes.
  best = exporters.build_best_model_callback(experiment) if task.is_chief else None
  # The evaluator writes each evaluation's report, and so its confusion-matrix
  # TensorBoard image beside its eval curves (as a local et-train does).
  images = (tb_images.build_callback(cfg.run.model_dir)
            if task.task_type == cluster.EVALUATOR else None)
  loop = loop_lib.TrainingLoop(experiment, task, strategy,
                               after_evaluation=[c for c in (best, images) if c])
  # The model_dir's single writer is the chief (or master): the loop takes
  # the lock there after its checks; workers and the evaluator never do.
  lock = files.ModelDirLock(cfg.run.model_dir, role=f"et-train {task.name}")
  try:
    try:
      outcome = loop.run(on_corrupt_checkpoint=flag_values.on_corrupt_checkpoint,
                         allow_config_change=flag_values.allow_config_change,
                         lock=lock if task.is_chief else None)
    except hooks.DivergedError as e:
      common.fail("et-train", e)
    _print_outcome(task, experiment, outcome)
    if task.is_chief and not outcome.preempted and experiment.config.export.export_dir:
      for line in experiment.export_final(outcome.last_eval):
        print(f"et-train: {line}")
  finally:
    lock.release()


def _print_check(task, cfg, warnings) -> None:
  source = "TF_CONFIG" if cluster.tf_config_present() else "no TF_CONFIG"
  print(f"et-train --check_cluster: {source}: ok")
  for line in roles.describe(task, cfg.cluster.distribution, cfg.run.max_steps,
                             cfg.run.model_dir, cfg.export.export_dir, cfg.input.eval_data):
    print(f"  {line}")
  for warning in warnings:
    print(f"  warning: {warning}")


def _print_outcome(task, experiment, outcome) -> None:
  """The role's last lines (et-local-cluster parses them)."""
  if task.task_type == cluster.EVALUATOR:
    print(f"et-train: {outcome.role} final metrics "
          f"{json.dumps(outcome.metrics, sort_keys=True)}")
    return
  if outcome.preempted:
    print(f"et-train: {outcome.role} stopped by a signal at step {outcome.step} with a "
          "checkpoint saved; re-run the same command to resume")
  if task.is_chief:
    print(f"et-train: {outcome.role} ran {outcome.local_steps} local steps; "
          f"{experiment.config.run.model_dir} trained to step {outcome.global_step}")
  else:
    print(f"et-train: {outcome.role} ran {outcome.local_steps} local steps; the chief "
          "checkpoints and exports")
