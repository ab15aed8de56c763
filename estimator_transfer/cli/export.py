"""et-export: write a TF Serving SavedModel version from a checkpoint.

With --check, the finished version is loaded the way TF Serving loads it and
every signature is run on sample inputs before it is published (see
et-inspect-export); if one fails, nothing is published and the exit code is 1.
"""
from absl import flags
import tensorflow as tf

from estimator_transfer import files

from estimator_transfer.cli import common
from estimator_transfer.cli import flags as et_flags
from estimator_transfer.cli import trained_model
from estimator_transfer.errors import ConfigError
from estimator_transfer.serving import inspect as inspection
from estimator_transfer.training import experiment as runner

FLAGS = flags.FLAGS


def define_flags() -> None:
  et_flags.define_flags()
  if "check" not in FLAGS:
    flags.DEFINE_bool("check", False, "Load the new version as TF Serving does, "
                      "print its signatures, run each on sample inputs, and publish "
                      "it only if all pass.")


def main(argv):
  del argv
  trained_model.check_model_dir(FLAGS.model_dir, FLAGS.checkpoint_path)
  cfg = et_flags.flags_to_config(FLAGS)
  trained_model.check_same_classes(cfg, cfg.run.model_dir)
  trained_model.check_output_dir(cfg.export.export_dir, "--export_dir")
  checkpoint = trained_model.resolve_checkpoint(cfg.run.model_dir, FLAGS.checkpoint_path)
  experiment = runner.Experiment(cfg)

  def verify(path):
    print(inspection.format_signatures(inspection.describe(path)), end="")
    results = inspection.check_saved_model(path)
    print(inspection.format_results(results), end="", flush=True)
    failed = inspection.failures(results)
    if failed:
      raise ConfigError(f"check failed for '{failed[0].name}' ({failed[0].message}); "
                        "nothing was published")

  try:
    path = experiment.export(checkpoint_path=checkpoint,
                             verify=verify if FLAGS.check else None)
  except (OSError, tf.errors.OpError) as e:
    storage = files.storage_error(e, cfg.export.export_dir)
    if storage is None:
      raise
    raise storage from None
  print(f"et-export: wrote {path}")


def run():
  common.run_main("et-export", define_flags, main)


if __name__ == "__main__":
  run()
