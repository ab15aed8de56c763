"""et-export: write a TF Serving SavedModel version from a checkpoint.

With --check, the finished version is loaded the way TF Serving loads it and
every signature is run on sample inputs before it is published (see
et-inspect-export); if one fails, nothing is published and the exit code is 1.
"""
from absl import flags

from estimator_transfer.cli import common
from estimator_transfer.cli import flags as et_flags
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
  cfg = et_flags.flags_to_config(FLAGS)
  experiment = runner.Experiment(cfg)

  def verify(path):
    print(inspection.format_signatures(inspection.describe(path)), end="")
    results = inspection.check_saved_model(path)
    print(inspection.format_results(results), end="", flush=True)
    failed = inspection.failures(results)
    if failed:
      raise ConfigError(f"check failed for '{failed[0].name}' ({failed[0].message}); "
                        "nothing was published")

  path = experiment.export(checkpoint_path=FLAGS.checkpoint_path or None,
                           verify=verify if FLAGS.check else None)
  print(f"et-export: wrote {path}")


def run():
  common.run_main("et-export", define_flags, main)


if __name__ == "__main__":
  run()
