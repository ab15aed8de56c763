"""Runs one benchmark measurement in a fresh child process (no TensorFlow in the parent).

`run_worker(spec)` starts `python scripts/bench_workers.py --worker JSON` (or
scripts/bench_peers.py for a peer); the
child prints one `BENCH_RESULT {json}` line. Ours (the real et-train main) and
each peer get the same interpreter start, imports and thread pools, and the
process start is a real one. A run of ours that et-train refuses (exit 1: a
flag or value today's code does not know) comes back as
{"unavailable": "<et-train's one sentence>"} so a row can say "not available"
for a feature that has not landed yet.
"""
import json
import os
import subprocess
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(SCRIPTS, "bench_workers.py")
PEERS = os.path.join(SCRIPTS, "bench_peers.py")
PEER_KINDS = ("keras", "limit", "export_keras")
# Children run here: a relative path a run writes (a --cache prefix, say)
# lands in git-ignored scratch, never in the checkout.
SCRATCH = os.path.join(os.path.dirname(SCRIPTS), "bench", "scratch")
RESULT_PREFIX = "BENCH_RESULT "


class WorkerError(RuntimeError):
  """A measurement's child process failed for a reason other than a refused flag."""


def child_env():
  """The environment of every child: TF's C++ logging quiet, nothing else changed."""
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0")


def run_worker(spec: dict, timeout: float = 1800) -> dict:
  """Runs one measurement; returns its result dict (with `wall_s`, launch to exit).

  Raises:
    WorkerError: the child crashed or printed no result.
  """
  spec = dict(spec, t_launch=time.time())
  start = time.perf_counter()
  script = PEERS if spec["kind"] in PEER_KINDS else WORKERS
  proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)],
                        capture_output=True, text=True, timeout=timeout,
                        env=child_env(), cwd=SCRATCH)
  wall = time.perf_counter() - start
  result = None
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      result = json.loads(line[len(RESULT_PREFIX):])
  if result is not None and result.get("exit_code", 0) == 0:
    result["wall_s"] = wall
    return result
  if result is not None and result.get("exit_code") == 1:
    # et-train's own refusal: one sentence on stderr.
    lines = [l for l in proc.stderr.splitlines() if l.startswith("et-train:")]
    return {"unavailable": lines[-1] if lines else proc.stderr.strip()[-300:]}
  raise WorkerError(f"benchmark worker {spec['kind']} failed (exit {proc.returncode}):\n"
                    f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
