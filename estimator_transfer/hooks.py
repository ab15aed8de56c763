"""SessionRunHooks used by the training loop."""
import logging
import time

import tensorflow as tf

log = logging.getLogger("estimator_transfer")


def _fmt_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


class ProgressHook(tf.compat.v1.train.SessionRunHook):
  """Logs step/max_steps, loss, learning rate, examples/s, elapsed and ETA."""

  def __init__(self, loss, max_steps: int, batch_size: int, every_steps: int):
    self._loss = loss
    self._max_steps = max_steps
    self._batch_size = batch_size
    self._every = every_steps
    self._last_step = None
    self._last_time = None
    self._start = None

  def begin(self):
    self._global_step = tf.compat.v1.train.get_global_step()
    graph = tf.compat.v1.get_default_graph()
    try:
      self._lr = graph.get_tensor_by_name("learning_rate:0")
    except KeyError:
      self._lr = tf.constant(float("nan"))

  def before_run(self, run_context):
    return tf.compat.v1.train.SessionRunArgs(
        {"step": self._global_step, "loss": self._loss, "lr": self._lr})

  def after_run(self, run_context, run_values):
    now = time.time()
    step = int(run_values.results["step"]) + 1
    if self._start is None:
      self._start, self._start_step = now, step
      self._last_time, self._last_step = now, step
      return
    if step % self._every and step < self._max_steps:
      return
    dt = now - self._last_time
    rate = (step - self._last_step) * self._batch_size / dt if dt > 0 else float("nan")
    steps_per_s = (step - self._start_step) / max(now - self._start, 1e-9)
    eta = (self._max_steps - step) / steps_per_s if steps_per_s > 0 else 0
    log.info("step %d/%d  loss %.4f  lr %.3g  %.1f examples/s  elapsed %s  eta %s",
             step, self._max_steps, run_values.results["loss"], run_values.results["lr"],
             rate, _fmt_seconds(now - self._start), _fmt_seconds(eta))
    self._last_time, self._last_step = now, step
