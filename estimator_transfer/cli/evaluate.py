"""et-evaluate: evaluate a checkpoint on --eval_data; writes eval_results.json."""
import json

from absl import flags

from estimator_transfer.cli import common
from estimator_transfer.cli import flags as et_flags


def main(argv):
  del argv
  from estimator_transfer import runner  # pylint: disable=g-import-not-at-top
  cfg = et_flags.flags_to_config(flags.FLAGS)
  experiment = runner.Experiment(cfg)
  metrics = experiment.evaluate(checkpoint_path=flags.FLAGS.checkpoint_path or None)
  print(json.dumps(metrics, sort_keys=True))
  print(f"et-evaluate: accuracy {metrics['accuracy']:.4f} at step "
        f"{metrics['global_step']} on {cfg.input.eval_data}")


def run():
  common.run_main("et-evaluate", et_flags.define_flags, main)


if __name__ == "__main__":
  run()
