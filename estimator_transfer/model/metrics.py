"""Graph metrics of the heads that evaluation reports read back.

The confusion matrix is a streaming metric (one pass over the eval data, a
[k, k] int64 variable), so a full report costs no second pass.
"""
import tensorflow as tf


def top_k_for(num_classes: int) -> int:
  """k of the reported top-k accuracy: 5, or fewer for small label sets."""
  return min(5, num_classes - 1)


def confusion_matrix_metric(labels, predictions, num_classes: int):
  """A streaming confusion matrix: (value, update_op) for eval_metric_ops.

  Rows are true classes, columns predicted classes.
  """
  matrix = tf.compat.v1.get_local_variable(
      "eval_confusion_matrix", shape=[num_classes, num_classes], dtype=tf.int64,
      initializer=tf.compat.v1.zeros_initializer(),
      collections=[tf.compat.v1.GraphKeys.LOCAL_VARIABLES,
                   tf.compat.v1.GraphKeys.METRIC_VARIABLES])
  batch = tf.math.confusion_matrix(tf.reshape(labels, [-1]), tf.reshape(predictions, [-1]),
                                   num_classes=num_classes, dtype=tf.int64)
  update = tf.compat.v1.assign_add(matrix, batch)
  return tf.identity(matrix), update
