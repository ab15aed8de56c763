"""The fault-injection tools themselves: real mounts, real kills, real hashes."""
import errno
import os
import signal
import sys
import textwrap
import time

import pytest
import tensorflow as tf

from estimator_transfer import files
from faults import fault_tools

tmpfs_dir = fault_tools.tmpfs_dir  # fixtures, used by name
read_only = fault_tools.read_only


def _temps(path):
  return [n for n in os.listdir(path) if files.TEMP_MARK in n]


def test_full_tmpfs_fails_write_atomically_with_enospc_and_keeps_the_old_file(tmpfs_dir):
  target = os.path.join(tmpfs_dir, "config.json")
  files.write_json(target, {"version": 1})
  old = open(target, "rb").read()
  with pytest.raises(OSError) as info:
    files.write_atomically(target, b"x" * (8 << 20))  # twice the 4 MB tmpfs
  assert info.value.errno == errno.ENOSPC
  assert open(target, "rb").read() == old
  assert _temps(tmpfs_dir) == []
  assert fault_tools.free_bytes(tmpfs_dir) > (3 << 20)  # the failed temp was removed


def test_fill_disk_leaves_about_the_asked_space_and_frees_it_again(tmpfs_dir):
  filler = fault_tools.fill_disk(tmpfs_dir, leave=64 << 10)
  assert fault_tools.free_bytes(tmpfs_dir) <= 128 << 10
  with pytest.raises(OSError) as info:
    files.write_atomically(os.path.join(tmpfs_dir, "big"), b"x" * (1 << 20))
  assert info.value.errno == errno.ENOSPC
  os.remove(filler)
  files.write_atomically(os.path.join(tmpfs_dir, "big"), b"x" * (1 << 20))


def test_tmpfs_is_unmounted_when_the_block_fails():
  with pytest.raises(RuntimeError):
    with fault_tools.small_tmpfs("1m") as path:
      assert fault_tools.is_mount_point(path)
      raise RuntimeError("boom")
  assert not fault_tools.is_mount_point(path)
  assert not os.path.exists(path)


def test_read_only_bind_mount_refuses_writes_even_for_root_and_changes_nothing(
    tmp_path, read_only):  # pylint: disable=redefined-outer-name
  model_dir = str(tmp_path / "model")
  files.write_json(os.path.join(model_dir, "config.json"), {"a": 1})
  before = fault_tools.tree_files(model_dir)
  read_only(model_dir)
  assert fault_tools.is_mount_point(model_dir)
  for name in ("config.json", "new.json"):
    with pytest.raises(OSError) as info:
      files.write_json(os.path.join(model_dir, name), {"a": 2})
    assert info.value.errno == errno.EROFS
  with pytest.raises(OSError) as info:
    os.makedirs(os.path.join(model_dir, "export"))
  assert info.value.errno == errno.EROFS
  assert fault_tools.tree_files(model_dir) == before


def test_read_only_bind_is_undone_after_a_failure(tmp_path):
  path = str(tmp_path / "d")
  os.mkdir(path)
  with pytest.raises(RuntimeError):
    with fault_tools.read_only_bind(path):
      raise RuntimeError("boom")
  assert not fault_tools.is_mount_point(path)
  files.write_atomically(os.path.join(path, "ok.txt"), "writable again")


def _tree(root):
  os.makedirs(os.path.join(root, "sub", "deeper"))
  with open(os.path.join(root, "a.bin"), "wb") as f:
    f.write(b"\x00\x01\x02")
  with open(os.path.join(root, "sub", "deeper", "b.txt"), "w", encoding="utf-8") as f:
    f.write("hello")
  return root


def test_tree_digest_sees_every_byte_name_and_directory(tmp_path):
  root = _tree(str(tmp_path / "one"))
  digest = fault_tools.tree_digest(root)
  assert fault_tools.tree_digest(_tree(str(tmp_path / "two"))) == digest  # root-independent
  with open(os.path.join(root, "a.bin"), "r+b") as f:
    f.write(b"\x01")
  assert fault_tools.tree_digest(root) != digest
  with open(os.path.join(root, "a.bin"), "r+b") as f:
    f.write(b"\x00")
  assert fault_tools.tree_digest(root) == digest
  os.rename(os.path.join(root, "a.bin"), os.path.join(root, "c.bin"))
  assert fault_tools.tree_digest(root) != digest
  os.rename(os.path.join(root, "c.bin"), os.path.join(root, "a.bin"))
  os.mkdir(os.path.join(root, "export-temp"))
  assert "export-temp/" in fault_tools.tree_files(root)
  assert fault_tools.tree_digest(root) != digest
  assert fault_tools.tree_files(str(tmp_path / "missing")) == {}


def _child(body):
  return [sys.executable, "-c", textwrap.dedent(body)]


