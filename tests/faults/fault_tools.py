"""Real, bounded fault injection for tests: full disks, read-only directories,
SIGKILL at a chosen moment, and byte-for-byte snapshots of a directory.

Nothing is mocked: `small_tmpfs` mounts a real tmpfs, `read_only_bind` a real
read-only bind mount (root ignores file modes, so chmod cannot make a
directory read-only for the tests that run as root here), and `run_and_kill`
SIGKILLs a real console-script process. Mounting needs root (or
CAP_SYS_ADMIN); where it is not possible the test is skipped with the reason
printed. Every mount is undone when the block ends, however it ends.

Import from a test file as `from faults import fault_tools` (tests/ is on
sys.path through tests/conftest.py), and make the fixtures visible to pytest by naming them in the test module:
`tmpfs_dir = fault_tools.tmpfs_dir`.
"""
import contextlib
import dataclasses
import errno
import fnmatch
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterator, Optional, Sequence, Union

import pytest


def _skip(reason: str) -> None:
  print(f"SKIPPED: {reason}", file=sys.stderr)  # visible in the captured output too
  pytest.skip(reason)


def _mount(args: Sequence[str]) -> subprocess.CompletedProcess:
  return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30,
                        check=False)


def _unmount(path: str) -> None:
  """Unmounts `path`; lazily when something still has a file open there."""
  done = subprocess.run(["umount", path], capture_output=True, text=True, timeout=30,
                        check=False)
  if done.returncode and is_mount_point(path):
    subprocess.run(["umount", "-l", path], capture_output=True, text=True, timeout=30,
                   check=False)


def is_mount_point(path: str) -> bool:
  """Whether `path` is listed as a mount point in /proc/self/mounts."""
  real = os.path.realpath(path)
  try:
    with open("/proc/self/mounts", encoding="utf-8") as f:
      return any(line.split()[1] == real for line in f if len(line.split()) > 1)
  except OSError:
    return os.path.ismount(real)


def _require_root(what: str) -> None:
  if not hasattr(os, "geteuid") or os.geteuid() != 0:
    _skip(f"{what} needs root (mount); this test runs as uid "
          f"{os.geteuid() if hasattr(os, 'geteuid') else '?'}")
  if not shutil.which("mount"):
    _skip(f"{what} needs the mount command, which is not installed")


@contextlib.contextmanager
def small_tmpfs(size: str = "4m", parent: Optional[str] = None) -> Iterator[str]:
  """A fresh directory backed by a tmpfs of `size` bytes, for disk-full tests.

  Args:
    size: the tmpfs size as mount takes it ("4m", "512k").
    parent: where to create the mount point (default: the temp directory).

  Yields:
    The mounted directory (empty).
  """
  _require_root("a small tmpfs")
  path = tempfile.mkdtemp(prefix="et-tmpfs-", dir=parent)
  done = _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", path])
  if done.returncode:
    os.rmdir(path)
    _skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
  try:
    yield path
  finally:
    _unmount(path)
    shutil.rmtree(path, ignore_errors=True)


def free_bytes(path: str) -> int:
  """Bytes an unprivileged writer can still put on `path`'s file system."""
  stat = os.statvfs(path)
  return stat.f_bavail * stat.f_frsize


def fill_disk(path: str, leave: int = 0, name: str = ".et-filler") -> str:
  """Writes a filler file under `path` so that about `leave` bytes stay free.

  Delete the returned file to "free the space" again (a rerun then resumes).

  Returns:
    The filler file's path.
  """
  filler = os.path.join(path, name)
  block = 1 << 16
  with open(filler, "wb", buffering=0) as f:  # unbuffered: ENOSPC surfaces here
    try:
      while free_bytes(path) > leave + block:
        f.write(b"\0" * block)
      remaining = free_bytes(path) - leave
      if remaining > 0:
        f.write(b"\0" * remaining)
    except OSError as e:
      if e.errno != errno.ENOSPC:
        raise
  return filler


@contextlib.contextmanager
def read_only_bind(path: str) -> Iterator[str]:
  """Makes `path` (an existing directory) read-only for everyone, root included.

  A bind mount of the directory onto itself, remounted read-only: writes
  fail with EROFS while the block runs; afterwards the directory is writable
  again and holds exactly what it held before.

  Yields:
    `path`.
  """
  _require_root("a read-only bind mount")
  done = _mount(["--bind", path, path])
  if done.returncode:
    _skip(f"cannot bind-mount {path}: {done.stderr.strip() or done.returncode}")
  try:
    done = _mount(["-o", "remount,ro,bind", path])
    if done.returncode:
      _skip(f"cannot remount {path} read-only: {done.stderr.strip() or done.returncode}")
    probe = os.path.join(path, ".et-ro-probe")
    try:
      with open(probe, "w", encoding="utf-8"):
        pass
      os.remove(probe)
      _skip(f"the read-only bind mount of {path} still accepts writes")
    except OSError as e:
      if e.errno != errno.EROFS:
        raise
    yield path
  finally:
    _unmount(path)


@pytest.fixture
def tmpfs_dir() -> Iterator[str]:
  """A 4 MB tmpfs directory (skipped with the reason where mounting fails)."""
  with small_tmpfs("4m") as path:
    yield path


