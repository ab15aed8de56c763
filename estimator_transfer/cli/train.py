"""et-train: fine-tune a pretrained backbone with a new head."""
import logging

from absl import flags

from estimator_transfer.cli import common
from estimator_transfer.cli import flags as et_flags

log = logging.getLogger("estimator_transfer")


def main(argv):
  del argv
  from estimator_transfer import runner  # pylint: disable=g-import-not-at-top
  cfg = et_flags.flags_to_config(flags.FLAGS)
  experiment = runner.Experiment(cfg)
  cfg = experiment.config
  log.info("backbone %s (%s, %dpx), %d classes, freeze=%s, lr %s at steps %s, "
           "max_steps %d, model_dir %s", cfg.backbone.handle, experiment.backbone.kind,
           cfg.backbone.image_size, cfg.head.num_classes, cfg.freeze.spec,
           list(cfg.schedule.values), list(cfg.schedule.boundaries),
           cfg.run.max_steps, cfg.run.model_dir)
  step = experiment.train()
  print(f"et-train: {cfg.run.model_dir} trained to step {step}")


def run():
  common.run_main("et-train", et_flags.define_flags, main)


if __name__ == "__main__":
  run()
