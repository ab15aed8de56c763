"""et-local-cluster: a real TF_CONFIG cluster job on this machine.

  et-local-cluster --workers=1 --ps=1 -- --flagfile=flags/cluster_job.flags

starts chief + N workers + M ps + an evaluator as separate `et-train`
processes on free localhost ports, each with its own TF_CONFIG and log file
(`--logs`/<task>.log), exactly as a cluster platform would. It then waits
for the chief, lets the workers and the evaluator finish, stops the ps tasks
(they never exit by themselves), prints each task's exit code and step count
and the evaluator's final metrics, writes them to `--logs`/summary.json,
and exits with the chief's exit code. Everything after `--` goes to every
task's et-train unchanged. A dead worker does not fail the job; every child
is stopped when the launcher exits, however it exits.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from absl import app
from absl import flags

from estimator_transfer import files

FLAGS = flags.FLAGS
PROG = "et-local-cluster"
TASKS_FILENAME = "tasks.json"
SUMMARY_FILENAME = "summary.json"
EXIT_TIMEOUT = 124
_STEPS_RE = re.compile(r"et-train: (\S+) ran (\d+) local steps;(?: .* trained to step (\d+))?")
_METRICS_RE = re.compile(r"et-train: evaluator-0 final metrics (\{.*\})")


def define_flags() -> None:
  """The launcher's own flags (et-train's come after `--`)."""
  if "workers" in FLAGS:
    return
  flags.DEFINE_integer("workers", 1, "Workers besides the chief.")
  flags.DEFINE_integer("ps", 1, "Parameter-server tasks (0 for "
                       "--distribution=multi_worker_mirrored).")
  flags.DEFINE_bool("evaluator", True, "Run an evaluator task (it needs --eval_data).")
  flags.DEFINE_string("logs", "", "Per-task logs, tasks.json and summary.json; "
                      "default: a new temporary directory.")
  flags.DEFINE_integer("timeout_secs", 1800, "Stop every task and exit "
                       f"{EXIT_TIMEOUT} when the job is not done by then.")
  flags.DEFINE_integer("finish_grace_secs", 600, "After the chief exits, wait this "
                       "long for the workers and the evaluator to finish.")
  flags.DEFINE_string("host", "localhost", "Host name the tasks use for each other.")


def free_ports(count: int, host: str = "localhost") -> List[int]:
  """Ports the OS reports free (all held open at once, so they differ)."""
  sockets = []
  try:
    for _ in range(count):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind((host, 0))
      sockets.append(s)
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def cluster_spec(workers: int, ps: int, host: str = "localhost") -> Dict[str, List[str]]:
  """{"chief": [...], "worker": [...], "ps": [...]} on free ports (no evaluator)."""
  ports = free_ports(1 + workers + ps, host)
  spec = {"chief": [f"{host}:{ports[0]}"]}
  if workers:
    spec["worker"] = [f"{host}:{p}" for p in ports[1:1 + workers]]
  if ps:
    spec["ps"] = [f"{host}:{p}" for p in ports[1 + workers:]]
  return spec


def task_list(spec: Dict[str, List[str]], evaluator: bool) -> List[tuple]:
  """(name, type, index) in start order: ps first, the evaluator last."""
  tasks = [(f"ps-{i}", "ps", i) for i in range(len(spec.get("ps", [])))]
  tasks.append(("chief-0", "chief", 0))
  tasks += [(f"worker-{i}", "worker", i) for i in range(len(spec.get("worker", [])))]
  if evaluator:
    tasks.append(("evaluator-0", "evaluator", 0))
  return tasks


class Task:
  """One child et-train process."""

  def __init__(self, name: str, task_type: str, index: int, log_path: str,
               process: subprocess.Popen):
    self.name, self.task_type, self.index = name, task_type, index
    self.log_path = log_path
    self.process = process

  @property
  def returncode(self) -> Optional[int]:
    return self.process.poll()

  def stop(self, grace_secs: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_secs`; this process's group only."""
    if self.process.poll() is not None:
      return
    try:
      os.killpg(self.process.pid, signal.SIGTERM)
    except ProcessLookupError:
      return
    try:
      self.process.wait(grace_secs)
    except subprocess.TimeoutExpired:
      try:
        os.killpg(self.process.pid, signal.SIGKILL)
      except ProcessLookupError:
        return
      self.process.wait(30)

  def log_text(self) -> str:
    try:
      with open(self.log_path, errors="replace") as f:
        return f.read()
    except OSError:
      return ""


