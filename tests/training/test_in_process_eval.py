"""In-process evaluation while training: one train call, the eval graph kept alive.

A local run with --eval_every_steps trains in one `Estimator.train` call,
saves a checkpoint at every evaluation step and evaluates it inside the
process with the live weights. What it records (eval_results.json, the eval
event files, the loop state) must be what `Estimator.evaluate` of the same
checkpoint gives.
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.data import bad_records
from estimator_transfer.serving import exporters
from estimator_transfer.training import early_stopping
from estimator_transfer.training import evaluator as evaluator_lib
from estimator_transfer.training import experiment as runner
from estimator_transfer.training import in_process_eval


class CountSessions(tf.compat.v1.train.SessionRunHook):
  """How many training sessions (train calls) ran."""

  def __init__(self):
    self.sessions = 0

  def after_create_session(self, session, coord):
    del session, coord
    self.sessions += 1


def _eval_events(model_dir):
  """step -> {tag: value} of the scalar eval summaries in model_dir/eval."""
  out = {}
  for path in sorted(tf.io.gfile.glob(os.path.join(model_dir, "eval", "events.out.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(int(event.step), {})[value.tag] = value.simple_value
  return out


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_in_process_evaluations_equal_checkpoint_evaluations(make_config, ema):
  # Checkpoints every 4 steps, evaluations every 3: the evaluation steps get
  # a checkpoint of their own (3, 6, 9 and the last step 10).
  cfg = make_config(run__max_steps=10, run__save_checkpoints_steps=4,
                    run__keep_checkpoint_max=20, guards__eval_every_steps=3,
                    optimizer__ema_decay=ema, export__export_dir="")
  sessions = CountSessions()
  experiment = runner.Experiment(cfg)
  assert experiment.train(hooks=[sessions]) == 10
  assert sessions.sessions == 1  # one train call: the input pipeline never restarts
  model_dir = cfg.run.model_dir
  state = early_stopping.LoopState.load(model_dir)
  assert [h["step"] for h in state.history] == [3, 6, 9, 10]
  events = _eval_events(model_dir)
  assert sorted(events) == [3, 6, 9, 10]
  with open(os.path.join(model_dir, "eval_results.json")) as f:
    report = json.load(f)
  assert report["global_step"] == 10 and report["checkpoint"].endswith("model.ckpt-10")
  # Estimator.evaluate of each evaluated checkpoint: the same numbers.
  reference = evaluator_lib.CheckpointEvaluator(experiment)
  for entry in state.history:
    step = entry["step"]
    path = os.path.join(model_dir, f"model.ckpt-{step}")
    assert tf.io.gfile.exists(path + ".index"), path
    expected = reference(step, path)
    assert expected["global_step"] == step
    for key in ("accuracy", "loss"):
      np.testing.assert_allclose(entry[key], expected[key], rtol=1e-5, err_msg=(step, key))
      np.testing.assert_allclose(events[step][key], expected[key], rtol=1e-5,
                                 err_msg=(step, key))
  if not ema:
    # Evaluating never interrupts training: the same seeded run without
    # evaluation ends with the very same weights.
    plain = runner.Experiment(cfg.replace(guards__eval_every_steps=0,
                                          run__model_dir=model_dir + "_plain"))
    assert plain.train() == 10
    with_eval = tf.train.load_checkpoint(os.path.join(model_dir, "model.ckpt-10"))
    without = tf.train.load_checkpoint(os.path.join(model_dir + "_plain", "model.ckpt-10"))
    for name in without.get_variable_to_shape_map():
      np.testing.assert_array_equal(with_eval.get_tensor(name), without.get_tensor(name),
                                    err_msg=name)
  # The kept graph also restores a checkpoint (a restart's pending evaluation).
  kept = in_process_eval.InProcessEvaluator(experiment)
  try:
    restored = kept.evaluate_checkpoint(6, os.path.join(model_dir, "model.ckpt-6"))
  finally:
    kept.close()
  np.testing.assert_allclose(restored["loss"], state.history[1]["loss"], rtol=1e-5)


def test_early_stop_ends_the_one_train_call_and_latest_export_only_when_asked(make_config):
  # Learning rate 0: no evaluation improves on the first, patience 2 stops
  # at the third (step 6); the best model is exported, no "latest" one.
  cfg = make_config(freeze__spec="all", schedule__values=(0.0,), run__max_steps=30,
                    run__save_checkpoints_steps=5, guards__eval_every_steps=2,
                    guards__early_stopping_metric="accuracy", guards__patience=2)
  sessions = CountSessions()
  experiment = runner.Experiment(cfg)
  callback = exporters.build_best_model_callback(experiment)
  experiment.train(after_evaluation=callback, hooks=[sessions])
  assert experiment.outcome.step == 6 and sessions.sessions == 1
  assert "early stopping at step 6" in experiment.outcome.stopped_early
  assert os.path.exists(os.path.join(cfg.run.model_dir, "best", "model.ckpt-2.index"))
  assert len(exporters.read_ledger(cfg.export.export_dir)) == 1
  lines = experiment.export_final(experiment.outcome.last_eval)
  assert not os.path.exists(os.path.join(cfg.run.model_dir, exporters.LATEST_SUBDIR))
  assert any("latest export: not asked" in line for line in lines), lines
  # --export_latest: every evaluated checkpoint, and the final one, to export/latest.
  asked = runner.Experiment(cfg.replace(export__export_latest=True,
                                        run__model_dir=cfg.run.model_dir + "_latest"))
  asked.train(after_evaluation=exporters.build_best_model_callback(asked))
  latest_dir = os.path.join(asked.config.run.model_dir, exporters.LATEST_SUBDIR)
  assert len(tf.io.gfile.listdir(latest_dir)) == 3  # steps 2, 4, 6
  asked.export_final(asked.outcome.last_eval)
  assert len(tf.io.gfile.listdir(latest_dir)) == 3  # step 6 is there already


@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("cache, keeps", [("auto", True), ("off", False), ("tiny", False)])
def test_evaluation_batches_are_decoded_once_and_give_the_same_metrics(
    make_config, monkeypatch, cache, keeps, prepared):
  # --cache=auto keeps the decoded eval batches after the first pass; off, or
  # over the memory budget, every evaluation reads the files again. Prepared
  # in the background (as training starts), the first pass is the decoding
  # one, before any evaluation.
  if cache == "tiny":
    from estimator_transfer.data import memory_cache  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(memory_cache, "budget_bytes", lambda config: 1000)
  cfg = make_config(run__max_steps=4, run__save_checkpoints_steps=4,
                    input__cache="auto" if cache == "tiny" else cache,
                    export__export_dir="")
  experiment = runner.Experiment(cfg)
  assert experiment.train() == 4
  path = os.path.join(cfg.run.model_dir, "model.ckpt-4")
  expected = evaluator_lib.CheckpointEvaluator(experiment)(4, path)
  kept = in_process_eval.InProcessEvaluator(experiment)
  try:
    if prepared:
      kept.prepare_in_background()
      kept._ready()  # pylint: disable=protected-access
      assert kept._batches.ready == keeps  # pylint: disable=protected-access
    results = [kept.evaluate_checkpoint(4, path) for _ in range(3)]
    assert kept._batches.ready == keeps  # pylint: disable=protected-access
    if keeps:
      # A fed pass never touches the input pipeline: its iterator stays at the end.
      with pytest.raises(tf.errors.OutOfRangeError):
        kept._session.run(kept._batches._outputs)  # pylint: disable=protected-access
  finally:
    kept.close()
  for result in results:
    for key in ("accuracy", "loss", "bad_records"):
      np.testing.assert_allclose(result[key], expected[key], rtol=1e-6, err_msg=key)


def _eval_data_with_a_broken_image(cfg, tmp_path):
  """A copy of cfg's --eval_data whose second record holds no image."""
  records = []
  for name in sorted(os.listdir(cfg.input.eval_data)):
    if name != "labels.txt":
      records += list(tf.compat.v1.io.tf_record_iterator(
          os.path.join(cfg.input.eval_data, name)))
  broken = tf.train.Example.FromString(records[1])
  broken.features.feature["image/encoded"].bytes_list.value[0] = b"not an image"
  records[1] = broken.SerializeToString()
  eval_dir = tmp_path / "eval_with_bad"
  eval_dir.mkdir()
  with tf.io.TFRecordWriter(str(eval_dir / "e-00000-of-00001.tfrecord")) as writer:
    for record in records:
      writer.write(record)
  tf.io.gfile.copy(os.path.join(cfg.input.eval_data, "labels.txt"),
                   str(eval_dir / "labels.txt"))
  return str(eval_dir)


