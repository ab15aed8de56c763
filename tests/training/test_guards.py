"""Guards: NaN/Inf stop without saving, early stopping, restore-best on regression."""
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.training import checkpoints
from estimator_transfer.training import early_stopping
from estimator_transfer.training import hooks
from estimator_transfer.training import experiment as runner
from estimator_transfer.errors import ConfigError
from estimator_transfer.config import GuardConfig
from estimator_transfer import specs

from conftest import run_cli
from faults import fault_tools
from continual_helpers import read_checkpoint


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_hook_names_the_step(bad, tmp_path):
  # Estimator's NanTensorHook misses Inf; this hook stops on both.
  with tf.Graph().as_default():
    step = tf.compat.v1.train.get_or_create_global_step()
    loss = tf.where(step >= 3, tf.constant(bad), tf.constant(1.0))
    tf.compat.v1.add_to_collection(hooks.TRAIN_LOSS_COLLECTION, loss)
    train_op = tf.compat.v1.assign_add(step, 1)
    guard = hooks.NonFiniteLossHook(str(tmp_path))
    with pytest.raises(hooks.DivergedError, match=r"is (nan|inf) at global step 3;"):
      with tf.compat.v1.train.MonitoredSession(hooks=[guard]) as sess:
        for _ in range(10):
          sess.run(train_op)


def test_divergence_stops_training_and_no_checkpoint_holds_it(tiny_data, tiny_backbone,
                                                              tmp_path):
  # A learning rate this large makes the weights Inf/NaN within a few steps;
  # checkpoints are due at every step, so one would be written from the
  # diverged state unless the finite-checkpoint listener stops it. Both runs
  # publish to one --export_dir: a diverged model must never be published.
  model_dir, export_dir = str(tmp_path / "model"), str(tmp_path / "export")
  common = [f"--backbone={tiny_backbone['h5']}", "--freeze=none",
            f"--train_data={tiny_data['train']}", "--optimizer=sgd", "--batch_size=8",
            f"--export_dir={export_dir}"]
  good = run_cli("et-train", *common, f"--model_dir={tmp_path / 'good'}", "--lr_values=0.01",
                 "--max_steps=2")
  assert good.returncode == 0, good.stderr[-3000:]
  published = [d for d in os.listdir(export_dir) if d.isdigit()]
  assert len(published) == 1, published
  before = fault_tools.tree_files(export_dir)
  result = run_cli("et-train", *common, f"--model_dir={model_dir}", "--lr_values=1e8",
                   "--save_checkpoints_steps=1", "--max_steps=20")
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("et-train: error: ") and "global step" in message
  assert "nothing was saved" in message or "without writing that checkpoint" in message
  latest = tf.train.latest_checkpoint(model_dir)
  assert f"the last good checkpoint is {latest}" in message
  assert checkpoints.step_of(latest) < 20
  for candidate in checkpoints.list_candidates(model_dir):
    for name, value in read_checkpoint(candidate.prefix).items():
      assert np.all(np.isfinite(value)), (candidate.prefix, name)
  # No version (not even a temp dir) from the diverged run; the good one untouched.
  assert "export:" not in result.stdout + result.stderr
  assert fault_tools.tree_files(export_dir) == before


def _state(model_dir):
  with open(os.path.join(model_dir, early_stopping.STATE_FILENAME)) as f:
    return json.load(f)


def test_early_stopping_with_patience_and_restart_is_idempotent(make_config):
  # Learning rate 0 and frozen BatchNorm: the metric never improves after the
  # first evaluation, so patience 1 stops at the second one (counting with
  # larger patience: test_record_evaluation_decisions).
  cfg = make_config(freeze__spec="all", schedule__values=(0.0,), run__max_steps=20,
                    run__save_checkpoints_steps=1, guards__eval_every_steps=2,
                    guards__early_stopping_metric="accuracy", guards__patience=1)
  experiment = runner.Experiment(cfg)
  assert experiment.train() == 4
  assert "early stopping at step 4" in experiment.outcome.stopped_early
  assert experiment.outcome.best["step"] == 2
  state = _state(cfg.run.model_dir)
  assert [h["step"] for h in state["history"]] == [2, 4]
  assert state["best_checkpoint"] == os.path.join("best", "model.ckpt-2")
  assert os.path.exists(os.path.join(cfg.run.model_dir, "best", "model.ckpt-2.index"))
  # Re-running the same command neither trains nor evaluates again.
  again = runner.Experiment(cfg)
  assert again.train() == 4 and again.outcome.stopped_early
  assert _state(cfg.run.model_dir)["history"] == state["history"]