def start_task(name: str, task_type: str, index: int, spec, train_args: List[str],
               log_dir: str) -> Task:
  """Starts `et-train <train_args>` with this task's TF_CONFIG; output to its log."""
  env = dict(os.environ)
  env["TF_CONFIG"] = json.dumps({"cluster": spec,
                                 "task": {"type": task_type, "index": index}})
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  env["PYTHONUNBUFFERED"] = "1"
  log_path = os.path.join(log_dir, f"{name}.log")
  cmd = [sys.executable, "-m", "estimator_transfer.cli.train"] + list(train_args)
  with open(log_path, "w") as log:
    log.write(f"# {name}: TF_CONFIG={env['TF_CONFIG']}\n# {' '.join(cmd)}\n")
    log.flush()
    # Its own session (process group), so stopping it reaches nothing else.
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
  return Task(name, task_type, index, log_path, process)


def _say(message: str) -> None:
  sys.stderr.write(f"{PROG}: {message}\n")
  sys.stderr.flush()


def _wait(tasks: List[Task], deadline: float, poll_secs: float = 0.5) -> bool:
  """Waits until every task in `tasks` exited; False at the deadline."""
  while time.time() < deadline:
    if all(t.returncode is not None for t in tasks):
      return True
    time.sleep(poll_secs)
  return all(t.returncode is not None for t in tasks)


def summarize(tasks: List[Task], spec, chief_code: Optional[int]) -> dict:
  """Exit codes, step counts and the evaluator's metrics, read from the logs."""
  summary = {"cluster": spec, "chief_exit_code": chief_code, "tasks": {},
             "metrics": None, "global_step": None}
  for task in tasks:
    text = task.log_text()
    entry = {"type": task.task_type, "index": task.index, "pid": task.process.pid,
             "exit_code": task.returncode, "log": task.log_path, "local_steps": None}
    for match in _STEPS_RE.finditer(text):
      entry["local_steps"] = int(match.group(2))
      if match.group(3):
        summary["global_step"] = int(match.group(3))
    match = _METRICS_RE.search(text)
    if match:
      summary["metrics"] = json.loads(match.group(1))
    summary["tasks"][task.name] = entry
  return summary


def launch(train_args: List[str], workers: int = 1, ps: int = 1, evaluator: bool = True,
           log_dir: str = "", timeout_secs: float = 1800,
           finish_grace_secs: float = 600, host: str = "localhost") -> int:
  """Runs the whole job; returns the chief's exit code (EXIT_TIMEOUT on timeout).

  Args:
    train_args: et-train flags for every task.
    workers: workers besides the chief.
    ps: parameter-server tasks.
    evaluator: also run an evaluator task.
    log_dir: where logs, tasks.json and summary.json go.
    timeout_secs: the whole job's limit.
    finish_grace_secs: how long workers and evaluator may run after the chief.
    host: the host name in the cluster spec.

  Returns:
    The chief's exit code.
  """
  log_dir = log_dir or tempfile.mkdtemp(prefix="et-local-cluster-")
  os.makedirs(log_dir, exist_ok=True)
  spec = cluster_spec(workers, ps, host)
  deadline = time.time() + timeout_secs
  tasks: List[Task] = []
  chief_code = None
  try:
    _start_all(spec, evaluator, train_args, log_dir, tasks)
    chief = next(t for t in tasks if t.task_type == "chief")
    chief_code = _watch_chief(chief, tasks, deadline)
    if chief_code is None:
      _say(f"the chief did not finish within {timeout_secs}s; stopping every task")
      return EXIT_TIMEOUT
    _say(f"chief-0 exited with {chief_code}")
    if chief_code == 0:
      _let_finish([t for t in tasks if t.task_type in ("worker", "evaluator")],
                  min(deadline, time.time() + finish_grace_secs), finish_grace_secs)
    return chief_code
  finally:
    for task in reversed(tasks):  # evaluator and workers first, the ps tasks last
      task.stop()
    _report(summarize(tasks, spec, chief_code), log_dir)


