"""Classification heads: logits from backbone features."""
import tensorflow as tf

from estimator_transfer.config import HeadConfig


class ClassificationHead:
  """Dropout -> optional hidden ReLU layers -> logits, built from Keras layers.

  The layers are created on construction in the current graph, so their
  variables can be listed (for the optimizer's var_list) before the call.
  """

  def __init__(self, config: HeadConfig):
    self._config = config
    self._layers = []
    for i, units in enumerate(config.hidden_units):
      self._layers.append(tf.keras.layers.Dense(units, activation="relu",
                                                name=f"head_hidden_{i}"))
    self._dropout = tf.keras.layers.Dropout(config.dropout_rate, name="head_dropout")
    self._logits = tf.keras.layers.Dense(config.num_classes, name="head_logits")

  def __call__(self, features, training: bool):
    """Returns float32 logits [batch, num_classes]."""
    x = tf.cast(features, tf.float32)
    for layer in self._layers:
      x = layer(x)
      if self._config.dropout_rate:
        x = self._dropout(x, training=training)
    if self._config.dropout_rate and not self._layers:
      x = self._dropout(x, training=training)
    return self._logits(x)

  @property
  def trainable_weights(self) -> list:
    return [w for layer in self._layers + [self._logits] for w in layer.trainable_weights]

  @property
  def weights(self) -> list:
    return [w for layer in self._layers + [self._logits] for w in layer.weights]


def build_head(config: HeadConfig) -> ClassificationHead:
  """Builds the head for `config` in the current graph."""
  return ClassificationHead(config)
