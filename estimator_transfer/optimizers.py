"""Optimizer names -> tf.compat.v1 optimizers (their slots live in checkpoints)."""
import tensorflow as tf

from estimator_transfer.config import ConfigError, OptimizerConfig


def build_optimizer(config: OptimizerConfig, learning_rate):
  """Returns a `tf.compat.v1.train.Optimizer` for `config`.

  Raises:
    ConfigError: unknown optimizer name.
  """
  v1 = tf.compat.v1.train
  if config.name == "sgd":
    return v1.GradientDescentOptimizer(learning_rate)
  if config.name == "momentum":
    return v1.MomentumOptimizer(learning_rate, config.momentum)
  if config.name == "nesterov":
    return v1.MomentumOptimizer(learning_rate, config.momentum, use_nesterov=True)
  if config.name == "adam":
    return v1.AdamOptimizer(learning_rate)
  if config.name == "rmsprop":
    return v1.RMSPropOptimizer(learning_rate, momentum=config.momentum)
  raise ConfigError(f"--optimizer={config.name} is not supported; choose sgd, "
                    "momentum, nesterov, adam or rmsprop.")
