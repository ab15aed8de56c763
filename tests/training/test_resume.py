"""Resume: exact state restored, max_steps respected, broken checkpoints are loud."""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.training import checkpoints
from estimator_transfer import config as config_lib
from estimator_transfer.training import experiment as runner
from estimator_transfer.errors import ConfigError

from continual_helpers import (CaptureAfterRestoreHook, assert_values_equal, ckpt_path,
                               read_checkpoint, tiny_config)


@pytest.fixture(scope="module")
def trained(tiny_data, tiny_backbone, tmp_path_factory):
  """A run trained to step 6 with Adam and EMA (checkpoints at 0, 3, 6).

  Its backbone is frozen until step 6 and unfrozen from there (gradual
  unfreezing), so a resume at step 6 must continue in the unfrozen stage.
  """
  model_dir = tmp_path_factory.mktemp("resume") / "model"
  cfg = tiny_config(tiny_data, tiny_backbone, model_dir, optimizer__name="adam",
                    optimizer__ema_decay=0.9, freeze__unfreeze_schedule="0:all,6:none")
  runner.Experiment(cfg).train()
  return cfg


def _copy(cfg, tmp_path, **overrides):
  model_dir = tmp_path / "model"
  shutil.copytree(cfg.run.model_dir, model_dir)
  return cfg.replace(run__model_dir=str(model_dir), **overrides)


def test_resume_restores_every_variable_and_stops_at_max_steps(trained, tiny_backbone,
                                                              tmp_path):
  cfg = _copy(trained, tmp_path, run__max_steps=9)
  saved = read_checkpoint(ckpt_path(cfg.run.model_dir, 6))
  # Optimizer slots (Adam m/v and beta powers) and EMA shadows are there to compare.
  assert any(n.endswith("/Adam_1") for n in saved) and "beta1_power" in saved
  assert any(n.endswith("/ExponentialMovingAverage") for n in saved)
  capture = CaptureAfterRestoreHook()
  experiment = runner.Experiment(cfg)
  assert experiment.train(hooks=[capture]) == 9
  assert experiment.outcome.resumed_from == ckpt_path(cfg.run.model_dir, 6)
  assert_values_equal(capture.values, saved)
  # The unfreeze stage follows the restored step: frozen up to 6, trained after.
  final = read_checkpoint(ckpt_path(cfg.run.model_dir, 9))
  pretrained = tiny_backbone["values"]["conv1/kernel"]
  assert np.array_equal(saved["conv1/kernel"], pretrained)
  assert not np.array_equal(final["conv1/kernel"], pretrained)
  # Re-running the same command is a no-op: max_steps, never `steps`.
  assert runner.Experiment(cfg).train() == 9
  assert checkpoints.step_of(checkpoints.resolve_resume_checkpoint(cfg.run.model_dir)) == 9
  assert_values_equal(read_checkpoint(ckpt_path(cfg.run.model_dir, 9)), final)


