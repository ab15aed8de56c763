"""SIGKILL at several points (one inside a checkpoint save), SIGTERM, restart: training
always completes, never goes back past the last committed checkpoint, and restores the
optimizer slots exactly.

Run as a script, this file is the launcher of the et-train subprocesses: it can slow
each step down (so a kill lands mid-training, not after the end) and can SIGKILL its
own process inside the Saver, after the data and a partial index are written but
before the `checkpoint` state file names them: what a kill during a save leaves.
"""
import os
import re
import signal
import subprocess
import sys
import time

# Run as a script (the launcher) this file needs tests/ on the path, as pytest has it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from estimator_transfer.training import checkpoints
from estimator_transfer import config as config_lib
from estimator_transfer.training import experiment as runner

from continual_helpers import CaptureAfterRestoreHook, assert_values_equal, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_STEPS = 12


def _committed_step(model_dir):
  """The step the state file names (the last committed checkpoint), or -1."""
  try:
    state = checkpoints.read_state(model_dir)
  except checkpoints.CheckpointError:
    return -1
  return checkpoints.step_of(state.model_checkpoint_path) if state else -1


def _launch(mode, flags, log_dir, name):
  out = open(os.path.join(log_dir, f"{name}.out"), "w")
  err = open(os.path.join(log_dir, f"{name}.err"), "w")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), mode] + flags,
                          cwd=ROOT, env=env, stdout=out, stderr=err)
  proc.logs = (out, err)
  return proc


def _finish(proc, timeout=240):
  rc = proc.wait(timeout=timeout)
  for f in proc.logs:
    f.close()
  return rc, open(proc.logs[0].name).read(), open(proc.logs[1].name).read()


def _wait_for_commit(proc, model_dir, after_step, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"et-train exited ({proc.returncode}) before a checkpoint "
                           f"after step {after_step}: {open(proc.logs[1].name).read()}")
    if _committed_step(model_dir) > after_step:
      return
    time.sleep(0.05)
  raise AssertionError("no new checkpoint in time")


def _resumed_from(stderr):
  match = re.search(r"resuming from \S*model\.ckpt-(\d+) \(global step (\d+)\)", stderr)
  assert match, stderr[-2000:]
  return int(match.group(1))


def test_kill_and_sigterm_at_several_points_then_training_completes(
    tiny_data, tiny_backbone, tmp_path):
  model_dir = str(tmp_path / "model")
  flags = [f"--backbone={tiny_backbone['h5']}", f"--train_data={tiny_data['train']}",
           f"--model_dir={model_dir}", f"--max_steps={MAX_STEPS}", "--optimizer=adam",
           "--lr_values=0.01", "--freeze=none", "--batch_size=8", "--shuffle_buffer=64",
           "--save_checkpoints_steps=2", "--log_every_steps=2", "--seed=3"]

  # 1. SIGKILL from outside at an arbitrary point of training.
  proc = _launch("slow", flags, str(tmp_path), "a")
  _wait_for_commit(proc, model_dir, after_step=2)
  proc.send_signal(signal.SIGKILL)
  rc, _, _ = _finish(proc)
  assert rc == -signal.SIGKILL
  committed = _committed_step(model_dir)
  assert committed >= 4

  # 2. SIGKILL inside the next save: data written, index half written, state
  # file not updated. The restart must take the committed checkpoint, and the
  # leftovers of the interrupted save must not be mistaken for corruption.
  in_save = committed + 2
  rc, _, err = _finish(_launch(f"kill_in_save:{in_save}", flags, str(tmp_path), "b"))
  assert rc == -signal.SIGKILL, err[-2000:]
  assert _resumed_from(err) == committed
  assert os.path.exists(os.path.join(model_dir, f"model.ckpt-{in_save}.index"))
  assert _committed_step(model_dir) == committed

  # Restoring gives back exactly what was saved: Adam's slots, beta powers,
  # BatchNorm statistics, weights (checked in-process, one step).
  saved = read_checkpoint(os.path.join(model_dir, f"model.ckpt-{committed}"))
  assert any(name.endswith("/Adam") for name in saved)
  cfg = config_lib.load(model_dir).replace(run__max_steps=committed + 1)
  capture = CaptureAfterRestoreHook()
  assert runner.Experiment(cfg).train(hooks=[capture]) == committed + 1
  assert_values_equal(capture.values, saved)
  committed += 1

  # 3. SIGTERM (cluster preemption): a checkpoint of the current step, exit 0.
  proc = _launch("slow", flags, str(tmp_path), "c")
  _wait_for_commit(proc, model_dir, after_step=committed)
  proc.send_signal(signal.SIGTERM)
  start = time.time()
  rc, out, err = _finish(proc, timeout=60)
  assert rc == 0, err[-2000:]
  assert time.time() - start < 30
  assert _resumed_from(err) == committed
  stopped = int(re.search(r"stopped by a signal at step (\d+)", out).group(1))
  assert _committed_step(model_dir) == stopped > committed
  assert stopped < MAX_STEPS

  # The run's flags are recorded next to its config (usable as --flagfile).
  record = open(os.path.join(model_dir, "flags.txt")).read()
  assert f"--max_steps={MAX_STEPS}" in record and "--optimizer=adam" in record

  # 4. Restarting once more (in-process: the same runner path, minus a Python
  # start-up) finishes the run from the SIGTERM checkpoint.
  experiment = runner.Experiment(config_lib.load(model_dir))
  assert experiment.train() == MAX_STEPS
  assert experiment.outcome.resumed_from.endswith(f"model.ckpt-{stopped}")


def _launcher(mode, argv):
  """Runs et-train in this process, with the failure injection `mode` asks for."""
  from estimator_transfer.training import hooks  # pylint: disable=g-import-not-at-top
  from estimator_transfer.cli import train  # pylint: disable=g-import-not-at-top
  if mode == "slow":
    after_run = hooks.NonFiniteLossHook.after_run

    def slow_after_run(self, run_context, run_values):
      time.sleep(0.3)
      return after_run(self, run_context, run_values)

    hooks.NonFiniteLossHook.after_run = slow_after_run
  elif mode.startswith("kill_in_save:"):
    step = int(mode.split(":")[1])
    from tensorflow.python.checkpoint import checkpoint_management  # pylint: disable=g-import-not-at-top
    update = checkpoint_management.update_checkpoint_state_internal

    def killing_update(*args, **kwargs):
      path = kwargs.get("model_checkpoint_path", "")
      if path.endswith(f"-{step}"):
        index = path + ".index"
        with open(index, "rb") as f:
          data = f.read()
        with open(index, "wb") as f:
          f.write(data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
      return update(*args, **kwargs)

    checkpoint_management.update_checkpoint_state_internal = killing_update
  sys.argv = ["et-train"] + argv
  train.run()


if __name__ == "__main__":
  _launcher(sys.argv[1], sys.argv[2:])
