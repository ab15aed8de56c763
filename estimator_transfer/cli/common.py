"""Shared entry-point plumbing: quiet logs, flag parsing, user-error exits."""
import errno
import logging
import os
import sys
import warnings

from absl import app
from absl import flags


def quiet_tensorflow() -> None:
  """Hides TensorFlow's C++ and deprecation chatter unless --verbosity asks."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  warnings.filterwarnings("ignore", category=UserWarning, module="keras")


def _setup_logging(verbosity: int) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.python.util import deprecation  # pylint: disable=g-import-not-at-top
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


# Exit codes. Orchestrators retry by exit code (Kubeflow TFJob restartPolicy
# ExitCode: 1-127 permanent, 128-255 retryable): a configuration error must
# not be retried, a lost connection or an unavailable ps should be.
EXIT_CONFIG_ERROR = 1
EXIT_TRANSIENT = 138
_TRANSIENT_ERRNOS = frozenset(filter(None, (
    getattr(errno, name, None) for name in (
        "EIO", "EAGAIN", "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED", "ECONNABORTED",
        "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN", "ENETRESET", "ESTALE", "EPIPE"))))


def is_transient(error: BaseException) -> bool:
  """Whether re-running the same command may well succeed (network, storage, peers)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                        tf.errors.AbortedError)):
    return True
  if isinstance(error, (ConnectionError, TimeoutError)):
    return True
  return isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS


def fail_transient(prog: str, message: str) -> None:
  """Prints one line to stderr and exits EXIT_TRANSIENT (retry me)."""
  message = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
  sys.stderr.write(f"{prog}: transient error: {message}; exiting {EXIT_TRANSIENT} so "
                   "the job is retried (it resumes from the last checkpoint)\n")
  sys.stderr.flush()
  sys.exit(EXIT_TRANSIENT)


def platform_argv(argv):
  """argv with platform conventions applied, before absl parses it.

  Vertex AI / SageMaker directories (AIP_MODEL_DIR, SM_MODEL_DIR, ...) become
  flags placed first, so the command line and flagfiles still win; SageMaker's
  `--flag True` for boolean flags becomes `--flag=True`.
  """
  from estimator_transfer.cluster import tf_config as cluster  # pylint: disable=g-import-not-at-top
  names = list(flags.FLAGS)
  bools = [name for name in names if flags.FLAGS[name].boolean]
  return ([argv[0]] + cluster.platform_fallback_args(defined=names) +
          cluster.join_bool_values(argv[1:], bools))


def fail(prog: str, message: str) -> None:
  """Prints one sentence to stderr and exits 1."""
  message = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
  sys.stderr.write(f"{prog}: error: {message}\n")
  sys.stderr.flush()
  sys.exit(EXIT_CONFIG_ERROR)


def run_main(prog: str, define_flags, main) -> None:
  """Defines flags, parses argv (bad flags -> one line, exit 1), runs main."""
  quiet_tensorflow()
  define_flags()

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
    from estimator_transfer.config import ConfigError  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    _setup_logging(flags.FLAGS["verbosity"].value if "verbosity" in flags.FLAGS else 0)
    try:
      main(argv)
    except ConfigError as e:
      fail(prog, e)
    except tf.errors.InvalidArgumentError as e:
      from estimator_transfer.data import bad_records  # pylint: disable=g-import-not-at-top
      data_error = bad_records.user_error_message(e.message)
      if data_error:  # a wrong label or a corrupt record, named by the input_fn
        fail(prog, data_error)
      if "outside [0," in e.message:
        fail(prog, e.message.split("Condition")[0].strip().rstrip("."))
      raise
    except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError) as e:
      fail(prog, f"{e.message.splitlines()[0]}; check the path and its permissions")
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
            tf.errors.AbortedError) as e:
      fail_transient(prog, e.message.splitlines()[0] if e.message else type(e).__name__)
    except OSError as e:
      if not is_transient(e):
        raise
      fail_transient(prog, str(e) or type(e).__name__)
    except KeyboardInterrupt:
      fail(prog, "interrupted; re-run the same command to resume from the last checkpoint")

  app.run(guarded, flags_parser=parse)
