"""Heads: outputs, loss and metrics from backbone features.

(Prediction outputs and export signatures are built by model_fn._predict_spec.)

Three kinds, all `dropout -> [hidden ReLU -> dropout]* -> dense`:

  classification   softmax over `num_classes`; int labels [batch]
  multi-label      (`multi_label`) independent sigmoids; multi-hot labels
                   [batch, num_classes] (or a SparseTensor / -1-padded
                   [batch, k] list of class ids)
  regression       `num_outputs` linear outputs, mean squared error; float
                   labels [batch] or [batch, num_outputs]

Class weights (`class_weights`) scale each example's loss by the weight of
its class (multi-label: each class term by its weight), like Keras'
`class_weight`: loss = mean_i(w_i * l_i). They shape training only; the
evaluation loss is unweighted, so runs with different weights compare.
"""
import random
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from estimator_transfer.model import metrics

from estimator_transfer.errors import ConfigError

from estimator_transfer.config import HeadConfig

# sum(w * l) / number of terms: Keras' class_weight semantics, and the plain
# mean when there are no weights.
_MEAN_OVER_ELEMENTS = tf.compat.v1.losses.Reduction.SUM_OVER_BATCH_SIZE


class Head:
  """Dense layers from features to outputs, built from Keras layers.

  The layers are created on construction in the current graph, so their
  variables can be listed (for the optimizer's var_list) after the call.
  """

  def __init__(self, config: HeadConfig, class_weights: Optional[Sequence[float]] = None,
               seed: Optional[int] = None):
    self._config = config
    self._class_weights = list(class_weights) if class_weights is not None else None

    def kernel_init(i):
      # Keras initializers ignore the graph-level seed (they draw their own),
      # so --seed reaches the head only through explicit initializer seeds.
      return tf.keras.initializers.GlorotUniform(
          seed=None if seed is None else seed * 1000 + i)

    self._layers = []
    for i, units in enumerate(config.hidden_units):
      self._layers.append(tf.keras.layers.Dense(units, activation="relu",
                                                kernel_initializer=kernel_init(i),
                                                name=f"head_hidden_{i}"))
    # An explicit seed even without --seed (a fresh one): with op determinism
    # on (a seeded run earlier in this process) an unseeded dropout raises in
    # a graph without a graph seed.
    self._dropout = tf.keras.layers.Dropout(
        config.dropout_rate, name="head_dropout",
        seed=seed if seed is not None else random.SystemRandom().randrange(1, 2**31))
    self._logits = tf.keras.layers.Dense(self.num_outputs,
                                         kernel_initializer=kernel_init(len(self._layers)),
                                         name="head_logits")

  @property
  def num_outputs(self) -> int:
    if self._config.kind == "regression":
      return self._config.num_outputs
    return self._config.num_classes

  @property
  def is_regression(self) -> bool:
    return self._config.kind == "regression"

  @property
  def multi_label(self) -> bool:
    return self._config.multi_label and not self.is_regression

  def __call__(self, features, training: bool):
    """Returns float32 logits (regression: predictions) [batch, num_outputs]."""
    x = tf.cast(features, tf.float32)
    # Dropout acts on the input of every dense layer: the backbone features,
    # then each hidden layer's activations.
    for layer in self._layers + [self._logits]:
      if self._config.dropout_rate:
        x = self._dropout(x, training=training)
      x = layer(x)
    return x

  @property
  def trainable_weights(self) -> list:
    return [w for layer in self._layers + [self._logits] for w in layer.trainable_weights]

  @property
  def weights(self) -> list:
    return [w for layer in self._layers + [self._logits] for w in layer.weights]

  @property
  def dense_layers(self) -> list:
    """The dense layers in forward order (hidden ones, then the logits)."""
    return self._layers + [self._logits]

  @property
  def dropout_rate(self) -> float:
    return self._config.dropout_rate

  # --------------------------------------------------------------------------

  def loss(self, labels, logits):
    """The mean training loss (without regularization)."""
    c = self._config
    if self.is_regression:
      targets = self._regression_targets(labels)
      return tf.compat.v1.losses.mean_squared_error(
          targets, logits, reduction=_MEAN_OVER_ELEMENTS)
    if self.multi_label:
      targets = multi_hot(labels, c.num_classes)
      weights = 1.0
      if self._class_weights is not None:
        weights = tf.ones_like(targets) * tf.constant([self._class_weights], tf.float32)
      return tf.compat.v1.losses.sigmoid_cross_entropy(
          targets, logits, weights=weights, label_smoothing=c.label_smoothing,
          reduction=_MEAN_OVER_ELEMENTS)
    if labels.dtype.is_floating and labels.shape.rank == 2:
      # Soft targets (mixup, data/augment.py): a distribution over the classes.
      weights = 1.0
      if self._class_weights is not None:
        weights = tf.linalg.matvec(labels, tf.constant(self._class_weights, tf.float32))
      return tf.compat.v1.losses.softmax_cross_entropy(
          labels, logits, weights=weights, label_smoothing=c.label_smoothing,
          reduction=_MEAN_OVER_ELEMENTS)
    ids = self._class_ids(labels)
    weights = 1.0
    if self._class_weights is not None:
      weights = tf.gather(tf.constant(self._class_weights, tf.float32), ids)
    return tf.compat.v1.losses.softmax_cross_entropy(
        tf.one_hot(ids, c.num_classes), logits, weights=weights,
        label_smoothing=c.label_smoothing, reduction=_MEAN_OVER_ELEMENTS)

  def eval_metric_ops(self, labels, logits) -> Dict[str, tuple]:
    """tf.compat.v1.metrics (value, update_op) pairs for evaluation."""
    m = tf.compat.v1.metrics
    if self.is_regression:
      targets = self._regression_targets(labels)
      return {"mean_squared_error": m.mean_squared_error(targets, logits),
              "mean_absolute_error": m.mean_absolute_error(targets, logits),
              "root_mean_squared_error": m.root_mean_squared_error(targets, logits)}
    if self.multi_label:
      targets = multi_hot(labels, self._config.num_classes)
      probabilities = tf.sigmoid(logits)
      decisions = tf.cast(probabilities >= 0.5, tf.float32)
      return {"accuracy": m.accuracy(targets, decisions),  # per class and example
              "auc": m.auc(targets, probabilities),
              "precision": m.precision(targets, decisions),
              "recall": m.recall(targets, decisions)}
    ids = tf.cast(self._class_ids(labels), tf.int64)
    predicted = tf.argmax(logits, axis=-1)
    num_classes = self._config.num_classes
    ops = {"accuracy": m.accuracy(ids, predicted),
               # One pass gives the per-class report: precision, recall, F1.
               "confusion_matrix": metrics.confusion_matrix_metric(ids, predicted,
                                                                  num_classes)}
    k = metrics.top_k_for(num_classes)
    if k > 1:
      in_top_k = tf.math.in_top_k(tf.cast(ids, tf.int32), tf.cast(logits, tf.float32), k)
      ops[f"top_{k}_accuracy"] = m.mean(tf.cast(in_top_k, tf.float32))
    return ops

  # --------------------------------------------------------------------------

  def _class_ids(self, labels):
    num_classes = self._config.num_classes
    ids = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    check = tf.debugging.assert_less(
        ids, num_classes,
        message=f"a label is outside [0, {num_classes}); check the label map "
        "and --num_classes")
    with tf.control_dependencies([check]):
      return tf.identity(ids)

  def _regression_targets(self, labels):
    return tf.reshape(tf.cast(labels, tf.float32), [-1, self._config.num_outputs])


