"""et-export: write a TF Serving SavedModel version (or a Keras model) from a checkpoint.

--format=keras writes `<export_dir>/<version>/model.keras` and
keras_export.json instead (serving/keras_export.py): a model that
keras.models.load_model reads in Keras 3 (TensorFlow 2.16+) and tf.keras 2.15
and that model.fit can train further.

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
from estimator_transfer.serving import keras_export
from estimator_transfer.training import experiment as runner

FLAGS = flags.FLAGS


def define_flags() -> None:
  et_flags.define_flags()
  if "check" not in FLAGS:
    flags.DEFINE_bool("check", False, "Load the new version as TF Serving does, "
                      "print its signatures, run each on sample inputs, and publish "
                      "it only if all pass.")
  if "format" not in FLAGS:
    flags.DEFINE_enum("format", "savedmodel", ["savedmodel", "keras"],
                      "savedmodel: a TF Serving SavedModel version; keras: model.keras "
                      "+ keras_export.json for keras.models.load_model in TF 2.16+ "
                      "(Keras 3) and tf.keras 2.15, trainable with fit.")


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
    if FLAGS.format == "keras":
      if FLAGS.check:
        raise ConfigError("--check runs TF Serving signatures, which a Keras export "
                          "does not have; drop --check (the Keras export always checks "
                          "its predictions against the Estimator graph).")
      keras_export.check_exportable(experiment.backbone)
      if not cfg.export.export_dir:
        raise ConfigError("--export_dir is required for export.")
      path = keras_export.export_keras(
          experiment.config, experiment.backbone, cfg.export.export_dir,
          experiment.servable_checkpoint(checkpoint) or
          tf.train.latest_checkpoint(cfg.run.model_dir))
    else:
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
