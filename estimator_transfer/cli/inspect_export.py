"""et-inspect-export: print a SavedModel's signatures and run each one.

  et-inspect-export --export_dir=exports/flowers        # newest version
  et-inspect-export --export_dir=exports/flowers/1700000000

Prints every signature (method, inputs and outputs with dtype, shape and
tensor), loads the model as TF Serving does, runs each signature on sample
inputs (a PNG and a JPEG of other sizes than the model's; tf.Examples for
classify/regress), replays the warmup file when there is one, and exits 1 if
anything fails.
"""
from absl import flags

from estimator_transfer.cli import common
from estimator_transfer.errors import ConfigError
from estimator_transfer.serving import inspect as inspection
from estimator_transfer.serving import versions

FLAGS = flags.FLAGS


def define_flags() -> None:
  if "export_dir" in FLAGS:
    return
  flags.DEFINE_string("export_dir", None, "A SavedModel version directory, or a "
                      "TF Serving base path (its newest version is inspected).")
  flags.DEFINE_bool("run", True, "Run every signature on sample inputs; "
                    "--norun only prints them.")
  flags.DEFINE_integer("check_batch", 2, "Examples per sample request.")


def main(argv):
  del argv
  if not FLAGS.export_dir:
    raise ConfigError("--export_dir is required: a SavedModel version directory "
                      "or a TF Serving base path.")
  if FLAGS.check_batch < 1:
    raise ConfigError(f"--check_batch={FLAGS.check_batch} must be at least 1.")
  path = versions.latest_version(FLAGS.export_dir)
  print(f"SavedModel {path}")
  print(inspection.format_signatures(inspection.describe(path)), end="")
  if not FLAGS.run:
    return
  results = inspection.check_saved_model(path, batch=FLAGS.check_batch)
  print(inspection.format_results(results), end="")
  failed = inspection.failures(results)
  if failed:
    raise ConfigError(f"{len(failed)} of {len(results)} checks failed, first "
                      f"'{failed[0].name}': {failed[0].message}")
  print(f"et-inspect-export: all {len(results)} checks passed")


def run():
  common.run_main("et-inspect-export", define_flags, main)


if __name__ == "__main__":
  run()