def multi_hot(labels, num_classes: int):
  """float32 [batch, num_classes] multi-hot targets from several label forms.

  Args:
    labels: a SparseTensor of class ids (tf.io.VarLenFeature), a dense
      [batch, num_classes] multi-hot tensor, or a dense [batch, k] int tensor
      of class ids padded with -1 (k != num_classes).
    num_classes: the number of classes.
  """
  if isinstance(labels, tf.sparse.SparseTensor):
    ids = tf.sparse.to_dense(labels, default_value=-1)
    return tf.reduce_max(tf.one_hot(tf.cast(ids, tf.int32), num_classes), axis=1)
  labels = tf.convert_to_tensor(labels)
  if labels.shape.rank == 2 and labels.shape[1] == num_classes:
    return tf.cast(labels, tf.float32)
  ids = tf.reshape(tf.cast(labels, tf.int32), [tf.shape(labels)[0], -1])
  # one_hot of -1 is all zeros, so padding drops out.
  return tf.reduce_max(tf.one_hot(ids, num_classes), axis=1)


def balanced_class_weights(counts: Sequence[int]) -> List[float]:
  """sklearn's `balanced`: n / (k * n_c); 0 for classes without examples.

  E.g. counts [10, 30] -> n = 40, k = 2 -> [40 / 20, 40 / 60] = [2.0, 0.667].
  """
  counts = np.asarray(counts, np.float64)
  total, k = counts.sum(), len(counts)
  if total <= 0:
    raise ConfigError("--class_weights=balanced found no labelled training "
                      "examples; check --train_data.")
  return [float(total / (k * c)) if c > 0 else 0.0 for c in counts]


def build_head(config: HeadConfig, class_weights: Optional[Sequence[float]] = None,
               seed: Optional[int] = None) -> Head:
  """Builds the head for `config` in the current graph.

  Args:
    config: the head config.
    class_weights: resolved per-class weights (see `parse_class_weights` and
      `balanced_class_weights`), or None.
    seed: makes the initial weights (and dropout) reproducible; None: random.

  Returns:
    A Head.
  """
  return Head(config, class_weights, seed)
