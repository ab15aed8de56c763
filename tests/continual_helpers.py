"""Helpers shared by the resume / warm-start / guard / replay tests."""
import os

import numpy as np
import tensorflow as tf

from estimator_transfer import config as config_lib

from conftest import CLASS_NAMES


def tiny_config(tiny_data, tiny_backbone, model_dir, **overrides):
  """The same small config as conftest's make_config, for any model_dir and scope."""
  cfg = config_lib.ExperimentConfig(
      backbone=config_lib.BackboneConfig(handle=tiny_backbone["h5"]),
      head=config_lib.HeadConfig(num_classes=3, class_names=CLASS_NAMES),
      freeze=config_lib.FreezeConfig("none"),
      schedule=config_lib.ScheduleConfig(values=(0.05,)),
      input=config_lib.InputConfig(train_data=tiny_data["train"],
                                   eval_data=tiny_data["eval"], batch_size=8,
                                   shuffle_buffer=64),
      run=config_lib.RunConfig(model_dir=str(model_dir), max_steps=6,
                               save_checkpoints_steps=3, log_every_steps=3, seed=7))
  return cfg.replace(**overrides) if overrides else cfg


def read_checkpoint(prefix):
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


class CaptureAfterRestoreHook(tf.compat.v1.train.SessionRunHook):
  """Records every global variable right after the session is created/restored."""

  def __init__(self):
    self.values = None

  def begin(self):
    self._vars = {v.op.name: v for v in tf.compat.v1.global_variables()}

  def after_create_session(self, session, coord):
    if self.values is None:
      self.values = session.run(self._vars)


def assert_values_equal(actual: dict, expected: dict, names=None):
  for name in names or expected:
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def ckpt_path(model_dir, step):
  return os.path.join(str(model_dir), f"model.ckpt-{step}")
