"""Estimator construction and the train / evaluate / export entry points."""
import json
import os
from typing import Dict, Optional

import tensorflow as tf

from estimator_transfer import backbones
from estimator_transfer import config as config_lib
from estimator_transfer import export as export_lib
from estimator_transfer import model_fn as model_fn_lib
from estimator_transfer.config import ConfigError, ExperimentConfig
from estimator_transfer.data import input_fns

EVAL_RESULTS_FILENAME = "eval_results.json"


def make_run_config(config: ExperimentConfig) -> tf.estimator.RunConfig:
  r = config.run
  session_config = tf.compat.v1.ConfigProto(
      intra_op_parallelism_threads=r.intra_op_threads,
      inter_op_parallelism_threads=r.inter_op_threads,
      allow_soft_placement=True)
  return tf.estimator.RunConfig(
      model_dir=r.model_dir,
      tf_random_seed=r.seed,
      save_checkpoints_steps=r.save_checkpoints_steps,
      save_checkpoints_secs=None,
      keep_checkpoint_max=r.keep_checkpoint_max,
      log_step_count_steps=r.log_every_steps,
      save_summary_steps=r.log_every_steps,
      session_config=session_config)


class Experiment:
  """One resolved config: backbone, Estimator and input_fns, built once."""

  def __init__(self, config: ExperimentConfig):
    config.validate()
    if not config.run.model_dir:
      raise ConfigError("--model_dir is required: the directory for checkpoints.")
    self.backbone = backbones.resolve(config.backbone)
    if config.backbone.image_size != self.backbone.image_size:
      config = config.replace(backbone__image_size=self.backbone.image_size)
    self.config = config
    self.estimator = tf.compat.v1.estimator.Estimator(
        model_fn=model_fn_lib.build_model_fn(config, self.backbone),
        config=make_run_config(config))

  @property
  def image_size(self) -> int:
    return self.backbone.image_size

  def input_fn(self, data: str, training: bool):
    return input_fns.build_input_fn(self.config.input, data, self.image_size,
                                    training=training, seed=self.config.run.seed)

  def train(self) -> int:
    """Trains to `run.max_steps` (idempotent across restarts); returns the step."""
    cfg = self.config
    if not cfg.input.train_data:
      raise ConfigError("--train_data is required for training.")
    train_input_fn = self.input_fn(cfg.input.train_data, training=True)  # validates the data
    config_lib.save(cfg, cfg.run.model_dir)
    self.estimator.train(train_input_fn, max_steps=cfg.run.max_steps)
    return int(self.estimator.get_variable_value("global_step"))

  def evaluate(self, data: Optional[str] = None,
               checkpoint_path: Optional[str] = None) -> Dict[str, float]:
    """Evaluates a checkpoint (latest by default) and writes eval_results.json."""
    data = data or self.config.input.eval_data
    if not data:
      raise ConfigError("--eval_data is required for evaluation.")
    self._require_checkpoint(checkpoint_path)
    steps = self.config.run.eval_steps or None
    metrics = self.estimator.evaluate(self.input_fn(data, training=False), steps=steps,
                                      checkpoint_path=checkpoint_path)
    result = {k: (int(v) if k == "global_step" else float(v)) for k, v in metrics.items()}
    path = os.path.join(self.config.run.model_dir, EVAL_RESULTS_FILENAME)
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
      f.write(json.dumps(result, indent=2, sort_keys=True))
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
    return result

  def export(self, export_dir: Optional[str] = None,
             checkpoint_path: Optional[str] = None) -> str:
    export_dir = export_dir or self.config.export.export_dir
    if not export_dir:
      raise ConfigError("--export_dir is required for export.")
    self._require_checkpoint(checkpoint_path)
    return export_lib.export(self.estimator, export_dir, self.image_size,
                             checkpoint_path=checkpoint_path,
                             exports_to_keep=self.config.export.exports_to_keep)

  def _require_checkpoint(self, checkpoint_path):
    if checkpoint_path:
      if not tf.io.gfile.exists(checkpoint_path + ".index"):
        raise ConfigError(f"checkpoint {checkpoint_path} does not exist; give a "
                          "path such as model_dir/model.ckpt-1000.")
    elif not tf.train.latest_checkpoint(self.config.run.model_dir):
      raise ConfigError(f"no checkpoint in {self.config.run.model_dir}; train first "
                        "(et-train) or point --model_dir at a trained model.")
