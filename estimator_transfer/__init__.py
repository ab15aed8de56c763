"""estimator-transfer: transfer learning and retraining on tf.compat.v1.estimator."""
__version__ = "0.1.0"
