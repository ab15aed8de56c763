"""et-train as one task of a cluster job (TF_CONFIG), and `--check_cluster`.

`et-train` runs this instead of its local loop when TF_CONFIG names a cluster
(more than a lone chief); the same command line runs on every task and
TF_CONFIG picks the role.
"""
import json
import logging

from estimator_transfer.cli import flags as et_flags

log = logging.getLogger("estimator_transfer")


def main(flag_values) -> None:
  """Checks the cluster, then trains / serves / evaluates in this task's role.

  Raises:
    ConfigError: TF_CONFIG, the flags or the data do not fit this role.
  """
  # pylint: disable=g-import-not-at-top
  from estimator_transfer.cluster import tf_config as cluster
  from estimator_transfer.training import experiment as runner
  # pylint: enable=g-import-not-at-top
  task = cluster.current_task()
  cfg = et_flags.flags_to_config(flag_values)
  warnings = cluster.check(task, cfg.cluster.distribution, cfg.run.model_dir)
  if flag_values.check_cluster:
    source = "TF_CONFIG" if cluster.tf_config_present() else "no TF_CONFIG"
    print(f"et-train --check_cluster: {source}: ok")
    for line in cluster.describe(task, cfg.cluster.distribution, cfg.run.max_steps,
                                 cfg.run.model_dir, cfg.export.export_dir,
                                 cfg.input.eval_data):
      print(f"  {line}")
    for warning in warnings:
      print(f"  warning: {warning}")
    return
  for warning in warnings:
    log.warning("%s", warning)
  if task.task_type == cluster.PS:
    runner.train_and_evaluate(cfg, task)  # serves until the job stops it
    return
  with cluster.tf_config_env(task):
    # First: multi_worker_mirrored must set up collectives before any op runs.
    strategy = cluster.build_strategy(cfg.cluster.distribution, task)
  with cluster.tf_config_env(cluster.Task()):
    # This Experiment's estimator stays local: the chief evaluates and
    # exports with it after training.
    experiment = runner.Experiment(cfg)
  if task.is_chief and experiment.config.export.export_dir:
    # A bad export setting (e.g. unreadable warmup data) fails now, not after training.
    from estimator_transfer.serving import exporters  # pylint: disable=g-import-not-at-top
    exporters.export_options(experiment.config, experiment.image_size)
  outcome = runner.train_and_evaluate(experiment.config, task, experiment, strategy)
  if task.task_type == cluster.EVALUATOR:
    print(f"et-train: {outcome.role} final metrics "
          f"{json.dumps(outcome.metrics, sort_keys=True)}")
    return
  if task.is_chief:
    print(f"et-train: {outcome.role} ran {outcome.local_steps} local steps; "
          f"{experiment.config.run.model_dir} trained to step {outcome.global_step}")
  else:
    print(f"et-train: {outcome.role} ran {outcome.local_steps} local steps; the chief "
          "checkpoints and exports")
  if task.is_chief and experiment.config.export.export_dir:
    _export(experiment)


def _export(experiment) -> None:
  """The chief's export of the final checkpoint, as et-train's local loop does it.

  The chief evaluates the checkpoint itself rather than wait for the
  evaluator; the best model by --best_metric goes to --export_dir, every
  exported checkpoint to model_dir/export/latest.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  cfg = experiment.config
  checkpoint = tf.train.latest_checkpoint(cfg.run.model_dir)
  if not cfg.input.eval_data:
    path = experiment.export(checkpoint_path=checkpoint)
    print(f"et-train: exported {path} (the latest checkpoint: without --eval_data "
          "there is no --best_metric to choose by)")
    return
  metrics = experiment.evaluate(checkpoint_path=checkpoint)
  result = experiment.export_after_evaluation(metrics, checkpoint)
  print(f"et-train: best export: {result['best_decision']}")
  print(f"et-train: latest export: {result['latest_decision']}")
