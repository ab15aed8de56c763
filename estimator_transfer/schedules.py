"""Learning-rate schedules: one pure-Python function and its graph op twin.

Convention (the same in both): with boundaries [b0, b1, ...] and values
[v0, v1, v2, ...], the rate is v0 for steps < b0, v1 for b0 <= step < b1, and
so on; the new value applies *at* the boundary step. A linear warmup, when
set, scales the rate by (step + 1) / warmup_steps for step < warmup_steps, so
the very first update already moves the weights.
"""
import bisect
from typing import Sequence

import tensorflow as tf


def piecewise_constant(step: int, boundaries: Sequence[int],
                       values: Sequence[float], warmup_steps: int = 0) -> float:
  """Learning rate at `step`, in pure Python (the reference for the graph op).

  Args:
    step: global step (0-based: the step about to be taken).
    boundaries: strictly increasing steps at which the next value starts.
    values: one more value than boundaries.
    warmup_steps: length of the linear warmup; 0 for none.

  Returns:
    The learning rate as a float.
  """
  rate = float(values[bisect.bisect_right(list(boundaries), step)])
  if warmup_steps and step < warmup_steps:
    rate *= (step + 1) / warmup_steps
  return rate


def piecewise_constant_op(global_step, boundaries: Sequence[int],
                          values: Sequence[float], warmup_steps: int = 0):
  """Graph op twin of `piecewise_constant`; returns a float32 scalar tensor."""
  step = tf.cast(global_step, tf.int64)
  values_t = tf.constant([float(v) for v in values], tf.float32)
  if boundaries:
    bounds = tf.constant(list(boundaries), tf.int64)
    index = tf.reduce_sum(tf.cast(step >= bounds, tf.int32))
  else:
    index = tf.constant(0, tf.int32)
  rate = tf.gather(values_t, index)
  if warmup_steps:
    frac = tf.minimum(tf.cast(step + 1, tf.float32) / float(warmup_steps), 1.0)
    rate = rate * frac
  return tf.identity(rate, name="learning_rate")
