"""The model_fn factory: backbone + head + freeze + schedule -> EstimatorSpec."""
import json
import os
from typing import Optional

import tensorflow as tf

from estimator_transfer import backbones
from estimator_transfer import heads
from estimator_transfer import hooks
from estimator_transfer import optimizers
from estimator_transfer import schedules
from estimator_transfer.config import ConfigError, ExperimentConfig

ModeKeys = tf.estimator.ModeKeys
IMAGE_KEY = "image"
VARIABLES_FILENAME = "trainable_variables.json"


def build_model_fn(config: ExperimentConfig,
                   resolved: Optional[backbones.ResolvedBackbone] = None):
  """Returns a model_fn for `tf.compat.v1.estimator.Estimator`.

  Args:
    config: a validated experiment config; `head.num_classes` must be set.
    resolved: the backbone already resolved (saves loading it twice); resolved
      from `config.backbone` when None.

  Returns:
    model_fn(features, labels, mode, params) -> EstimatorSpec. `features` is a
    dict with "image": float32 [batch, size, size, 3] RGB in [0, 1] (or that
    tensor itself); labels are int class ids.

  Raises:
    ConfigError: the config cannot be built.
  """
  config.validate()
  if config.head.num_classes < 2:
    raise ConfigError("the number of classes is unknown; set --num_classes or "
                      "give data with a label map (labels.txt or class folders).")
  resolved = resolved or backbones.resolve(config.backbone)

  def model_fn(features, labels, mode, params=None):
    del params  # everything comes from `config`
    images = features[IMAGE_KEY] if isinstance(features, dict) else features
    training = mode == ModeKeys.TRAIN
    backbone = resolved.instantiate(images, config.freeze.spec, training)
    head = heads.build_head(config.head)
    logits = head(backbone.features, training)
    if mode == ModeKeys.PREDICT:
      return _predict_spec(config, logits, backbone.features)
    loss = _loss(config, labels, logits, backbone.losses)
    if mode == ModeKeys.EVAL:
      return tf.estimator.EstimatorSpec(
          mode, loss=loss, eval_metric_ops=_eval_metric_ops(labels, logits))
    train_op = _train_op(config, loss, backbone, head)
    scaffold = tf.compat.v1.train.Scaffold(init_fn=backbone.init_fn) \
        if backbone.init_fn else None
    progress = hooks.ProgressHook(loss, config.run.max_steps, config.input.batch_size,
                                  config.run.log_every_steps)
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op,
                                      scaffold=scaffold, training_hooks=[progress])

  return model_fn


def _loss(config, labels, logits, extra_losses):
  labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
  num_classes = config.head.num_classes
  check = tf.debugging.assert_less(
      labels, num_classes,
      message=f"a label is outside [0, {num_classes}); check the label map "
      "and --num_classes")
  with tf.control_dependencies([check]):
    onehot = tf.one_hot(labels, num_classes)
  loss = tf.compat.v1.losses.softmax_cross_entropy(
      onehot, logits, label_smoothing=config.head.label_smoothing)
  if extra_losses:
    loss += tf.add_n([tf.cast(l, tf.float32) for l in extra_losses])
  return loss


def _eval_metric_ops(labels, logits):
  labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
  predictions = tf.argmax(logits, axis=-1)
  return {"accuracy": tf.compat.v1.metrics.accuracy(labels, predictions)}


def _train_op(config, loss, backbone, head):
  global_step = tf.compat.v1.train.get_or_create_global_step()
  s = config.schedule
  learning_rate = schedules.piecewise_constant_op(
      global_step, s.boundaries, s.values, s.warmup_steps)
  tf.compat.v1.summary.scalar("learning_rate", learning_rate)
  optimizer = optimizers.build_optimizer(config.optimizer, learning_rate)
  var_list = _unique(backbone.trainable_variables + head.trainable_weights)
  _record_variables(config, backbone, var_list)
  grads_and_vars = optimizer.compute_gradients(loss, var_list=var_list)
  grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
  if config.optimizer.clip_norm:
    grads, variables = zip(*grads_and_vars)
    grads, _ = tf.clip_by_global_norm(grads, config.optimizer.clip_norm)
    grads_and_vars = list(zip(grads, variables))
  update_ops = _unique(backbone.update_ops + tf.compat.v1.get_collection(
      tf.compat.v1.GraphKeys.UPDATE_OPS))
  with tf.control_dependencies(update_ops):
    return optimizer.apply_gradients(grads_and_vars, global_step=global_step)


def _predict_spec(config, logits, features):
  probabilities = tf.nn.softmax(logits)
  classes = tf.argmax(logits, axis=-1)
  predictions = {"classes": classes, "probabilities": probabilities}
  if config.head.class_names:
    names = tf.constant(list(config.head.class_names))
    predictions["class_names"] = tf.gather(names, classes)
  export_predictions = dict(predictions)
  output = tf.estimator.export.PredictOutput(export_predictions)
  predictions["features"] = features
  return tf.estimator.EstimatorSpec(
      ModeKeys.PREDICT, predictions=predictions,
      export_outputs={"serving_default": output, "predict": output})


def _unique(items):
  seen, out = set(), []
  for item in items:
    if id(item) not in seen:
      seen.add(id(item))
      out.append(item)
  return out


def _record_variables(config, backbone, var_list):
  """Logs and saves which backbone variables train and which stay frozen."""
  trainable_ids = {id(v) for v in var_list}
  frozen_layers = [g.name for g, f in zip(backbone.groups, backbone.frozen) if f]
  record = {
      "freeze": config.freeze.spec,
      "trainable": [v.name for v in var_list],
      "frozen": [v.name for g in backbone.groups for v in g.variables
                 if id(v) not in trainable_ids],
      "frozen_layers": frozen_layers,
      "trainable_layers": [g.name for g, f in zip(backbone.groups, backbone.frozen)
                           if not f],
  }
  if not var_list:
    raise ConfigError("nothing is trainable; loosen --freeze.")
  tf.compat.v1.logging.info(
      "freeze=%s: %d of %d backbone layers frozen; %d variables train.",
      config.freeze.spec, len(frozen_layers), len(backbone.groups), len(var_list))
  model_dir = config.run.model_dir
  if model_dir:
    tf.io.gfile.makedirs(model_dir)
    path = os.path.join(model_dir, VARIABLES_FILENAME)
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
      f.write(json.dumps(record, indent=1))
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
