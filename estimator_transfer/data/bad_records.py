"""Counting the corrupt records the input pipeline skips, and reporting them.

The input_fns skip an unreadable record (or image file) instead of killing a
long job (`--on_bad_record=skip`), and add one to a counter variable for each
one. That variable lives in the input_fn's graph (a local variable: never
checkpointed, reset by each new session), so the model_fn wrapper here can
show it as the `bad_records` eval metric (and so in eval_results.json), as a
training summary, and in the training log.

Errors the data causes (a label outside the label map, a corrupt record with
`--on_bad_record=fail`) are raised from inside the pipeline as assertion
failures whose message starts with `ERROR_PREFIX`; `user_error_message`
extracts that one sentence for the CLI.
"""
import logging
import re
from typing import Optional

import tensorflow as tf

log = logging.getLogger("estimator_transfer")

METRIC_KEY = "bad_records"
COLLECTION = "estimator_transfer_bad_records"
ERROR_PREFIX = "bad data: "
_ASSERTION = re.compile(r"assertion failed: \[(" + re.escape(ERROR_PREFIX) +
                        r".*?)\](?:\s|$)", re.S)


def get_counter() -> Optional[tf.Variable]:
  """The current graph's bad-record counter, or None when no input_fn made one."""
  if tf.executing_eagerly():
    return None
  found = tf.compat.v1.get_collection(COLLECTION)
  return found[0] if found else None


def get_or_create_counter() -> tf.Variable:
  """The bad-record counter of the current graph (created once per graph).

  In eager mode every call makes a new variable.
  """
  if tf.executing_eagerly():
    return tf.Variable(0, dtype=tf.int64, trainable=False, name=METRIC_KEY)
  existing = get_counter()
  if existing is not None:
    return existing
  return tf.compat.v1.Variable(
      0, dtype=tf.int64, trainable=False, use_resource=True, name=METRIC_KEY,
      collections=[tf.compat.v1.GraphKeys.LOCAL_VARIABLES, COLLECTION])


def user_error_message(message: str) -> Optional[str]:
  """The one-sentence data error inside a TF error message, or None."""
  match = _ASSERTION.search(message or "")
  if not match:
    return None
  # Assert prints string data escaped; give the user the plain sentence.
  return match.group(1).strip().replace("\\'", "'").replace('\\"', '"')


class BadRecordLogHook(tf.compat.v1.train.SessionRunHook):
  """Logs the number of skipped corrupt records whenever it grows."""

  def __init__(self, counter):
    self._counter = counter
    self._last = 0

  def before_run(self, run_context):
    return tf.compat.v1.train.SessionRunArgs(self._counter)

  def after_run(self, run_context, run_values):
    count = int(run_values.results)
    if count > self._last:
      log.warning("skipped %d corrupt record(s) so far (--on_bad_record=skip; "
                  "they are listed above by file)", count)
      self._last = count


def wrap_model_fn(model_fn):
  """Adds the bad-record count to a model_fn's eval metrics, summaries and log.

  Args:
    model_fn: an Estimator model_fn (features, labels, mode[, params][, config]).

  Returns:
    A model_fn that returns the same EstimatorSpec plus, when the graph's
    input_fn counts bad records: eval metric `bad_records` (records skipped
    during the evaluation pass), training summary `bad_records` and a
    training hook that logs the count when it grows.
  """
  # Heavy: loads the Estimator package, which the input pipeline never needs.
  from tensorflow_estimator.python.estimator import util as estimator_util  # pylint: disable=g-import-not-at-top
  inner_args = estimator_util.fn_args(model_fn)

  def wrapped_model_fn(features, labels, mode, params=None, config=None):
    kwargs = {}
    if "params" in inner_args:
      kwargs["params"] = params
    if "config" in inner_args:
      kwargs["config"] = config
    spec = model_fn(features, labels, mode, **kwargs)
    counter = get_counter()
    if counter is None or mode == tf.estimator.ModeKeys.PREDICT:
      return spec
    fields = spec._asdict()
    if mode == tf.estimator.ModeKeys.EVAL:
      metrics = dict(spec.eval_metric_ops or {})
      # Read once after the whole evaluation pass; nothing to update per batch.
      metrics[METRIC_KEY] = (counter.read_value(), tf.no_op())
      fields["eval_metric_ops"] = metrics
    else:
      _add_training_summary(counter)
      fields["training_hooks"] = list(spec.training_hooks) + [BadRecordLogHook(counter)]
    return tf.estimator.EstimatorSpec(**fields)

  return wrapped_model_fn


def _add_training_summary(counter) -> None:
  """The training scalar, tagged exactly `bad_records` like the eval metric.

  tf.compat.v1.summary.scalar would tag it with its (uniquified) op name,
  `bad_records_1` next to the counter variable `bad_records`, so TensorBoard
  would not draw train and eval on one chart.
  """
  summary = tf.raw_ops.ScalarSummary(tags=tf.constant(METRIC_KEY),
                                     values=counter.read_value(),
                                     name=f"{METRIC_KEY}_summary")
  tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.SUMMARIES, summary)
