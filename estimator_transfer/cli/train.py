"""et-train: fine-tune a pretrained backbone with a new head."""
import logging

from absl import flags

from estimator_transfer import files
from estimator_transfer.cli import cluster_job
from estimator_transfer.cli import common
from estimator_transfer.cli import flags as et_flags
from estimator_transfer.cluster import tf_config as cluster
from estimator_transfer.evaluation import tb_images
from estimator_transfer.serving import exporters
from estimator_transfer.training import experiment as experiment_lib
from estimator_transfer.training import hooks
from estimator_transfer.training import loop as loop_lib

log = logging.getLogger("estimator_transfer")

FLAGS_RECORD = "flags.txt"


def main(argv):
  del argv
  flag_values = flags.FLAGS
  if (flag_values.check_cluster or not cluster.current_task().is_local or
      flag_values.distribution != "none"):
    # TF_CONFIG names a cluster (this task's role), or a distribution
    # strategy is asked for. (A one-chief "cluster" trains locally, as
    # Estimator would.)
    cluster_job.main(flag_values)
    return
  experiment = experiment_lib.Experiment(et_flags.flags_to_config(flag_values))
  cfg = experiment.config
  for line in experiment.describe():
    log.info("%s", line)
  # Built before training: a bad export setting fails now, not after hours.
  after_evaluation = exporters.build_best_model_callback(experiment)
  # Taken by the loop after every check passed, before the first write;
  # held until the final export is published.
  lock = files.ModelDirLock(cfg.run.model_dir, role="et-train")
  try:
    _train_and_export(experiment, flag_values, after_evaluation, lock)
  finally:
    lock.release()


def _train_and_export(experiment, flag_values, after_evaluation, lock) -> None:
  cfg = experiment.config
  # The confusion-matrix TensorBoard image of each evaluation.
  callbacks = [c for c in (after_evaluation, tb_images.build_callback(cfg.run.model_dir)) if c]
  loop = loop_lib.TrainingLoop(experiment, cluster.Task(), after_evaluation=callbacks)
  experiment.outcome = loop.outcome
  try:
    outcome = loop.run(on_corrupt_checkpoint=flag_values.on_corrupt_checkpoint,
                       allow_config_change=flag_values.allow_config_change,
                       extra_files={FLAGS_RECORD: _flags_record()}, lock=lock)
  except hooks.DivergedError as e:
    common.fail("et-train", e)
  step = outcome.step
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
    for line in experiment.export_final(outcome.last_eval):
      print(f"et-train: {line}")


def _flags_record() -> str:
  """Every et-* flag of this invocation, as a flagfile (--flagfile=model_dir/flags.txt)."""
  lines = []
  for flag in sorted(flags.FLAGS.get_flags_for_module(et_flags.__name__),
                     key=lambda f: f.name):
    text = flag.serialize()
    if text:
      lines.append(text)
  return "\n".join(lines) + "\n"


def run():
  common.run_main("et-train", et_flags.define_flags, main)


if __name__ == "__main__":
  run()