@pytest.fixture
def read_only() -> Callable[[str], "contextlib.AbstractContextManager[str]"]:
  """`read_only(path)` is `read_only_bind(path)`; every mount is undone at teardown."""
  with contextlib.ExitStack() as stack:
    yield lambda path: stack.enter_context(read_only_bind(path))


def tree_files(path: str) -> Dict[str, str]:
  """Relative path -> sha256 of the bytes, for every file under `path`.

  Directories appear as `rel/` -> "dir" (so an added empty directory, e.g. a
  left-over export temp dir, counts as a change) and symlinks as
  `link -> target`. A missing `path` gives {}.
  """
  out: Dict[str, str] = {}
  if not os.path.exists(path):
    return out
  for root, dirs, names in os.walk(path):
    dirs.sort()
    for name in dirs:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      out[rel + "/"] = f"-> {os.readlink(full)}" if os.path.islink(full) else "dir"
    for name in sorted(names):
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      if os.path.islink(full):
        out[rel] = f"-> {os.readlink(full)}"
        continue
      digest = hashlib.sha256()
      with open(full, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # pylint: disable=cell-var-from-loop
          digest.update(chunk)
      out[rel] = digest.hexdigest()
  return out


def tree_digest(path: str) -> str:
  """One sha256 over every file's relative path and bytes under `path`.

  Equal digests mean the directory is byte-for-byte the same; compare
  `tree_files` instead where the assertion message should say what changed.
  """
  digest = hashlib.sha256()
  for rel, value in sorted(tree_files(path).items()):
    digest.update(rel.encode("utf-8", "surrogateescape") + b"\0" + value.encode() + b"\n")
  return digest.hexdigest()


def console_script(name: str) -> str:
  """The path of an installed console script (`et-train`) next to sys.executable."""
  path = os.path.join(os.path.dirname(sys.executable), name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"console script {name} is not installed next to "
                            f"{sys.executable}; pip install -e . first")
  return path


@dataclasses.dataclass
class KillResult:
  """What `run_and_kill` saw.

  Attributes:
    returncode: the process's exit status (-9 when SIGKILLed).
    reason: "pattern" (killed when the pattern appeared), "timeout" (killed
      after `kill_after` seconds) or "exited" (it ended by itself).
    matched: the relative path that matched the pattern, if any.
    stdout, stderr: what the process printed.
    seconds: how long it ran.
  """
  returncode: int
  reason: str
  matched: Optional[str]
  stdout: str
  stderr: str
  seconds: float

  @property
  def killed(self) -> bool:
    return self.reason in ("pattern", "timeout")


def find_match(watch_dir: str, pattern: str) -> Optional[str]:
  """The first path under `watch_dir` (relative, files and directories) whose
  relative path or basename matches the glob `pattern`, or None."""
  if not os.path.isdir(watch_dir):
    return None
  for root, dirs, names in os.walk(watch_dir):
    for name in dirs + names:
      rel = os.path.relpath(os.path.join(root, name), watch_dir)
      if fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(rel, pattern):
        return rel
  return None


def run_and_kill(argv: Union[str, Sequence[str]], *, watch_dir: Optional[str] = None,
                 pattern: Optional[Union[str, Callable[[str], Optional[str]]]] = None,
                 kill_after: float = 60.0, env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None, poll_interval: float = 0.005) -> KillResult:
  """Runs a command and SIGKILLs it (its whole process group) at a chosen moment.

  Args:
    argv: the command; a bare console-script name ("et-train") as argv[0] is
      resolved with `console_script`.
    watch_dir: the directory to watch for `pattern`.
    pattern: a glob matched against every path under `watch_dir` (its relative
      path or its basename, e.g. "*.index.tempstate*" or "*temp-*"), or a
      callable(watch_dir) returning the matched name or None.
    kill_after: seconds after which the process is killed anyway.
    env: the environment (default: this one).
    cwd: the working directory.
    poll_interval: seconds between looks at `watch_dir`; temp files of a tiny
      checkpoint live for milliseconds, so keep it small.

  Returns:
    A KillResult.
  """
  argv = [argv] if isinstance(argv, str) else list(argv)
  if os.sep not in argv[0] and argv[0].startswith("et-"):
    argv[0] = console_script(argv[0])
  matcher = pattern if callable(pattern) else (
      (lambda d: find_match(d, pattern)) if pattern else (lambda d: None))
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    start = time.monotonic()
    process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd,
                               start_new_session=True)  # a group: kill its children too
    reason, matched = "exited", None
    try:
      while process.poll() is None:
        matched = matcher(watch_dir) if watch_dir else None
        if matched is not None:
          reason = "pattern"
          break
        if time.monotonic() - start > kill_after:
          reason = "timeout"
          break
        time.sleep(poll_interval)
    finally:
      if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(process.pid, signal.SIGKILL)
      process.wait()
    if reason != "exited" and process.returncode != -signal.SIGKILL:
      reason, matched = "exited", None  # it ended on its own before the kill landed
    seconds = time.monotonic() - start
    out.seek(0)
    err.seek(0)
    return KillResult(process.returncode, reason, matched,
                      out.read().decode("utf-8", "replace"),
                      err.read().decode("utf-8", "replace"), seconds)