def test_run_and_kill_kills_when_the_pattern_appears(tmp_path):
  watch = str(tmp_path / "w")
  result = fault_tools.run_and_kill(_child(f"""
      import os, time
      os.makedirs({watch!r} + "/ckpt", exist_ok=True)
      time.sleep(0.2)
      open({watch!r} + "/ckpt/model.ckpt-5.index.tempstate123", "w").close()
      time.sleep(60)
      open({watch!r} + "/never", "w").close()
      """), watch_dir=watch, pattern="*.index.tempstate*", kill_after=30)
  assert result.reason == "pattern" and result.killed
  assert result.returncode == -signal.SIGKILL
  assert result.matched == os.path.join("ckpt", "model.ckpt-5.index.tempstate123")
  assert result.seconds < 30
  assert not os.path.exists(os.path.join(watch, "never"))


def test_run_and_kill_kills_the_whole_process_group_after_the_deadline(tmp_path):
  marker = str(tmp_path / "grandchild-survived")
  result = fault_tools.run_and_kill(_child(f"""
      import subprocess, sys, time
      subprocess.Popen([sys.executable, "-c",
                        "import time; time.sleep(1.5); open({marker!r}, 'w').close()"])
      print("started", flush=True)
      time.sleep(60)
      """), kill_after=0.8)
  assert result.reason == "timeout" and result.returncode == -signal.SIGKILL
  assert "started" in result.stdout
  time.sleep(1.5)
  assert not os.path.exists(marker)


def test_run_and_kill_reports_a_process_that_ends_by_itself(tmp_path):
  result = fault_tools.run_and_kill(
      _child("import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"),
      watch_dir=str(tmp_path), pattern="*.never", kill_after=30)
  assert (result.reason, result.returncode, result.killed) == ("exited", 3, False)
  assert result.stdout.strip() == "out" and result.stderr.strip() == "err"


def test_console_scripts_are_found_next_to_the_interpreter():
  for name in ("et-train", "et-export", "et-evaluate", "et-prepare-data"):
    assert os.access(fault_tools.console_script(name), os.X_OK)
  with pytest.raises(FileNotFoundError, match="no-such-script"):
    fault_tools.console_script("no-such-script")


def _save_checkpoint(directory):
  variable = tf.Variable(tf.zeros([512, 1024]))  # 2 MiB of float32
  return tf.train.Checkpoint(v=variable).write(os.path.join(directory, "ckpt"))


def test_a_tensorflow_save_on_a_full_disk_is_recognised_as_one(tmpfs_dir):
  fault_tools.fill_disk(tmpfs_dir, leave=256 << 10)
  with pytest.raises(Exception) as info:  # tf.errors.ResourceExhaustedError
    _save_checkpoint(tmpfs_dir)
  assert "No space left on device" in str(info.value)
  assert str(files.storage_error(info.value, tmpfs_dir)) == (
      f"cannot write to {tmpfs_dir}: the disk is full (No space left on device); "
      "free some space there and rerun.")


def test_a_tensorflow_save_in_a_read_only_dir_is_recognised_as_one(tmp_path, read_only):  # pylint: disable=redefined-outer-name
  model_dir = str(tmp_path / "model")
  os.mkdir(model_dir)
  read_only(model_dir)
  with pytest.raises(Exception) as info:  # a tf.errors.OpError
    _save_checkpoint(model_dir)
  assert str(files.storage_error(info.value, model_dir)).startswith(
      f"cannot write to {model_dir}: it is on a read-only file system")
  assert fault_tools.tree_files(model_dir) == {}


SAVE_LOOP = """
    import sys, time
    import tensorflow as tf
    tf.compat.v1.disable_eager_execution()
    variable = tf.compat.v1.get_variable("w", [1024, 1024])  # 4 MiB: a visible save
    bump = variable.assign_add(tf.ones_like(variable))
    saver = tf.compat.v1.train.Saver(max_to_keep=100)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      saver.save(sess, sys.argv[1] + "/model.ckpt", global_step=0)
      print("FIRST", flush=True)
      time.sleep(1.0)  # the watcher looks from here on
      for step in range(1, 1000):
        sess.run(bump)
        saver.save(sess, sys.argv[1] + "/model.ckpt", global_step=step)
    """


def test_sigkill_inside_a_tensorflow_checkpoint_save(tmp_path):
  # The kill lands while a save's temporaries exist; the last complete
  # checkpoint stays loadable, which is what a resume after SIGKILL relies on.
  model_dir = str(tmp_path / "model")
  os.makedirs(model_dir)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

  def saving(directory):
    if not os.path.exists(os.path.join(directory, "model.ckpt-0.index")):
      return None
    return fault_tools.find_match(directory, "*temp*")

  result = fault_tools.run_and_kill(
      [sys.executable, "-c", textwrap.dedent(SAVE_LOOP), model_dir], watch_dir=model_dir,
      pattern=saving, kill_after=240, env=env, poll_interval=0.001)
  assert result.reason == "pattern", (result.reason, result.stderr[-2000:])
  assert "temp" in result.matched
  latest = tf.train.latest_checkpoint(model_dir)
  assert latest is not None
  reader = tf.train.load_checkpoint(latest)
  step = int(latest.rsplit("-", 1)[1])
  first = tf.train.load_checkpoint(os.path.join(model_dir, "model.ckpt-0"))
  assert float(reader.get_tensor("w")[0, 0] - first.get_tensor("w")[0, 0]) == \
      pytest.approx(step, abs=1e-3)  # the values of that step, not a torn mix
