"""The et-* scripts end their process without the interpreter's teardown.

`common.run_main` ends the process itself (`common.end_process`): nothing an
ordinary exit writes or waits for may be lost, and the exit status is the
one main's SystemExit gives.
"""
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from estimator_transfer.cli import common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# main leaves behind: unflushed stdout, a logging file handler, a summary in
# a cached (unflushed) TensorBoard writer, an atexit handler, and a
# non-daemon thread that writes a file after the main thread is done.
SCRIPT = """
import atexit, logging, os, sys, threading, time
import tensorflow as tf
from estimator_transfer.cli import common
out = os.environ["PROBE_DIR"]

def late_write():
  time.sleep(0.5)
  with open(out + "/thread.txt", "w") as f:
    f.write("joined")

def main(argv):
  sys.stdout.write("no newline, no flush")
  handler = logging.FileHandler(out + "/log.txt", delay=False)
  logging.getLogger("probe").addHandler(handler)
  logging.getLogger("probe").warning("logged")
  with tf.Graph().as_default():  # as a training hook writes it
    writer = tf.compat.v1.summary.FileWriterCache.get(out + "/events")
  writer.add_summary(tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(
      tag="probe", simple_value=3.0)]), 7)
  atexit.register(lambda: open(out + "/atexit.txt", "w").write("ran"))
  threading.Thread(target=late_write).start()
  {ending}

common.run_main("et-x", lambda: None, main)
raise AssertionError("run_main returned")
"""


@pytest.mark.parametrize("ending, code, stderr", [
    ("return None", 0, ""),
    ("sys.exit(3)", 3, ""),
    ("sys.exit('gave up: a message')", 1, "gave up: a message"),
])
def test_end_process_loses_nothing_and_keeps_the_exit_code(tmp_path, ending, code, stderr):
  script = tmp_path / "probe.py"
  script.write_text(SCRIPT.replace("{ending}", ending))
  result = subprocess.run([sys.executable, str(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                                   PROBE_DIR=str(tmp_path)))
  assert result.returncode == code, result.stderr[-2000:]
  assert "run_main returned" not in result.stderr
  assert result.stdout.endswith("no newline, no flush")
  assert result.stderr.strip().endswith(stderr)
  assert (tmp_path / "thread.txt").read_text() == "joined"
  assert (tmp_path / "atexit.txt").read_text() == "ran"
  assert "logged" in (tmp_path / "log.txt").read_text()
  events = tf.io.gfile.glob(str(tmp_path / "events" / "events.out.*"))
  values = [(e.step, v.simple_value) for path in events
            for e in tf.compat.v1.train.summary_iterator(path) for v in e.summary.value]
  assert values == [(7, 3.0)]


def test_exit_code_of_a_system_exit():
  assert common._exit_code(SystemExit()) == 0  # pylint: disable=protected-access
  assert common._exit_code(SystemExit(138)) == 138  # pylint: disable=protected-access


def test_under_a_profiler_the_process_exits_as_usual(tmp_path):
  # cProfile writes its stats after the script returns: end_process would
  # skip that, so under a profiler (or coverage, or a debugger) run_main
  # lets the interpreter exit.
  script = tmp_path / "probe.py"
  script.write_text(SCRIPT.replace("{ending}", "sys.exit(3)"))
  stats = tmp_path / "probe.prof"
  result = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(stats), str(script)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                                   PROBE_DIR=str(tmp_path)))
  assert result.returncode == 0, result.stderr[-2000:]  # cProfile itself swallows exits
  assert stats.exists() and stats.stat().st_size > 0
  assert (tmp_path / "thread.txt").read_text() == "joined"
