"""Writing files so that a reader never sees half of one.

Every file the product writes next to checkpoints or exports (config.json,
ledgers, reports, state files, labels) goes through `write_atomically`: the
bytes land in a temporary file in the same directory, are flushed to disk,
and only then renamed over the target, so a crash, a full disk or a SIGKILL
leaves either the old file or the new one, never a torn one.

Local paths use the os module (with fsync); paths with a URL scheme
(`gs://`, `s3://`, `hdfs://`) go through `tf.io.gfile`, imported only then
so that writing a config never loads TensorFlow.

The model_dir single-writer lock
--------------------------------
Two trainers on one model_dir interleave checkpoints, so every process that
WRITES a model_dir (et-train locally, the chief of a cluster) holds
`ModelDirLock` from just before its first write until it exits::

  with files.ModelDirLock(model_dir, role="et-train"):
    ...  # write config.json, train, export

A second writer fails in `acquire()` with a ConfigError naming the holder:
"model_dir X is being written by et-train (host H, pid P, since T); wait for
it to finish or use another --model_dir." Everything else never takes it:
et-evaluate, et-export, evaluator tasks (they read checkpoints and write only
their own eval/ and export/ sub-directories), workers and ps tasks (the chief
writes checkpoints for them).

The lock is the file `<model_dir>/.et_lock.json` ({role, host, pid, started,
command}). It is created fully written and already flocked, then published
under its name with link(), which fails when the name exists exactly like
O_CREAT|O_EXCL. The holder keeps the file open with an exclusive flock, so the
kernel frees the lock when the holder dies however it dies (SIGKILL, OOM);
a rival that obtains the flock of an existing lock file knows its holder is
gone, replaces the file with its own and logs a warning (`took over the lock
of model_dir X from ...`). Where flock is unavailable, a holder on this host
whose pid no longer runs counts as gone; one on another host is never taken
over. `release()` (or leaving the `with` block) removes the file. The fd is
not inherited by exec'd subprocesses; a fork()ed child that outlives its
parent keeps the lock held.

Remote model_dirs (gs://, s3://, hdfs://) have no atomic exclusive create and
no flock, so the lock is skipped there with a log line: it is best effort,
and a cluster has to run one chief per model_dir itself.
"""
import datetime
import errno
import json
import logging
import os
import shutil
import socket
import sys
import uuid
from typing import Any, Optional, Tuple, Union

try:
  import fcntl  # POSIX only; without it the lock judges holders by pid
except ImportError:  # pragma: no cover - Windows
  fcntl = None

from estimator_transfer.errors import ConfigError

log = logging.getLogger("estimator_transfer")

TEMP_MARK = ".tmp-"  # temporary files are <name>.tmp-<id>; readers skip them


def is_remote(path: str) -> bool:
  """Whether `path` names a file system TensorFlow reaches by URL scheme."""
  return "://" in str(path)


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # heavy: remote paths only
  return tf.io.gfile


def temp_path(path: str) -> str:
  """A unique temporary name next to `path` (same directory: rename stays atomic)."""
  return f"{path}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_atomically(path: str, data: Union[str, bytes]) -> str:
  """Writes `data` to `path` so that readers see the old or the new file only.

  Args:
    path: the target file; its directory is created when missing.
    data: text (written as UTF-8) or bytes.

  Returns:
    `path`.

  Raises:
    OSError (or a tf.errors.OpError for remote paths): the write failed; the
      previous file at `path`, if any, is unchanged and no temporary is left.
  """
  raw = data.encode("utf-8") if isinstance(data, str) else data
  tmp = temp_path(path)
  if is_remote(path):
    gfile = _gfile()
    gfile.makedirs(os.path.dirname(path) or ".")
    try:
      with gfile.GFile(tmp, "wb") as f:
        f.write(raw)
      gfile.rename(tmp, path, overwrite=True)
    except Exception:
      _remove_quietly(tmp)
      raise
    return path
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  try:
    with open(tmp, "wb") as f:
      f.write(raw)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    _remove_quietly(tmp)
    raise
  return path


def copy_atomically(src: str, dest: str) -> str:
  """Copies `src` to `dest` through a temporary file; returns `dest`."""
  if is_remote(src) or is_remote(dest):
    gfile = _gfile()
    tmp = temp_path(dest)
    try:
      gfile.copy(src, tmp, overwrite=True)
      gfile.rename(tmp, dest, overwrite=True)
    except Exception:
      _remove_quietly(tmp)
      raise
    return dest
  with open(src, "rb") as f:
    return write_atomically(dest, f.read())


