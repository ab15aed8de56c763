"""Real, bounded faults around et-train, et-export and et-prepare-data.

SIGKILL at the moment a checkpoint, an export or a TFRecord shard is being
written; a full disk (a small tmpfs, root only: skipped with the reason
otherwise) during training; two trainers on one model_dir. After each fault
nothing half-written is visible (the latest checkpoint loads, no incomplete
export version is listed, no partial shard is listed) and a rerun finishes.
"""
import glob
import os
import signal
import subprocess
import time

import numpy as np
from PIL import Image
import tensorflow as tf

from faults import fault_tools
from estimator_transfer import files
from estimator_transfer.data import sources
from estimator_transfer.serving import versions
from estimator_transfer.training import checkpoints


def _env():
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _et(tool, *args, timeout=240):
  return subprocess.run([fault_tools.console_script(tool), *args], capture_output=True,
                        text=True, timeout=timeout, env=_env())


def _train_args(tiny_data, tiny_backbone, model_dir, max_steps):
  return [f"--model_dir={model_dir}", f"--backbone={tiny_backbone['h5']}",
          f"--train_data={tiny_data['train']}", "--batch_size=4", "--freeze=none",
          f"--max_steps={max_steps}", "--save_checkpoints_steps=2", "--shuffle_buffer=16",
          "--keep_checkpoint_max=3"]


def _assert_latest_loads(model_dir):
  latest = tf.train.latest_checkpoint(model_dir)
  assert latest, f"no checkpoint in {model_dir}: {sorted(os.listdir(model_dir))}"
  reader = tf.train.load_checkpoint(latest)
  for name in reader.get_variable_to_shape_map():
    reader.get_tensor(name)
  checkpoints.verify(latest)
  return checkpoints.step_of(latest)


def _ok(done):
  assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
  assert "Traceback" not in done.stderr
  return done


def test_sigkill_during_checkpoint_save_then_resume(tiny_data, tiny_backbone, tmp_path):
  model_dir = str(tmp_path / "model")

  def saving_after_step_2(watch):
    # Only a save that starts after step 2's is recorded in the `checkpoint`
    # state file (step 2's own merge also leaves its _temp dir for a moment).
    # TF writes <prefix>_temp/part-* (and *.tempstate*) before it renames.
    state = os.path.join(watch, "checkpoint")
    try:
      with open(state) as f:
        recorded = f.readline()
    except OSError:
      return None
    recorded_step = recorded.rsplit("-", 1)[-1].strip().strip('"')
    if not recorded_step.isdigit() or int(recorded_step) < 2:
      return None
    for pattern in ("*_temp*", "*tempstate*"):
      match = fault_tools.find_match(watch, pattern)
      if match and f"ckpt-{recorded_step}_temp" not in match and (
          f"ckpt-{recorded_step}." not in match):
        return match
    return None

  killed = fault_tools.run_and_kill(
      ["et-train", *_train_args(tiny_data, tiny_backbone, model_dir, 100000)],
      watch_dir=model_dir, pattern=saving_after_step_2, kill_after=180, env=_env())
  assert killed.reason == "pattern", (killed.reason, killed.stderr[-2000:])
  step = _assert_latest_loads(model_dir)
  assert step >= 2
  done = _ok(_et("et-train", f"--model_dir={model_dir}", f"--max_steps={step + 2}"))
  assert f"trained to step {step + 2}" in done.stdout, done.stdout
  assert _assert_latest_loads(model_dir) == step + 2


def test_sigkill_during_export_then_export_again(tiny_data, tiny_backbone, tmp_path):
  model_dir, export_dir = str(tmp_path / "model"), str(tmp_path / "export")
  _ok(_et("et-train", *_train_args(tiny_data, tiny_backbone, model_dir, 2)))
  killed = fault_tools.run_and_kill(
      ["et-export", f"--model_dir={model_dir}", f"--export_dir={export_dir}"],
      watch_dir=export_dir, pattern=versions.TEMP_PREFIX + "*", kill_after=180, env=_env())
  assert killed.reason == "pattern", (killed.reason, killed.stderr[-2000:])
  assert versions.list_versions(export_dir) == []  # the temp dir is never a version
  _ok(_et("et-export", f"--model_dir={model_dir}", f"--export_dir={export_dir}"))
  published = versions.list_versions(export_dir)
  assert len(published) == 1, published
  assert os.path.exists(os.path.join(published[0], "saved_model.pb")), published


