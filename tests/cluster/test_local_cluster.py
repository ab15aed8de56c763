"""Real multi-process cluster jobs: chief, worker, ps and evaluator on localhost.

No mocks: et-local-cluster starts every task as its own et-train process with
its own TF_CONFIG; TensorFlow's gRPC runtime connects them.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, encode, make_image
from estimator_transfer.cli import local_cluster
from estimator_transfer.evaluation import tb_images

MAX_STEPS = 30
LAUNCH_TIMEOUT_SECS = 420  # 2 shared cores: TF startup alone takes seconds per task


def _train_flags(tiny_data, backbone, model_dir, max_steps, *extra):
  return [f"--backbone={backbone}", f"--train_data={tiny_data['train']}",
          f"--model_dir={model_dir}", f"--max_steps={max_steps}", "--batch_size=8",
          "--freeze=none", "--lr_values=0.05", "--seed=3", "--intra_op_threads=1",
          "--inter_op_threads=1", "--wait_for_workers_secs=180", *extra]


def _launch(logs, train_flags, *launcher_flags, while_running=None):
  """Runs et-local-cluster; returns (exit code, summary.json); never leaks children.

  `while_running(logs)` is polled until it returns True or the launcher ends.
  """
  cmd = [sys.executable, "-m", "estimator_transfer.cli.local_cluster", f"--logs={logs}",
         f"--timeout_secs={LAUNCH_TIMEOUT_SECS}", *launcher_flags, "--", *train_flags]
  launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  try:
    deadline = time.time() + LAUNCH_TIMEOUT_SECS + 60
    while while_running is not None and launcher.poll() is None and time.time() < deadline:
      if while_running(logs):
        break
      time.sleep(0.1)
    output, _ = launcher.communicate(timeout=max(1, deadline - time.time()))
  finally:
    if launcher.poll() is None:
      launcher.terminate()  # its own finally stops the tasks
      try:
        launcher.wait(60)
      except subprocess.TimeoutExpired:
        launcher.kill()
    _kill_leftover_tasks(logs)
  with open(os.path.join(logs, local_cluster.SUMMARY_FILENAME)) as f:
    return launcher.returncode, json.load(f), output


def _kill_leftover_tasks(logs):
  """The tasks this test's launcher started, should any outlive it."""
  try:
    with open(os.path.join(logs, local_cluster.TASKS_FILENAME)) as f:
      tasks = json.load(f)["tasks"]
  except (OSError, ValueError):
    return
  for task in tasks.values():
    try:
      os.killpg(task["pid"], signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass


def _log(summary, name):
  with open(summary["tasks"][name]["log"]) as f:
    return f.read()


def _step_record(model_dir, name):
  with open(os.path.join(model_dir, "cluster", f"{name}.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def full_job(tmp_path_factory, tiny_data, tiny_backbone):
  """chief + 1 worker + 1 ps + evaluator on the tiny data, to completion."""
  root = tmp_path_factory.mktemp("cluster_job")
  model_dir, export_dir, logs = root / "model", root / "export", root / "logs"
  summary_dir = root / "tensorboard"
  flags = _train_flags(tiny_data, tiny_backbone["h5"], model_dir, MAX_STEPS,
                       f"--eval_data={tiny_data['eval']}", f"--export_dir={export_dir}",
                       f"--summary_dir={summary_dir}", "--save_checkpoints_steps=10",
                       "--log_every_steps=5", "--eval_throttle_secs=1")
  code, summary, output = _launch(str(logs), flags, "--workers=1", "--ps=1")
  return {"code": code, "summary": summary, "output": output, "model_dir": str(model_dir),
          "export_dir": str(export_dir), "summary_dir": str(summary_dir)}


def test_job_finishes_with_the_chiefs_code(full_job):
  summary = full_job["summary"]
  assert full_job["code"] == 0, full_job["output"][-3000:]
  codes = {name: t["exit_code"] for name, t in summary["tasks"].items()}
  assert codes["chief-0"] == codes["worker-0"] == codes["evaluator-0"] == 0, codes
  assert codes["ps-0"] == -signal.SIGTERM  # a ps never exits: the launcher stopped it


def test_global_step_reaches_max_steps_and_both_trainers_took_part(full_job):
  summary, model_dir = full_job["summary"], full_job["model_dir"]
  latest = tf.train.latest_checkpoint(model_dir)
  step = int(latest.rsplit("-", 1)[1])
  assert step >= MAX_STEPS and summary["global_step"] == step
  chief, worker = (summary["tasks"][n]["local_steps"] for n in ("chief-0", "worker-0"))
  assert chief >= 1 and worker >= 1, (chief, worker)
  # Every step of either trainer advanced the one shared global step.
  assert chief + worker >= MAX_STEPS
  for name, steps in (("chief-0", chief), ("worker-0", worker)):
    record = _step_record(model_dir, name)
    assert record["finished"] and record["local_steps"] == steps


def test_evaluator_wrote_metrics_of_the_final_checkpoint(full_job):
  metrics, model_dir = full_job["summary"]["metrics"], full_job["model_dir"]
  assert metrics["global_step"] >= MAX_STEPS
  assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])
  record = _step_record(model_dir, "evaluator-0")
  assert record["final"] and record["last"] == metrics
  # Estimator's own eval summaries, for TensorBoard, and the evaluator's
  # confusion-matrix image of the final evaluation beside them.
  events = tf.io.gfile.glob(os.path.join(model_dir, "eval", "events.out.tfevents.*"))
  assert events
  steps = {e.step for path in events for e in tf.compat.v1.train.summary_iterator(path)
           for v in e.summary.value if v.tag == tb_images.IMAGE_TAG and v.HasField("image")}
  assert metrics["global_step"] in steps, steps


def _scalar_tags(event_dir):
  tags = set()
  for path in tf.io.gfile.glob(os.path.join(event_dir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_summary_dir_gets_training_and_eval_scalars(full_job):
  """--summary_dir (AIP_TENSORBOARD_LOG_DIR on Vertex AI): chief and evaluator."""
  train_tags = _scalar_tags(full_job["summary_dir"])
  assert "loss" in train_tags and any(t.startswith("learning_rate") for t in train_tags)
  assert {"accuracy", "loss"} <= _scalar_tags(os.path.join(full_job["summary_dir"], "eval"))


def test_only_the_chief_exported_and_the_export_serves(full_job):
  summary = full_job["summary"]
  assert "best export: exported" in _log(summary, "chief-0")
  for name in ("worker-0", "evaluator-0", "ps-0"):
    assert "export:" not in _log(summary, name)
  versions = [d for d in os.listdir(full_job["export_dir"]) if d.isdigit()]
  assert len(versions) == 1
  loaded = tf.saved_model.load(os.path.join(full_job["export_dir"], versions[0]))
  predict = loaded.signatures["predict"]
  image = encode(make_image(2, np.random.RandomState(0)))
  out = predict(**{list(predict.structured_input_signature[1])[0]:
                   tf.constant([image])})
  assert out["probabilities"].shape == (1, 3)
  assert np.isclose(float(tf.reduce_sum(out["probabilities"])), 1.0, atol=1e-5)


def test_job_finishes_when_a_worker_is_killed_mid_run(tmp_path, tiny_data, tiny_backbone):
  """A TF2 SavedModel (hub.KerasLayer) backbone; the worker dies by SIGKILL."""
  max_steps = 200
  model_dir, logs = tmp_path / "model", tmp_path / "logs"
  flags = _train_flags(tiny_data, tiny_backbone["saved_model"], model_dir, max_steps,
                       "--save_checkpoints_steps=100", "--log_every_steps=2")
  killed = {}

  def kill_worker_once_it_trains(logs_dir):
    try:
      record = _step_record(str(model_dir), "worker-0")
      with open(os.path.join(logs_dir, local_cluster.TASKS_FILENAME)) as f:
        pid = json.load(f)["tasks"]["worker-0"]["pid"]
    except (OSError, ValueError):
      return False
    if record["local_steps"] < 4:
      return False
    os.kill(pid, signal.SIGKILL)
    killed.update(record)
    return True

  code, summary, output = _launch(str(logs), flags, "--workers=1", "--ps=1",
                                  "--noevaluator", while_running=kill_worker_once_it_trains)
  assert killed and not killed["finished"], "the worker finished before it was killed"
  assert summary["tasks"]["worker-0"]["exit_code"] == -signal.SIGKILL
  assert code == 0 and summary["tasks"]["chief-0"]["exit_code"] == 0, output[-3000:]
  assert "worker-0 exited with -9" in output and "the job goes on" in output
  step = int(tf.train.latest_checkpoint(str(model_dir)).rsplit("-", 1)[1])
  assert step >= max_steps and summary["global_step"] == step
  assert summary["tasks"]["chief-0"]["local_steps"] + killed["local_steps"] <= step + 1


def test_launcher_ports_and_start_order():
  spec = local_cluster.cluster_spec(workers=2, ps=2)
  addresses = [a for job in spec.values() for a in job]
  assert len(set(addresses)) == 5 and "evaluator" not in spec
  order = [name for name, _, _ in local_cluster.task_list(spec, evaluator=True)]
  assert order == ["ps-0", "ps-1", "chief-0", "worker-0", "worker-1", "evaluator-0"]