def write_json(path: str, data: Any, **dump_args) -> str:
  """`write_atomically` of `data` as JSON (indent 2, sorted keys by default)."""
  dump_args.setdefault("indent", 2)
  dump_args.setdefault("sort_keys", True)
  return write_atomically(path, json.dumps(data, **dump_args) + "\n")


def read_text(path: str) -> Optional[str]:
  """The file's text, or None when it does not exist."""
  try:
    if is_remote(path):
      gfile = _gfile()
      if not gfile.exists(path):
        return None
      with gfile.GFile(path, "r") as f:
        return f.read()
    with open(path, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    return None


def read_json(path: str, default: Any = None) -> Any:
  """The parsed JSON at `path`; `default` when the file does not exist.

  Raises:
    ValueError: the file exists but is not JSON.
  """
  text = read_text(path)
  if text is None:
    return default
  return json.loads(text)


def _remove_quietly(path: str) -> None:
  try:
    if is_remote(path):
      _gfile().remove(path)
    else:
      os.remove(path)
  except Exception:  # pylint: disable=broad-except  # best effort: the write already failed
    pass


def remove_tree(path: str) -> None:
  """Removes a file or a directory tree (local paths); a missing path is fine."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    _remove_quietly(path)


# (errno, the text TensorFlow's errors carry for it, the cause, the fix)
_STORAGE_CAUSES = (
    (errno.ENOSPC, "no space left on device", "the disk is full",
     "free some space there and rerun"),
    (errno.EDQUOT, "disk quota exceeded", "the disk quota is used up",
     "free some space there and rerun"),
    (errno.EROFS, "read-only file system", "it is on a read-only file system",
     "make it writable or choose another directory"),
    (errno.EACCES, "permission denied", "permission is denied",
     "make it writable for this user or choose another directory"),
)


def storage_error(error: BaseException, directory: str) -> Optional[ConfigError]:
  """The one-sentence ConfigError for a write that failed for space or rights.

  Recognises an OSError by errno and TensorFlow's errors (ResourceExhausted
  "No space left on device", FailedPrecondition "Read-only file system", ...)
  by their text, without importing TensorFlow.

  Args:
    error: what the failed write raised.
    directory: the directory to name (the model_dir, the export dir).

  Returns:
    "cannot write to DIR: the disk is full (No space left on device); free
    some space there and rerun.", or None when `error` is another failure.
  """
  code = getattr(error, "errno", None)
  text = str(getattr(error, "message", "") or error).lower()
  for number, words, cause, fix in _STORAGE_CAUSES:
    if code == number or words in text:
      return ConfigError(f"cannot write to {directory}: {cause} "
                         f"({os.strerror(number)}); {fix}.")
  return None


# --- the model_dir single-writer lock ---------------------------------------

LOCK_NAME = ".et_lock.json"
_LOCK_ATTEMPTS = 20  # rounds of create / inspect while rivals come and go


def _flock(fd: int) -> Optional[bool]:
  """Tries an exclusive non-blocking flock: True taken, False held elsewhere,
  None where the platform or file system has no flock (then pids decide)."""
  if fcntl is None:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  except OSError as e:
    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
      return None
    raise


def _pid_alive(pid: Any) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError, OverflowError):
    return True  # someone else's live process, or a pid we cannot judge
  return True


def _same_file(fd: int, path: str) -> bool:
  """Whether `path` still names the file open as `fd` (not replaced or removed)."""
  try:
    named = os.stat(path)
  except FileNotFoundError:
    return False
  opened = os.fstat(fd)
  return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _read_holder(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  raw = b""
  while True:
    chunk = os.read(fd, 65536)
    if not chunk:
      break
    raw += chunk
  try:
    holder = json.loads(raw.decode("utf-8"))
  except ValueError:
    holder = None
  return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict) -> str:
  """`et-train (host H, pid P, since T)` for a lock file's content."""
  return (f"{holder.get('role') or 'another process'} (host {holder.get('host', '?')}, "
          f"pid {holder.get('pid', '?')}, since {holder.get('started', '?')})")


