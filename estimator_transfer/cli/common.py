"""Shared entry-point plumbing: quiet logs, flag parsing, user-error exits."""
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


def fail(prog: str, message: str) -> None:
  """Prints one sentence to stderr and exits 1."""
  message = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
  sys.stderr.write(f"{prog}: error: {message}\n")
  sys.stderr.flush()
  sys.exit(1)


def run_main(prog: str, define_flags, main) -> None:
  """Defines flags, parses argv (bad flags -> one line, exit 1), runs main."""
  quiet_tensorflow()
  define_flags()

  def parse(argv):
    try:
      rest = flags.FLAGS(argv)
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
      if "outside [0," in e.message:
        fail(prog, e.message.split("Condition")[0].strip().rstrip("."))
      raise
    except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError) as e:
      fail(prog, f"{e.message.splitlines()[0]}; check the path and its permissions")
    except KeyboardInterrupt:
      fail(prog, "interrupted; re-run the same command to resume from the last checkpoint")

  app.run(guarded, flags_parser=parse)
