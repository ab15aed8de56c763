"""et-train: fine-tune a pretrained backbone with a new head."""
import logging

from absl import flags

from estimator_transfer.cli import common
from estimator_transfer.cli import flags as et_flags

log = logging.getLogger("estimator_transfer")


def main(argv):
  del argv
  from estimator_transfer.cluster import tf_config as cluster  # pylint: disable=g-import-not-at-top
  if (flags.FLAGS.check_cluster or not cluster.current_task().is_local or
      flags.FLAGS.distribution != "none"):
    # TF_CONFIG names a cluster (this task's role in train_and_evaluate), or a
    # distribution strategy is asked for. (A one-chief "cluster" trains in
    # the local loop below, as Estimator would.)
    from estimator_transfer.cli import cluster_job  # pylint: disable=g-import-not-at-top
    cluster_job.main(flags.FLAGS)
    return
  from estimator_transfer.training import experiment as runner  # pylint: disable=g-import-not-at-top
  cfg = et_flags.flags_to_config(flags.FLAGS)
  experiment = runner.Experiment(cfg)
  cfg = experiment.config
  for line in experiment.describe():
    log.info("%s", line)
  # Built before training: a bad export setting fails now, not after hours.
  after_evaluation = _best_exporter(experiment) if cfg.export.export_dir else None
  from estimator_transfer.training import hooks  # pylint: disable=g-import-not-at-top
  try:
    step = experiment.train(on_corrupt_checkpoint=flags.FLAGS.on_corrupt_checkpoint,
                            allow_config_change=flags.FLAGS.allow_config_change,
                            extra_files={FLAGS_RECORD: _flags_record()},
                            after_evaluation=after_evaluation)
  except hooks.DivergedError as e:
    common.fail("et-train", e)
  outcome = experiment.outcome
  if outcome.preempted:
    # Cluster preemption: a checkpoint is saved; exit 0 at once, no export.
    print(f"et-train: stopped by a signal at step {step} with a checkpoint saved; "
          "re-run the same command to resume")
    return
  if outcome.stopped_early:
    print(f"et-train: {outcome.stopped_early}")
  if outcome.best:
    print(f"et-train: best {outcome.best['metric']} {outcome.best['value']:.4f} at "
          f"step {outcome.best['step']}: {outcome.best['checkpoint']}")
  print(f"et-train: {cfg.run.model_dir} trained to step {step}")
  if cfg.export.export_dir:
    _export(experiment)


FLAGS_RECORD = "flags.txt"


def _flags_record() -> str:
  """Every et-* flag of this invocation, as a flagfile (--flagfile=model_dir/flags.txt)."""
  lines = []
  for flag in sorted(flags.FLAGS.get_flags_for_module(et_flags.__name__),
                     key=lambda f: f.name):
    text = flag.serialize()
    if text:
      lines.append(text)
  return "\n".join(lines) + "\n"


def _best_exporter(experiment):
  """The training loop's after-evaluation callback: publish the best model.

  Called as f(metrics, checkpoint) after each evaluation of the loop
  (--eval_every_steps, early stopping); None without --eval_data. Building it
  checks the export settings (warmup data too) before training starts.
  """
  from estimator_transfer.serving import exporters  # pylint: disable=g-import-not-at-top
  cfg = experiment.config
  options = exporters.export_options(cfg, experiment.image_size)
  if not cfg.input.eval_data:
    return None
  best = exporters.BestExporter(options, cfg.export.best_metric, cfg.export.best_metric_mode,
                                export_dir=cfg.export.export_dir)

  def after_evaluation(metrics, checkpoint_path):
    best.export(experiment.estimator, cfg.export.export_dir,
                experiment.servable_checkpoint(checkpoint_path), metrics, False)

  return after_evaluation


def _export(experiment):
  """Evaluates the final checkpoint; best -> --export_dir, latest -> model_dir."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  cfg = experiment.config
  checkpoint = tf.train.latest_checkpoint(cfg.run.model_dir)
  if not cfg.input.eval_data:
    path = experiment.export(checkpoint_path=checkpoint)
    print(f"et-train: exported {path} (the latest checkpoint: without --eval_data "
          "there is no --best_metric to choose by)")
    return
  last = experiment.outcome.last_eval
  if last and tf.train.load_checkpoint(checkpoint).get_tensor("global_step") == last["step"]:
    # The training loop evaluated this very checkpoint.
    metrics = {k: v for k, v in last.items() if k != "step"}
  else:
    metrics = experiment.evaluate(checkpoint_path=checkpoint)
  result = experiment.export_after_evaluation(metrics, checkpoint)
  print(f"et-train: best export: {result['best_decision']}")
  print(f"et-train: latest export: {result['latest_decision']}")


def run():
  common.run_main("et-train", et_flags.define_flags, main)


if __name__ == "__main__":
  run()