class ModelDirLock:
  """The single-writer lock of a model_dir (see the module docstring).

  Use as a context manager or call `acquire()` / `release()`.

  Args:
    model_dir: the directory to guard; created by `acquire` when missing.
    role: who writes (`et-train`, `chief`); shown to a refused rival.
    command: the command line shown to a refused rival (default sys.argv).
  """

  def __init__(self, model_dir: str, role: str = "et-train",
               command: Optional[str] = None):
    self.model_dir = model_dir
    self.role = role
    self.command = " ".join(sys.argv) if command is None else command
    self.path = os.path.join(model_dir, LOCK_NAME)
    self._fd: Optional[int] = None
    self._skipped = False

  @property
  def held(self) -> bool:
    """Whether this object holds the lock (False where it was skipped)."""
    return self._fd is not None

  def __enter__(self) -> "ModelDirLock":
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()

  def acquire(self) -> "ModelDirLock":
    """Takes the lock, taking over a stale one with a logged warning.

    Returns:
      self.

    Raises:
      ConfigError: another live process holds the lock; names it.
      OSError: model_dir or the lock file cannot be written.
    """
    if self._fd is not None or self._skipped:
      raise RuntimeError(f"the lock of {self.model_dir} is already held by this object")
    if is_remote(self.model_dir):
      self._skipped = True
      log.info("model_dir %s is remote: its single-writer lock is skipped (no "
               "atomic exclusive create there); run one writer at a time.",
               self.model_dir)
      return self
    os.makedirs(self.model_dir, exist_ok=True)
    for _ in range(_LOCK_ATTEMPTS):
      if self._create():
        return self
      if self._inspect_existing():
        return self
    raise ConfigError(f"the lock file {self.path} keeps changing under this "
                      "process; another writer is starting on this model_dir: "
                      "use another --model_dir.")

  def release(self) -> None:
    """Removes the lock file and frees the lock; a no-op when not held."""
    self._skipped = False
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      if _same_file(fd, self.path):
        os.remove(self.path)
      else:
        log.warning("the lock file %s was replaced or removed by another "
                    "process while this one held it.", self.path)
    finally:
      os.close(fd)

  def _holder_info(self) -> dict:
    return {"role": self.role, "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "command": self.command[:1000]}

  def _new_lock_file(self) -> Tuple[int, str]:
    """A locked, fully written temporary lock file: (fd, its path)."""
    tmp = temp_path(self.path)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
      _flock(fd)
      os.write(fd, (json.dumps(self._holder_info(), sort_keys=True) + "\n").encode())
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      _remove_quietly(tmp)
      raise
    return fd, tmp

  def _create(self) -> bool:
    """Publishes a new lock file unless one exists; True when it did.

    link() is the exclusive create here: like O_CREAT|O_EXCL it fails when the
    name exists, but the file appears already written and flocked, so a rival
    never sees an empty or unlocked lock file.
    """
    fd, tmp = self._new_lock_file()
    try:
      os.link(tmp, self.path)
    except FileExistsError:
      os.close(fd)
      return False
    except BaseException:
      os.close(fd)
      raise
    finally:
      _remove_quietly(tmp)
    self._fd = fd
    return True

  def _inspect_existing(self) -> bool:
    """Refuses a live holder, takes over a gone one; False to retry creating."""
    try:
      fd = os.open(self.path, os.O_RDWR)
    except FileNotFoundError:
      return False  # released meanwhile
    try:
      holder = _read_holder(fd)
      locked = _flock(fd)
      if locked is None:  # no flock here: judge by pid on this host
        gone = holder.get("host") == socket.gethostname() and not _pid_alive(
            holder.get("pid"))
      else:
        gone = locked
      if not gone:
        raise ConfigError(
            f"model_dir {self.model_dir} is being written by {describe_holder(holder)}; "
            "wait for it to finish or use another --model_dir.")
      if not _same_file(fd, self.path):
        return False  # a rival took over or released first: look again
      self._take_over(holder)
      return True
    finally:
      os.close(fd)

  def _take_over(self, holder: dict) -> None:
    # Called while holding the flock of the stale file, so no rival replaces
    # it at the same time; the new file is locked before it gets the name.
    fd, tmp = self._new_lock_file()
    try:
      os.replace(tmp, self.path)
    except BaseException:
      os.close(fd)
      _remove_quietly(tmp)
      raise
    self._fd = fd
    log.warning("took over the lock of model_dir %s from %s, which is no longer "
                "running.", self.model_dir, describe_holder(holder))
