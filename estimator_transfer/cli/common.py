"""Shared entry-point plumbing: quiet logs, flag parsing, user-error exits.

TensorFlow is imported at the top: every et-* script loads it anyway (through
the library it runs, data/prepare.py included), and cli/__init__.py has set
TF_CPP_MIN_LOG_LEVEL before.
"""
import atexit
import errno
import logging
import os
import sys
import threading
import warnings

from absl import app
from absl import flags
import tensorflow as tf
from tensorflow.python.util import deprecation

from estimator_transfer import files
from estimator_transfer.cluster import tf_config as cluster
from estimator_transfer.data import bad_records
from estimator_transfer.errors import ConfigError

# Exit codes. Orchestrators retry by exit code (Kubeflow TFJob restartPolicy
# ExitCode: 1-127 permanent, 128-255 retryable): a configuration error must
# not be retried, a lost connection or an unavailable ps should be.
EXIT_CONFIG_ERROR = 1
EXIT_TRANSIENT = 138
_TRANSIENT_ERRNOS = frozenset(filter(None, (
    getattr(errno, name, None) for name in (
        "EIO", "EAGAIN", "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED", "ECONNABORTED",
        "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN", "ENETRESET", "ESTALE", "EPIPE"))))
_TRANSIENT_TF_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                        tf.errors.AbortedError)