def _truncate(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _corrupt(model_dir, kind):
  """Breaks model_dir the way `kind` says; returns the file the error must name."""
  latest = ckpt_path(model_dir, 6)
  if kind == "truncated_index":
    _truncate(latest + ".index")
    return latest + ".index"
  if kind == "missing_data_shard":
    os.remove(latest + ".data-00000-of-00001")
    return latest + ".data-00000-of-00001"
  if kind == "truncated_data_shard":
    _truncate(latest + ".data-00000-of-00001")
    return latest + ".data-00000-of-00001"
  state = os.path.join(model_dir, "checkpoint")
  if kind == "garbage_state_file":
    with open(state, "w") as f:
      f.write("model_checkpoint_path: \x00\x01 garbage {{{\n")
  elif kind == "missing_state_file":
    os.remove(state)
  return state


# (corruption, the step "previous" falls back to)
CORRUPTIONS = [("truncated_index", 3), ("missing_data_shard", 3),
               ("truncated_data_shard", 3), ("garbage_state_file", 6),
               ("missing_state_file", 6)]


@pytest.mark.parametrize("kind,fallback", CORRUPTIONS)
def test_broken_checkpoint_is_a_loud_error_then_previous_falls_back(trained, tmp_path,
                                                                     kind, fallback):
  cfg = _copy(trained, tmp_path, run__max_steps=8)
  model_dir = cfg.run.model_dir
  named = _corrupt(model_dir, kind)
  before = sorted(os.listdir(model_dir))
  with pytest.raises(checkpoints.CheckpointError) as error:
    runner.Experiment(cfg).train()
  message = str(error.value)
  assert named in message and "--on_corrupt_checkpoint=previous" in message
  assert "\n" not in message
  # Never a silent restart from scratch, and nothing was touched.
  assert sorted(os.listdir(model_dir)) == before
  resumed = checkpoints.resolve_resume_checkpoint(model_dir, on_corrupt="previous")
  assert resumed == ckpt_path(model_dir, fallback)
  # The state file now names the fallback, so Estimator itself resumes from it.
  assert tf.train.latest_checkpoint(model_dir) == resumed
  # The broken files are kept aside, not deleted.
  quarantined = [d for d in os.listdir(model_dir) if d.startswith("corrupt-")]
  if kind != "missing_state_file":
    kept = "checkpoint" if kind == "garbage_state_file" else "model.ckpt-6.index"
    assert quarantined and kept in os.listdir(os.path.join(model_dir, quarantined[0]))


def test_training_resumes_from_previous_readable_checkpoint(trained, tmp_path):
  cfg = _copy(trained, tmp_path, run__max_steps=5)
  _corrupt(cfg.run.model_dir, "truncated_index")
  experiment = runner.Experiment(cfg)
  assert experiment.train(on_corrupt_checkpoint="previous") == 5
  assert experiment.outcome.resumed_from == ckpt_path(cfg.run.model_dir, 3)


def test_interrupted_first_save_starts_fresh(tiny_data, tiny_backbone, tmp_path):
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  # What a SIGKILL in the middle of the very first (step 0) save leaves.
  (model_dir / "model.ckpt-0.index").write_bytes(b"\x00partial")
  assert checkpoints.resolve_resume_checkpoint(str(model_dir)) is None


@pytest.mark.parametrize("change", ["num_classes", "hidden_units", "backbone"])
def test_resuming_with_incompatible_config_is_refused(trained, tiny_backbone, tmp_path,
                                                       change):
  if change == "num_classes":
    overrides = dict(head__num_classes=4,
                     head__class_names=("red", "green", "blue", "yellow"))
  elif change == "hidden_units":
    overrides = dict(head__hidden_units=(4,))
  else:
    overrides = dict(backbone__handle=tiny_backbone["saved_model"])
  cfg = _copy(trained, tmp_path, run__max_steps=8, **overrides)
  saved_config = open(os.path.join(cfg.run.model_dir, config_lib.CONFIG_FILENAME)).read()
  with pytest.raises(ConfigError, match="--allow_config_change"):
    runner.Experiment(cfg).train()
  # The saved config of the run is not overwritten by the refused one.
  assert open(os.path.join(cfg.run.model_dir, config_lib.CONFIG_FILENAME)).read() == \
      saved_config
  if change == "backbone":
    return  # same variables under another handle: allowed below would resume
  # Allowed, but the checkpoint cannot hold the new variables: still one clear error.
  with pytest.raises(ConfigError, match="does not fit the model"):
    runner.Experiment(cfg).train(allow_config_change=True)


def test_allow_config_change_resumes_a_moved_backbone(trained, tiny_backbone, tmp_path):
  moved = tmp_path / "moved.h5"
  shutil.copy(tiny_backbone["h5"], moved)
  cfg = _copy(trained, tmp_path, run__max_steps=7, backbone__handle=str(moved))
  experiment = runner.Experiment(cfg)
  assert experiment.train(allow_config_change=True) == 7
  assert config_lib.load(cfg.run.model_dir).backbone.handle == str(moved)


class _OpTypesAtSessionStart(tf.compat.v1.train.SessionRunHook):
  """The op types of the training graph once its session is up."""

  def __init__(self):
    self.types = []

  def after_create_session(self, session, coord):
    del coord
    self.types = [op.type for op in session.graph.get_operations()]


def test_a_local_session_starts_without_asking_each_variable_if_ready(trained, tmp_path):
  # A local session initializes or restores every variable itself: its
  # start builds and runs no per-variable readiness check (two of them, one
  # op per variable, by default), new or resumed. What a resume restores is
  # test_resume_restores_every_variable_and_stops_at_max_steps.
  resumed = _copy(trained, tmp_path, run__max_steps=8)
  new = resumed.replace(run__model_dir=str(tmp_path / "new"), run__max_steps=2)
  for cfg, steps in ((resumed, 8), (new, 2)):
    probe = _OpTypesAtSessionStart()
    assert runner.Experiment(cfg).train(hooks=[probe]) == steps
    # Each resource variable has one VarIsInitializedOp of its own (made
    # with it); each of the two readiness checks adds one more per variable.
    variables = probe.types.count("VarHandleOp")
    checks = probe.types.count("VarIsInitializedOp") + probe.types.count(
        "IsVariableInitialized")
    assert variables > 10 and checks < 1.5 * variables, (cfg.run.model_dir, variables,
                                                          checks)