@pytest.mark.parametrize("prepared", [False, True])
def test_fed_evaluations_keep_the_bad_record_count(make_config, tmp_path, prepared):
  # One undecodable image in --eval_data (--on_bad_record=skip): every
  # evaluation counts it, the fed ones as the reading (or decoding) one.
  cfg = make_config(run__max_steps=2, run__save_checkpoints_steps=2, export__export_dir="")
  cfg = cfg.replace(input__eval_data=_eval_data_with_a_broken_image(cfg, tmp_path),
                    input__on_bad_record="skip")
  experiment = runner.Experiment(cfg)
  assert experiment.train() == 2
  kept = in_process_eval.InProcessEvaluator(experiment)
  try:
    if prepared:
      kept.prepare_in_background()
    path = os.path.join(cfg.run.model_dir, "model.ckpt-2")
    results = [kept.evaluate_checkpoint(2, path) for _ in range(3)]
    assert kept._batches.ready  # pylint: disable=protected-access
  finally:
    kept.close()
  assert [r["bad_records"] for r in results] == [1.0, 1.0, 1.0]
  assert results[1]["accuracy"] == results[0]["accuracy"]


def test_an_error_while_preparing_is_raised_by_the_first_evaluation(make_config, tmp_path):
  # --on_bad_record=fail and a broken eval image: the background decoding
  # pass fails; the first evaluation raises that error, as an unprepared one
  # does, and the evaluator still closes.
  cfg = make_config(run__max_steps=2, run__save_checkpoints_steps=2, export__export_dir="")
  assert runner.Experiment(cfg).train() == 2
  cfg = cfg.replace(input__eval_data=_eval_data_with_a_broken_image(cfg, tmp_path),
                    input__on_bad_record="fail")
  experiment = runner.Experiment(cfg)
  path = os.path.join(cfg.run.model_dir, "model.ckpt-2")
  messages = []
  for prepared in (False, True):
    kept = in_process_eval.InProcessEvaluator(experiment)
    try:
      if prepared:
        kept.prepare_in_background()  # returns at once; the error waits
      with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        kept.evaluate_checkpoint(2, path)
      messages.append(bad_records.user_error_message(raised.value.message))
    finally:
      kept.close()
  assert messages[0] and messages[0] == messages[1], messages


def test_closing_while_preparing_stops_the_preparation(make_config):
  # A run that ends before its first evaluation (preempted, or its last step
  # reached) closes the evaluator while it may still be decoding.
  cfg = make_config(run__max_steps=2, run__save_checkpoints_steps=2, export__export_dir="")
  experiment = runner.Experiment(cfg)
  kept = in_process_eval.InProcessEvaluator(experiment)
  kept.prepare_in_background()
  kept.prepare_in_background()  # once
  kept.close()
  assert kept._preparing is None and kept._session is None  # pylint: disable=protected-access
