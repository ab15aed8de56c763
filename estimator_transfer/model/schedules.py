"""Learning-rate schedule graph ops (the pure-Python reference is `specs`).

`piecewise_constant_op` is the graph twin of `specs.piecewise_constant`: the
same boundaries/values/warmup convention, tested against it step by step.
"""
from typing import Sequence

import tensorflow as tf


# The op's name; the summary keeps the plain tag "learning_rate" (an op of that
# name would push the summary tag to "learning_rate_1").
LEARNING_RATE_OP = "current_learning_rate"


def piecewise_constant_op(global_step, boundaries: Sequence[int],
                          values: Sequence[float], warmup_steps: int = 0):
  """Graph op twin of `piecewise_constant`; returns a float32 scalar tensor."""
  step = tf.cast(global_step, tf.int64)
  values_t = tf.constant([float(v) for v in values], tf.float32)
  index = stage_index_op(step, boundaries)
  rate = tf.gather(values_t, index)
  if warmup_steps:
    frac = tf.minimum(tf.cast(step + 1, tf.float32) / float(warmup_steps), 1.0)
    rate = rate * frac
  return tf.identity(rate, name=LEARNING_RATE_OP)


def stage_index_op(global_step, boundaries: Sequence[int]):
  """int32 index of the interval of `boundaries` that `global_step` is in."""
  if not boundaries:
    return tf.constant(0, tf.int32)
  step = tf.cast(global_step, tf.int64)
  bounds = tf.constant([int(b) for b in boundaries], tf.int64)
  return tf.reduce_sum(tf.cast(step >= bounds, tf.int32))