def _start_all(spec, evaluator: bool, train_args: List[str], log_dir: str,
               tasks: List[Task]) -> None:
  """Starts every task, appending to `tasks` (so a failed start still stops them)."""
  for name, task_type, index in task_list(spec, evaluator):
    tasks.append(start_task(name, task_type, index, spec, train_args, log_dir))
  files.write_json(os.path.join(log_dir, TASKS_FILENAME), {
      "cluster": spec, "tasks": {t.name: {"pid": t.process.pid, "log": t.log_path,
                                          "type": t.task_type, "index": t.index}
                                 for t in tasks}}, indent=1)
  _say(f"started {', '.join(t.name for t in tasks)}; logs in {log_dir}")


def _watch_chief(chief: Task, tasks: List[Task], deadline: float) -> Optional[int]:
  """Waits for the chief, reporting other tasks that fail; its code, None at the deadline."""
  reported = set()
  while chief.returncode is None and time.time() < deadline:
    for t in tasks:
      if t.task_type != "chief" and t.returncode not in (None, 0) and t.name not in reported:
        reported.add(t.name)
        _say(f"{t.name} exited with {t.returncode} (see {t.log_path}); the job goes on")
    time.sleep(0.5)
  return chief.returncode


def _let_finish(tasks: List[Task], until: float, grace_secs: float) -> None:
  """Gives workers and the evaluator until `until` to finish after the chief.

  Workers stop at max_steps on their own; the evaluator once it has evaluated
  a checkpoint at max_steps. Both need only the chief's files and the ps
  tasks, which are still up.
  """
  if not _wait(tasks, until):
    late = [t.name for t in tasks if t.returncode is None]
    _say(f"{', '.join(late)} still running {grace_secs}s after the chief; stopping them")


def _report(summary: dict, log_dir: str) -> None:
  """Writes summary.json and prints one line per task and the metrics."""
  files.write_json(os.path.join(log_dir, SUMMARY_FILENAME), summary, indent=1)
  for name, entry in summary["tasks"].items():
    steps = f", {entry['local_steps']} local steps" if entry["local_steps"] is not None \
        else ""
    _say(f"{name}: exit {entry['exit_code']}{steps} ({entry['log']})")
  if summary["metrics"] is not None:
    _say(f"evaluator metrics: {json.dumps(summary['metrics'], sort_keys=True)}")


def main(train_args: List[str]) -> None:
  if FLAGS.workers < 0 or FLAGS.ps < 0:
    _say("error: --workers and --ps must not be negative")
    sys.exit(1)
  if FLAGS.timeout_secs < 1 or FLAGS.finish_grace_secs < 0:
    _say("error: --timeout_secs must be at least 1 and --finish_grace_secs not negative")
    sys.exit(1)
  if FLAGS.logs and os.path.exists(FLAGS.logs) and not os.path.isdir(FLAGS.logs):
    _say(f"error: --logs={FLAGS.logs} is a file; give a directory for the task logs")
    sys.exit(1)
  code = launch(train_args, workers=FLAGS.workers, ps=FLAGS.ps,
                evaluator=FLAGS.evaluator, log_dir=FLAGS.logs,
                timeout_secs=FLAGS.timeout_secs,
                finish_grace_secs=FLAGS.finish_grace_secs, host=FLAGS.host)
  sys.exit(code)


def run():
  """Console script: et-local-cluster [launcher flags] -- [et-train flags]."""
  define_flags()
  argv = list(sys.argv)
  train_args = []
  if "--" in argv:
    split = argv.index("--")
    argv, train_args = argv[:split], argv[split + 1:]

  def parse(args):
    try:
      rest = FLAGS(args)
    except flags.Error as e:
      _say(f"error: {e}; usage: {PROG} [--workers=N --ps=M] -- <et-train flags>")
      sys.exit(1)
    if len(rest) > 1:
      _say(f"error: unexpected argument {rest[1]!r}; et-train flags go after --")
      sys.exit(1)
    return rest

  def stop_on_signal(signum, frame):
    del frame
    raise SystemExit(128 + signum)  # unwinds launch(): its finally stops every task

  signal.signal(signal.SIGTERM, stop_on_signal)
  app.run(lambda _: main(train_args), argv=argv, flags_parser=parse)


if __name__ == "__main__":
  run()
