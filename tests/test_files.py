"""estimator_transfer.files: atomic writes and the model_dir single-writer lock,
exercised with real processes (a live holder, an exited one, a SIGKILLed one)."""
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from estimator_transfer import files
from estimator_transfer.errors import ConfigError
from faults import fault_tools

read_only = fault_tools.read_only  # a fixture, used by name

HOLD = """
    import os, sys, time
    from estimator_transfer import files
    lock = files.ModelDirLock(sys.argv[1], role=sys.argv[2], command="et-train --demo")
    lock.acquire()
    print("LOCKED", os.getpid(), flush=True)
    if sys.argv[3] == "exit":
      os._exit(0)  # dies holding it: the file stays, the flock goes
    time.sleep(120)
    """

TRY = """
    import sys, time
    from estimator_transfer import files
    from estimator_transfer.errors import ConfigError
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start together
    try:
      lock = files.ModelDirLock(sys.argv[1]).acquire()
    except ConfigError as e:
      print("BUSY", e, flush=True)
      sys.exit(1)
    print("OK", flush=True)
    time.sleep(float(sys.argv[3]))
    lock.release()
    """


def _python(body, *args, **popen_args):
  return subprocess.Popen([sys.executable, "-c", textwrap.dedent(body), *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **popen_args)


@pytest.fixture
def holder(tmp_path):
  """A live process holding the lock of tmp_path/model: (model_dir, process)."""
  model_dir = str(tmp_path / "model")
  process = _python(HOLD, model_dir, "et-train", "hold")
  try:
    line = process.stdout.readline()
    assert line.startswith("LOCKED"), process.stderr.read()
    yield model_dir, process
  finally:
    if process.poll() is None:
      process.kill()
    process.wait()


def _lock_content(model_dir):
  with open(os.path.join(model_dir, files.LOCK_NAME), encoding="utf-8") as f:
    return json.load(f)


def _busy_message(model_dir, holder_info):
  return (f"model_dir {model_dir} is being written by {holder_info['role']} (host "
          f"{holder_info['host']}, pid {holder_info['pid']}, since "
          f"{holder_info['started']}); wait for it to finish or use another --model_dir.")


def test_a_second_writer_is_refused_naming_the_holder(holder):
  model_dir, process = holder
  content = _lock_content(model_dir)
  assert content["pid"] == process.pid and content["host"] == socket.gethostname()
  assert content["role"] == "et-train" and content["command"] == "et-train --demo"
  assert "T" in content["started"] and content["started"].endswith("+00:00")
  with pytest.raises(ConfigError) as info:
    files.ModelDirLock(model_dir).acquire()
  assert str(info.value) == _busy_message(model_dir, content)
  rival = _python(TRY, model_dir, 0, 0)
  out, err = rival.communicate(timeout=120)
  assert rival.returncode == 1, err
  assert out.strip() == "BUSY " + _busy_message(model_dir, content)
  assert _lock_content(model_dir) == content  # the refused ones changed nothing
  assert sorted(os.listdir(model_dir)) == [files.LOCK_NAME]


@pytest.mark.parametrize("death", ["sigkill", "exit"])
def test_a_dead_holder_is_taken_over_with_a_warning(tmp_path, caplog, death):
  model_dir = str(tmp_path / "model")
  process = _python(HOLD, model_dir, "chief", "exit" if death == "exit" else "hold")
  assert process.stdout.readline().startswith("LOCKED")
  if death == "sigkill":
    os.kill(process.pid, signal.SIGKILL)
  process.wait(timeout=60)
  stale = _lock_content(model_dir)
  assert stale["pid"] == process.pid  # left behind: nobody released it
  with caplog.at_level(logging.WARNING, logger="estimator_transfer"):
    lock = files.ModelDirLock(model_dir).acquire()
  try:
    assert lock.held and _lock_content(model_dir)["pid"] == os.getpid()
    assert (f"took over the lock of model_dir {model_dir} from "
            f"{files.describe_holder(stale)}, which is no longer running.") in caplog.text
  finally:
    lock.release()
  assert os.listdir(model_dir) == []


def _dead_pid():
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def _write_lock_by_hand(model_dir, **fields):
  info = {"role": "et-train", "host": socket.gethostname(), "pid": _dead_pid(),
          "started": "2026-01-01T00:00:00+00:00", "command": "et-train"}
  info.update(fields)
  files.write_json(os.path.join(model_dir, files.LOCK_NAME), info)
  return info


@pytest.mark.parametrize("flock", [True, False])
def test_a_lock_file_naming_an_exited_pid_is_taken_over(tmp_path, monkeypatch, caplog, flock):
  if not flock:  # a platform or file system without flock: the pid decides
    monkeypatch.setattr(files, "fcntl", None)
  model_dir = str(tmp_path)
  stale = _write_lock_by_hand(model_dir)
  with caplog.at_level(logging.WARNING, logger="estimator_transfer"):
    with files.ModelDirLock(model_dir, role="et-train") as lock:
      assert lock.held and _lock_content(model_dir)["pid"] == os.getpid()
  assert f"from et-train (host {stale['host']}, pid {stale['pid']}," in caplog.text
  assert not os.path.exists(os.path.join(model_dir, files.LOCK_NAME))


def test_without_flock_a_live_pid_or_another_host_is_never_taken_over(tmp_path, monkeypatch,
                                                                       holder):
  monkeypatch.setattr(files, "fcntl", None)
  model_dir, process = holder
  with pytest.raises(ConfigError, match=f"pid {process.pid}, since"):
    files.ModelDirLock(model_dir).acquire()
  other = str(tmp_path / "other")
  os.makedirs(other)
  info = _write_lock_by_hand(other, host="some-other-host")
  with pytest.raises(ConfigError) as refused:
    files.ModelDirLock(other).acquire()
  assert str(refused.value) == _busy_message(other, info)


def test_release_removes_the_file_and_the_lock_can_be_taken_again(tmp_path):
  model_dir = str(tmp_path / "new" / "model")
  lock = files.ModelDirLock(model_dir)
  assert not lock.held
  lock.acquire()
  assert os.listdir(model_dir) == [files.LOCK_NAME]
  with pytest.raises(RuntimeError, match="already held"):
    lock.acquire()
  with open(os.path.join(model_dir, "checkpoint"), "w", encoding="utf-8") as f:
    f.write("kept")
  lock.release()
  lock.release()  # a second release is a no-op
  assert not lock.held and os.listdir(model_dir) == ["checkpoint"]
  with files.ModelDirLock(model_dir):
    with pytest.raises(ConfigError, match=f"pid {os.getpid()},"):
      files.ModelDirLock(model_dir).acquire()  # another holder in this process too
  assert os.listdir(model_dir) == ["checkpoint"]


def test_only_one_of_many_simultaneous_writers_wins(tmp_path):
  model_dir = str(tmp_path / "model")
  start = time.time() + 2.0  # after every interpreter has started
  rivals = [_python(TRY, model_dir, start, 4.0) for _ in range(6)]
  outputs = [r.communicate(timeout=120) for r in rivals]
  lines = [out.strip() for out, _ in outputs]
  assert sum(line == "OK" for line in lines) == 1, (lines, [e for _, e in outputs])
  assert sum(line.startswith("BUSY model_dir") for line in lines) == 5, lines
  assert os.listdir(model_dir) == []


def test_a_remote_model_dir_is_skipped_with_a_log_line(caplog):
  with caplog.at_level(logging.INFO, logger="estimator_transfer"):
    with files.ModelDirLock("gs://bucket/model") as lock:
      assert not lock.held
  assert "model_dir gs://bucket/model is remote: its single-writer lock is skipped" \
      in caplog.text


def _temps(path):
  return [n for n in os.listdir(path) if files.TEMP_MARK in n]


def test_write_json_round_trip_and_missing_files(tmp_path):
  path = str(tmp_path / "sub" / "state.json")
  assert files.read_json(path, default={"none": True}) == {"none": True}
  assert files.read_text(path) is None
  files.write_json(path, {"b": 1, "a": [1, 2]})
  assert files.read_text(path) == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
  assert files.read_json(path) == {"a": [1, 2], "b": 1}
  copy = files.copy_atomically(path, str(tmp_path / "copy.json"))
  assert files.read_json(copy) == {"a": [1, 2], "b": 1}
  files.write_atomically(path, "not json")
  with pytest.raises(ValueError):
    files.read_json(path)


def test_a_directory_in_the_way_fails_the_write_and_leaves_no_temp(tmp_path):
  target = tmp_path / "config.json"
  target.mkdir()
  (target / "inside").write_text("old")
  with pytest.raises(OSError) as info:
    files.write_atomically(str(target), "{}")
  assert info.value.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
  assert (target / "inside").read_text() == "old"
  assert _temps(str(tmp_path)) == []


def test_a_failure_while_writing_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
  target = str(tmp_path / "config.json")
  files.write_json(target, {"version": 1})

  def full_disk(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full_disk)
  with pytest.raises(OSError, match="No space left"):
    files.write_json(target, {"version": 2})
  assert files.read_json(target) == {"version": 1}
  assert _temps(str(tmp_path)) == []


def test_a_read_only_directory_fails_with_erofs_and_changes_nothing(tmp_path, read_only):  # pylint: disable=redefined-outer-name
  model_dir = str(tmp_path / "model")
  files.write_json(os.path.join(model_dir, "config.json"), {"version": 1})
  before = fault_tools.tree_files(model_dir)
  read_only(model_dir)
  with pytest.raises(OSError) as info:
    files.write_json(os.path.join(model_dir, "config.json"), {"version": 2})
  assert info.value.errno == errno.EROFS
  with pytest.raises(OSError) as info:
    files.ModelDirLock(model_dir).acquire()
  assert info.value.errno == errno.EROFS
  assert fault_tools.tree_files(model_dir) == before


class _TFLikeError(Exception):
  """Shaped like tf.errors.OpError: the text is in `.message`, no errno."""

  def __init__(self, message):
    super().__init__(message)
    self.message = message


@pytest.mark.parametrize("error,sentence", [
    (OSError(errno.ENOSPC, "No space left on device"),
     "the disk is full (No space left on device); free some space there and rerun."),
    (OSError(errno.EDQUOT, "Disk quota exceeded"),
     "the disk quota is used up (Disk quota exceeded); free some space there and rerun."),
    (OSError(errno.EROFS, "Read-only file system"),
     "it is on a read-only file system (Read-only file system); make it writable or "
     "choose another directory."),
    (PermissionError(errno.EACCES, "Permission denied"),
     "permission is denied (Permission denied); make it writable for this user or "
     "choose another directory."),
    (_TFLikeError("{{function_node SaveV2}} /m/ck_temp/part-0.tempstate1; No space left "
                  "on device [Op:SaveV2]"),
     "the disk is full (No space left on device); free some space there and rerun."),
    (_TFLikeError("/m/config.json.tmp; Read-only file system"),
     "it is on a read-only file system (Read-only file system); make it writable or "
     "choose another directory."),
])
def test_storage_errors_become_one_sentence_naming_the_directory(error, sentence):
  message = files.storage_error(error, "/m")
  assert isinstance(message, ConfigError)
  assert str(message) == "cannot write to /m: " + sentence


@pytest.mark.parametrize("error", [OSError(errno.ENOENT, "No such file or directory"),
                                   ValueError("bad value"), _TFLikeError("NaN loss")])
def test_other_errors_are_not_storage_errors(error):
  assert files.storage_error(error, "/m") is None
