"""et-predict: batch inference into CSV or JSON Lines, for batch cluster jobs.

  et-predict --export_dir=exports/flowers --predict_data=photos/ --output=preds.csv
  et-predict --model_dir=runs/flowers --predict_data=data/test-* --output=p.jsonl

--predict_data is an image, a folder of images (searched recursively) or
TFRecords (file, glob or directory of shards; rows are named <file>:<index>).
The model is an export (--export_dir: a version directory or a TF Serving base
path, whose newest version is used) or a checkpoint (--model_dir, latest or
--checkpoint_path). Each row: path, class_id, class, probability, top_k, and
error for an image that could not be read or decoded (the job goes on). With
--num_shards=N --shard_index=i, a job predicts every N-th input from i.
"""
import logging
import os

from absl import flags

from estimator_transfer import files

from estimator_transfer.cli import common
from estimator_transfer.cli import flags as et_flags
from estimator_transfer.cli import trained_model
from estimator_transfer.errors import ConfigError
from estimator_transfer.serving import exporters
from estimator_transfer.serving import predictor as predict
from estimator_transfer.training import experiment as runner

FLAGS = flags.FLAGS
log = logging.getLogger("estimator_transfer")


def define_flags() -> None:
  et_flags.define_flags()
  if "predict_data" in FLAGS:
    return
  flags.DEFINE_string("predict_data", "", "Images to predict: an image, a folder "
                      "(recursive), or TFRecords (file, glob, directory).")
  flags.DEFINE_string("output", "", "Output file: .csv or .jsonl.")
  flags.DEFINE_integer("top_k", 3, "Classes listed per row, most probable first.")
  flags.DEFINE_integer("num_shards", 1, "Split the inputs into this many shards.")
  flags.DEFINE_integer("shard_index", 0, "The shard this job predicts, 0-based.")


def main(argv):
  del argv
  if not FLAGS.predict_data:
    raise ConfigError("--predict_data is required: an image, a folder or TFRecords.")
  if not FLAGS.output:
    raise ConfigError("--output is required: a .csv or .jsonl file to write.")
  predict.output_format(FLAGS.output)
  if FLAGS.top_k < 1:
    raise ConfigError(f"--top_k={FLAGS.top_k} must be at least 1.")
  if FLAGS.num_shards < 1 or not 0 <= FLAGS.shard_index < FLAGS.num_shards:
    raise ConfigError(f"--shard_index={FLAGS.shard_index} must be in [0, "
                      f"--num_shards={FLAGS.num_shards}).")
  if FLAGS.batch_size < 1:
    raise ConfigError("--batch_size must be positive.")
  trained_model.check_output_file(FLAGS.output, "--output")
  predictor, image_key = _predictor()
  try:
    items = predict.shard(predict.iter_items(FLAGS.predict_data, image_key),
                          FLAGS.shard_index, FLAGS.num_shards)
    rows = predict.predict_rows(predictor, items, FLAGS.batch_size, FLAGS.top_k)
    counts = predict.write_predictions(rows, FLAGS.output)
  except OSError as e:
    storage = files.storage_error(e, os.path.dirname(os.path.abspath(FLAGS.output)))
    if storage is None:
      raise
    raise storage from None
  finally:
    predictor.close()
  print(f"et-predict: wrote {counts['rows']} rows to {FLAGS.output} "
        f"({counts['errors']} errors)")


def _predictor():
  """(Predictor, tf.Example image key) from --export_dir or --model_dir."""
  if FLAGS["export_dir"].present:
    if FLAGS["model_dir"].present:
      raise ConfigError("give either --export_dir (an export) or --model_dir (a "
                        "checkpoint), not both.")
    return predict.Predictor.from_saved_model(FLAGS.export_dir), FLAGS.image_key
  if not FLAGS.model_dir:
    raise ConfigError("give --export_dir (a SavedModel or TF Serving base path) or "
                      "--model_dir (a trained model) to predict with.")
  trained_model.check_model_dir(FLAGS.model_dir, FLAGS.checkpoint_path)
  cfg = et_flags.flags_to_config(FLAGS)
  trained_model.check_same_classes(cfg, cfg.run.model_dir)
  checkpoint = trained_model.resolve_checkpoint(cfg.run.model_dir, FLAGS.checkpoint_path)
  experiment = runner.Experiment(cfg)
  options = exporters.export_options(experiment.config, experiment.image_size,
                                     with_warmup=False)
  predictor = predict.Predictor.from_estimator(
      experiment.estimator, options, experiment.config.head.class_names,
      checkpoint_path=experiment.servable_checkpoint(checkpoint))
  return predictor, experiment.config.input.image_key


def run():
  common.run_main("et-predict", define_flags, main)


if __name__ == "__main__":
  run()