def test_cluster_early_stopping_hook_checks_by_steps(make_config, tmp_path):
  # Cluster runs stop by the evaluator's results in model_dir/eval, checked
  # every eval interval of steps (run_every_secs=None), not by a timer.
  cfg = make_config(freeze__spec="all", schedule__values=(0.0,), run__max_steps=20,
                    guards__eval_every_steps=2, guards__early_stopping_metric="accuracy",
                    guards__patience=1)
  eval_dir = os.path.join(cfg.run.model_dir, "eval")
  with tf.Graph().as_default():  # what an evaluator writes: no gain after step 2
    writer = tf.compat.v1.summary.FileWriter(eval_dir)
    for step in (2, 4):
      writer.add_summary(tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(
          tag="accuracy", simple_value=0.5)]), step)
    writer.close()
  experiment = runner.Experiment(cfg)
  hook = early_stopping.build_cluster_stop_hook(experiment.estimator, cfg)
  assert hook._timer._every_secs is None and hook._timer._every_steps == 2
  experiment.estimator.train(experiment.train_input_fn(), max_steps=20, hooks=[hook])
  assert experiment.estimator.get_variable_value("global_step") < 20


def _write_eval_events(model_dir, values):
  """What a cluster's evaluator writes into model_dir/eval: step -> accuracy."""
  with tf.Graph().as_default():
    writer = tf.compat.v1.summary.FileWriter(os.path.join(model_dir, "eval"))
    for step, value in values.items():
      writer.add_summary(tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(
          tag="accuracy", simple_value=value)]), step)
    writer.close()


def test_cluster_stop_decision_applies_min_delta(tmp_path):
  # Accuracy creeps up by 0.001 per evaluation: progress without --min_delta,
  # no improvement with --min_delta=0.01 (the same rule as the local loop's).
  model_dir = str(tmp_path)
  _write_eval_events(model_dir, {2: 0.5, 4: 0.501, 6: 0.502})
  creeping = GuardConfig(early_stopping_metric="accuracy", patience=2)
  assert early_stopping.stop_decision(model_dir, creeping) == ""
  strict = GuardConfig(early_stopping_metric="accuracy", patience=2, min_delta=0.01)
  reason = early_stopping.stop_decision(model_dir, strict)
  assert reason.startswith("early stopping at step 6: accuracy did not improve on 0.5 "
                           "(step 2) for 2 evaluations")
  # The local loop's decision on the same results says the same.
  state = early_stopping.LoopState()
  decisions = [early_stopping.record_evaluation(state, step, {"accuracy": value}, strict)
               for step, value in ((2, 0.5), (4, 0.501), (6, 0.502))]
  assert decisions[-1] == early_stopping.EARLY_STOP and state.stopped == reason
  assert early_stopping.stop_decision(model_dir, GuardConfig()) == ""  # not asked for


class SnapshotHook(tf.compat.v1.train.SessionRunHook):
  """Variables and learning rate at the start of every training segment."""

  def __init__(self):
    self.snapshots = []

  def begin(self):
    self._vars = {v.op.name: v for v in tf.compat.v1.global_variables()}
    self._lr = tf.compat.v1.get_default_graph().get_tensor_by_name("current_learning_rate:0")

  def after_create_session(self, session, coord):
    self.snapshots.append(session.run({"vars": self._vars, "lr": self._lr}))