def test_sigkill_during_prepare_data_then_rerun(tmp_path):
  image_dir, out = tmp_path / "images", str(tmp_path / "prepared")
  rng = np.random.RandomState(0)
  for i in range(240):
    folder = image_dir / ("a", "b", "c")[i % 3]
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.randint(0, 255, (48, 48, 3), dtype=np.uint8)).save(
        folder / f"{i}.png")
  args = ["et-prepare-data", f"--image_dir={image_dir}", f"--output_dir={out}",
          "--num_shards=3", "--num_workers=0"]
  killed = fault_tools.run_and_kill(args, watch_dir=out, pattern="*.tfrecord.tmp*",
                                    kill_after=180, env=_env())
  assert killed.reason == "pattern", (killed.reason, killed.stderr[-2000:])
  # Whatever a reader lists is complete: every visible shard reads to its end.
  for split in (os.listdir(out) if os.path.isdir(out) else []):
    split_dir = os.path.join(out, split)
    if os.path.isdir(split_dir) and any(".tfrecord" in n for n in os.listdir(split_dir)):
      try:
        paths = sources.list_tfrecord_files(split_dir)
      except Exception:  # pylint: disable=broad-except  # only temps there: none listed
        paths = []
      for path in paths:
        sum(1 for _ in tf.compat.v1.io.tf_record_iterator(path))
  done = subprocess.run([fault_tools.console_script(args[0]), *args[1:]],
                        capture_output=True, text=True, timeout=240, env=_env())
  _ok(done)
  total = 0
  for split in os.listdir(out):
    split_dir = os.path.join(out, split)
    if os.path.isdir(split_dir):
      for path in sources.list_tfrecord_files(split_dir):
        total += sum(1 for _ in tf.compat.v1.io.tf_record_iterator(path))
  assert total == 240


def test_full_disk_during_training_then_rerun(tiny_data, tiny_backbone):
  with fault_tools.small_tmpfs("8m") as mount:
    model_dir = os.path.join(mount, "model")
    _ok(_et("et-train", *_train_args(tiny_data, tiny_backbone, model_dir, 2)))
    # The rerun's event file starts with the training graph, as the first
    # run's did: half its size left, the disk fills once training is under way.
    events = max(glob.glob(os.path.join(model_dir, "events.out.tfevents.*")),
                 key=os.path.getsize)
    filler = fault_tools.fill_disk(mount, leave=os.path.getsize(events) // 2)
    done = _et("et-train", f"--model_dir={model_dir}", "--max_steps=400")
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Hint:" not in done.stderr  # TensorFlow's out-of-memory hint
    errors = [l for l in done.stderr.splitlines() if l.startswith("et-train: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert f"cannot write to {model_dir}: the disk is full" in errors[0], errors[0]
    step = _assert_latest_loads(model_dir)
    os.remove(filler)  # space freed: the same command resumes and finishes
    done = _ok(_et("et-train", f"--model_dir={model_dir}", f"--max_steps={step + 2}"))
    assert f"trained to step {step + 2}" in done.stdout
    _assert_latest_loads(model_dir)


def test_second_trainer_is_refused_and_a_dead_holder_is_taken_over(
    tiny_data, tiny_backbone, tmp_path):
  model_dir = str(tmp_path / "model")
  lock_path = os.path.join(model_dir, files.LOCK_NAME)
  first = subprocess.Popen(
      [fault_tools.console_script("et-train"),
       *_train_args(tiny_data, tiny_backbone, model_dir, 100000)],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), start_new_session=True)
  try:
    deadline = time.monotonic() + 180
    while not (os.path.exists(lock_path) and tf.train.latest_checkpoint(model_dir)):
      assert first.poll() is None, first.stderr.read().decode()[-3000:]
      assert time.monotonic() < deadline, "the first trainer never checkpointed"
      time.sleep(0.2)
    os.killpg(first.pid, signal.SIGSTOP)  # paused: model_dir holds still
    time.sleep(0.5)
    before = fault_tools.tree_files(model_dir)
    done = _et("et-train", f"--model_dir={model_dir}", "--max_steps=4")
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    errors = [l for l in done.stderr.splitlines() if l.startswith("et-train: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert f"model_dir {model_dir} is being written by et-train" in errors[0], errors[0]
    assert f"pid {first.pid}" in errors[0] and "host " in errors[0] and "since " in errors[0]
    assert fault_tools.tree_files(model_dir) == before
  finally:
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
  step = _assert_latest_loads(model_dir)
  assert os.path.exists(lock_path)  # the dead holder's file is still there
  done = _ok(_et("et-train", f"--model_dir={model_dir}", f"--max_steps={step + 2}"))
  assert "took over the lock of model_dir" in done.stderr, done.stderr[-3000:]
  assert f"trained to step {step + 2}" in done.stdout
  assert not os.path.exists(lock_path)  # released at the end