def quiet_tensorflow() -> None:
  """Hides TensorFlow's C++ and deprecation chatter unless --verbosity asks."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  warnings.filterwarnings("ignore", category=UserWarning, module="keras")


def _setup_logging(verbosity: int) -> None:
  if verbosity < 1:
    deprecation._PRINT_DEPRECATION_WARNINGS = False  # pylint: disable=protected-access
    tf.get_logger().setLevel(logging.ERROR)
  else:
    tf.get_logger().setLevel(logging.INFO)
  log = logging.getLogger("estimator_transfer")
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False


def is_transient(error: BaseException) -> bool:
  """Whether re-running the same command may well succeed (network, storage, peers)."""
  if isinstance(error, _TRANSIENT_TF_ERRORS):
    return True
  if isinstance(error, (ConnectionError, TimeoutError)):
    return True
  return isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS


def _first_line(message) -> str:
  text = str(message).strip()
  return text.splitlines()[0] if text else "failed"


def fail_transient(prog: str, message: str) -> None:
  """Prints one line to stderr and exits EXIT_TRANSIENT (retry me)."""
  sys.stderr.write(f"{prog}: transient error: {_first_line(message)}; exiting "
                   f"{EXIT_TRANSIENT} so the job is retried (it resumes from the last "
                   "checkpoint)\n")
  sys.stderr.flush()
  sys.exit(EXIT_TRANSIENT)


def fail(prog: str, message: str) -> None:
  """Prints one sentence to stderr and exits 1."""
  sys.stderr.write(f"{prog}: error: {_first_line(message)}\n")
  sys.stderr.flush()
  sys.exit(EXIT_CONFIG_ERROR)


def platform_argv(argv):
  """argv with platform conventions applied, before absl parses it.

  Vertex AI / SageMaker directories (AIP_MODEL_DIR, SM_MODEL_DIR, ...) become
  flags placed first, so the command line and flagfiles still win; SageMaker's
  `--flag True` for boolean flags becomes `--flag=True`.
  """
  names = list(flags.FLAGS)
  bools = [name for name in names if flags.FLAGS[name].boolean]
  return ([argv[0]] + cluster.platform_fallback_args(defined=names) +
          cluster.join_bool_values(argv[1:], bools))


def _fail_if_known(prog: str, e: Exception) -> None:
  """Exits with one line for an error a user can fix (TF) or a retry may cure (TF, OSError)."""
  directory = _written_directory(e)
  storage = files.storage_error(e, directory) if directory else None
  if storage is not None and isinstance(e, (OSError, tf.errors.OpError)):
    # A full disk or a read-only / forbidden directory: one sentence (and
    # never TensorFlow's out-of-memory hint, which ResourceExhausted carries).
    fail(prog, storage)
  if isinstance(e, tf.errors.InvalidArgumentError):
    data_error = bad_records.user_error_message(e.message)
    if data_error:  # a wrong label or a corrupt record, named by the input_fn
      fail(prog, data_error)
    if "outside [0," in e.message:
      fail(prog, e.message.split("Condition")[0].strip().rstrip("."))
  elif isinstance(e, (tf.errors.NotFoundError, tf.errors.PermissionDeniedError)):
    fail(prog, f"{e.message.splitlines()[0]}; check the path and its permissions")
  elif isinstance(e, _TRANSIENT_TF_ERRORS):
    fail_transient(prog, e.message.splitlines()[0] if e.message else type(e).__name__)
  elif isinstance(e, OSError) and is_transient(e):
    fail_transient(prog, str(e) or type(e).__name__)


def _written_directory(error: BaseException) -> str:
  """The directory to name for a failed write: --model_dir, --export_dir or
  --output_dir, whichever the failed path lies in (default --model_dir); ""
  for a permission error outside them."""
  text = f"{getattr(error, 'filename', '') or ''} {getattr(error, 'message', '') or error}"
  named = [flags.FLAGS[name].value for name in ("export_dir", "model_dir", "output_dir")
           if name in flags.FLAGS and flags.FLAGS[name].value]
  for directory in named:
    if directory in text or os.path.abspath(directory) in text:
      return directory
  if isinstance(error, (PermissionError, tf.errors.PermissionDeniedError)):
    return ""  # may be a read (of the data): the path-and-permissions line says it
  filename = getattr(error, "filename", None)
  if filename:
    return os.path.dirname(str(filename)) or "."
  model_dir = flags.FLAGS["model_dir"].value if "model_dir" in flags.FLAGS else ""
  return model_dir or "the output directory"


def _show_in_help(flag_values) -> None:
  """Makes --help list the script's own flags (absl lists only __main__'s).

  A console script's __main__ defines no flags itself, so every flag defined
  by estimator_transfer becomes a key flag of the main module.
  """
  main_module = sys.argv[0]
  for module, module_flags in flag_values.flags_by_module_dict().items():
    if module.startswith("estimator_transfer"):
      for flag in module_flags:
        flag_values.register_key_flag_for_module(main_module, flag)


def _exit_code(e: SystemExit) -> int:
  """The status the interpreter would exit with for `e` (printing a message one)."""
  if e.code is None:
    return 0
  if isinstance(e.code, int):
    return e.code
  print(e.code, file=sys.stderr)
  return 1


def end_process(code: int) -> None:
  """Ends this process with `code`, as interpreter exit would, minus its teardown.

  After TensorFlow is loaded, interpreter exit spends most of a second
  finalizing modules and C++ objects (`python -c "import tensorflow"` exits
  0.8 s after its last line), and nothing in that teardown is written
  anywhere. Everything that exit writes or waits for happens here first:
  non-daemon threads are joined, cached TensorBoard writers are closed
  (flushed), the atexit handlers run (logging, multiprocessing), and stdout
  and stderr are flushed.
  """
  main_thread = threading.current_thread()
  for thread in threading.enumerate():
    if thread is not main_thread and not thread.daemon:
      thread.join()
  tf.compat.v1.summary.FileWriterCache.clear()
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # closed, or a broken pipe: nothing to flush into
      pass
  os._exit(code)  # pylint: disable=protected-access


def run_main(prog: str, define_flags, main) -> None:
  """Defines flags, parses argv (bad flags -> one line, exit 1), runs main.

  The whole-process entry of every et-* script: the process ends here
  (`end_process`), with the exit code of main's SystemExit; under a
  profiler, coverage or a debugger it exits as usual. An unexpected
  exception propagates (and the interpreter exits as usual).
  """
  quiet_tensorflow()
  define_flags()
  _show_in_help(flags.FLAGS)

  def parse(argv):
    try:
      rest = flags.FLAGS(platform_argv(argv))
    except flags.Error as e:
      fail(prog, f"{e}; run {prog} --helpfull to list the flags")
    if len(rest) > 1:
      fail(prog, f"unexpected argument {rest[1]!r}; every setting is a --flag "
           f"(run {prog} --helpfull)")
    return rest

  def guarded(argv):
    _setup_logging(flags.FLAGS["verbosity"].value if "verbosity" in flags.FLAGS else 0)
    try:
      main(argv)
    except ConfigError as e:
      fail(prog, e)
    except KeyboardInterrupt:
      fail(prog, "interrupted; re-run the same command to resume from the last checkpoint")
    except Exception as e:  # pylint: disable=broad-except  # re-raised unless known
      _fail_if_known(prog, e)
      raise

  try:
    app.run(guarded, flags_parser=parse)
  except SystemExit as e:
    if sys.getprofile() is not None or sys.gettrace() is not None:
      raise  # a profiler, coverage or a debugger writes its results at interpreter exit
    end_process(_exit_code(e))