def test_regression_restores_best_weights_and_optimizer_state_across_restart(make_config):
  # The learning rate jumps to 30 at step 4: the eval loss at step 6 is far
  # worse than the best (step 2 or 4, at learning rate 1), beyond the
  # tolerance of 1.0.
  cfg = make_config(freeze__spec="all", optimizer__name="momentum",
                    schedule__boundaries=(4,), schedule__values=(1.0, 30.0),
                    run__save_checkpoints_steps=2, run__max_steps=6,
                    guards__eval_every_steps=2,
                    guards__early_stopping_metric="loss", guards__regression_tolerance=1.0,
                    guards__regression_lr_factor=0.01)
  model_dir = cfg.run.model_dir
  first = runner.Experiment(cfg)
  first.train()
  state = _state(model_dir)
  best_name = os.path.join("best", f"model.ckpt-{state['best_step']}")
  assert state["best_step"] in (2, 4) and state["pending_restore_at_step"] == 6
  assert state["restores"][0]["step"] == 6 and state["lr_scale"] == pytest.approx(0.01)
  best = read_checkpoint(os.path.join(model_dir, best_name))
  first_best = state["best_value"]
  # Stopped right after the decision (max_steps 6), as a kill would: the
  # restart applies the pending restore before its first step.
  snapshot = SnapshotHook()
  second = runner.Experiment(cfg.replace(run__max_steps=7))
  assert second.train(hooks=[snapshot]) == 7
  restored = snapshot.snapshots[0]
  assert restored["vars"]["global_step"] == 6  # the step (and schedule) go on
  for name, value in best.items():
    if name != "global_step":  # weights, BatchNorm, momentum slots: the best's
      np.testing.assert_array_equal(restored["vars"][name], value, err_msg=name)
  assert restored["lr"] == pytest.approx(30.0 * 0.01)
  state = _state(model_dir)
  assert state["pending_restore_at_step"] == -1 and len(state["restores"]) == 1
  # The kept best checkpoint was never replaced by a worse one (step 7, from
  # the restored weights at the lower rate, may beat it).
  assert state["best_value"] <= first_best
  assert state["best_checkpoint"] == os.path.join("best", f"model.ckpt-{state['best_step']}")


def test_record_evaluation_decisions():
  guards = GuardConfig(early_stopping_metric="accuracy", patience=3,
                       regression_tolerance=0.1, regression_lr_factor=0.5)
  state = early_stopping.LoopState()
  decide = lambda step, acc: early_stopping.record_evaluation(state, step, {"accuracy": acc},
                                                         guards)
  assert decide(10, 0.80) == early_stopping.IMPROVED
  state.best_checkpoint = "best/model.ckpt-10"
  assert decide(20, 0.75) == early_stopping.NO_IMPROVEMENT  # within tolerance
  assert decide(30, 0.60) == early_stopping.REGRESSED and state.lr_scale == 0.5
  assert decide(40, math.nan) == early_stopping.EARLY_STOP  # NaN never improves
  assert "did not improve on 0.8 (step 10) for 3 evaluations" in state.stopped
  with pytest.raises(ConfigError, match="choose one of accuracy"):
    early_stopping.record_evaluation(early_stopping.LoopState(), 1, {"accuracy": 1.0},
                                GuardConfig(early_stopping_metric="auc"))
  assert specs.metric_mode("loss") == "min" and specs.metric_mode("accuracy") == "max"


def test_finite_check_covers_what_training_writes_and_skips_frozen_weights():
  # Built like model_fn: a frozen weight, a trained one with Adam slots, a
  # moving statistic updated through a control dependency, the global step.
  with tf.Graph().as_default():
    step = tf.compat.v1.train.get_or_create_global_step()
    frozen = tf.Variable(1.0, name="frozen", trainable=False)
    trained = tf.Variable(2.0, name="trained")
    moving = tf.Variable(0.0, name="moving_mean", trainable=False)
    loss = tf.square(trained * frozen)
    update = moving.assign(0.9 * moving + 0.1 * loss)
    with tf.control_dependencies([update]):
      train_op = tf.compat.v1.train.AdamOptimizer(0.1).minimize(loss, global_step=step)
    tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.TRAIN_OP, train_op)
    written = hooks.written_variable_ops([train_op])
    assert {"trained", "moving_mean", "global_step", "trained/Adam", "trained/Adam_1"} <= written
    assert "frozen" not in written
    listener = hooks.FiniteCheckpointListener("unused")
    listener.begin()
    assert "frozen" not in listener._names and "trained" in listener._names
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer())
      listener.before_save(session, 0)
      session.run(frozen.assign(float("nan")))
      listener.before_save(session, 0)  # frozen weights are never changed by training
      session.run(trained.assign(float("inf")))
      with pytest.raises(hooks.DivergedError, match="variable trained holds NaN or Inf"):
        listener.before_save(session, 1)
  assert hooks.written_variable_ops([]) == set()
