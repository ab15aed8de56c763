"""et-export: write a TF Serving SavedModel version from a checkpoint."""
from absl import flags

from estimator_transfer.cli import common
from estimator_transfer.cli import flags as et_flags


def main(argv):
  del argv
  from estimator_transfer import runner  # pylint: disable=g-import-not-at-top
  cfg = et_flags.flags_to_config(flags.FLAGS)
  experiment = runner.Experiment(cfg)
  path = experiment.export(checkpoint_path=flags.FLAGS.checkpoint_path or None)
  print(f"et-export: wrote {path}")


def run():
  common.run_main("et-export", et_flags.define_flags, main)


if __name__ == "__main__":
  run()
