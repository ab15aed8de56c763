"""The model_fn factory: backbone + head + freeze + schedule -> EstimatorSpec.

`build_model_fn` returns the model_fn; each mode's spec is built by a helper:
`_predict_spec` (outputs and export signatures), the head's eval metrics, and
`_train_spec` / `_train_op` (weight decay, learning-rate schedule, explicit
var_lists per unfreeze stage, BatchNorm updates, EMA).
"""
import contextlib
import json
import logging
import os
from typing import Optional

import tensorflow as tf

from estimator_transfer import files
from estimator_transfer import specs
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.data import bad_records
from estimator_transfer.errors import ConfigError
from estimator_transfer.model import backbone_types
from estimator_transfer.model import backbones
from estimator_transfer.model import freezing
from estimator_transfer.model import heads
from estimator_transfer.model import optimizers
from estimator_transfer.model import schedules
from estimator_transfer.model import split
from estimator_transfer.model import training_setup

ModeKeys = tf.estimator.ModeKeys
IMAGE_KEY = "image"
NUMERIC_KEY = "features"  # CSV / array inputs (data.input_fns.NUMERIC_FEATURE)
CACHED_FEATURES_KEY = "backbone_features"  # feature-cache mode (feature_cache/)
VARIABLES_FILENAME = "trainable_variables.json"
log = logging.getLogger("estimator_transfer")


def build_model_fn(config: ExperimentConfig,
                   resolved: Optional[backbone_types.ResolvedBackbone] = None):
  """Returns a model_fn for `tf.compat.v1.estimator.Estimator`.

  Args:
    config: a validated experiment config; `head.num_classes` must be set for
      classification heads.
    resolved: the backbone already resolved (saves loading it twice); resolved
      from `config.backbone` when None.

  Returns:
    model_fn(features, labels, mode, params) -> EstimatorSpec. `features` is a
    dict with "image": float32 [batch, size, size, 3] RGB in [0, 1] (or that
    tensor itself); labels are int class ids (multi-label: multi-hot
    [batch, num_classes] or a SparseTensor of ids; regression: floats).

  Raises:
    ConfigError: the config cannot be built.
  """
  config.validate()
  h = config.head
  if h.kind != "regression" and h.num_classes < (1 if h.multi_label else 2):
    raise ConfigError("the number of classes is unknown; set --num_classes or "
                      "give data with a label map (labels.txt or class folders).")
  resolved = resolved or backbones.resolve(config.backbone)
  setup = training_setup.TrainingSetup(config)

  def model_fn(features, labels, mode, params=None):
    del params  # everything comes from `config`
    # --xla compiles the training step only: exported graphs must not ask
    # TF Serving for XLA, and evaluation runs too few steps to repay it.
    with _xla_scope(config.run.xla and mode == ModeKeys.TRAIN):
      return _model_spec(config, resolved, setup, features, labels, mode)

  # Adds the input pipeline's skipped-record count (eval metric, log, summary).
  return bad_records.wrap_model_fn(model_fn)


def _model_spec(config, resolved, setup, features, labels, mode):
  """The EstimatorSpec of `mode`: backbone -> head -> predict, eval or train."""
  training = mode == ModeKeys.TRAIN
  backbone = _backbone(config, resolved, setup, features, labels, training)
  head = heads.build_head(config.head, setup.class_weights() if training else None,
                          seed=config.run.seed)
  logits = head(backbone.features, training)
  if mode == ModeKeys.PREDICT:
    return _predict_spec(config, logits, backbone.features,
                         _eval_scaffold(config, backbone, head))
  loss = _loss(head, labels, logits, backbone.losses)
  if mode == ModeKeys.EVAL:
    return tf.estimator.EstimatorSpec(
        mode, loss=loss, eval_metric_ops=head.eval_metric_ops(labels, logits),
        scaffold=_eval_scaffold(config, backbone, head))
  return _train_spec(config, setup, loss, backbone, head)


def _backbone(config, resolved, setup, features, labels, training):
  """The backbone applied to the input (or the cached features of its frozen run)."""
  plan = _freeze_plan(config, setup, training)
  if isinstance(features, dict) and CACHED_FEATURES_KEY in features:
    # Feature-cache mode: the frozen backbone (or its frozen lower part)
    # already ran (feature_cache/); only the head and the backbone's layers
    # above the cut are in the graph, trained and saved.
    cut = split.cut_point(config, resolved)
    if cut is None:
      return backbone_types.no_backbone_output(features[CACHED_FEATURES_KEY])
    return split.instantiate_top(resolved, cut, features[CACHED_FEATURES_KEY], plan, training,
                                 policy=config.run.mixed_precision, seed=config.run.seed)
  images = _model_input(features)
  if training and images.shape.rank == 4:
    _input_summaries(config, images, labels)
  # --seed fixes a random backbone init (--backbone_weights=none) in every
  # mode's graph alike (backbone_types.seed_keras_initializers).
  return resolved.instantiate(images, plan, training, policy=config.run.mixed_precision,
                              seed=config.run.seed)


def _freeze_plan(config, setup, training):
  """The unfreeze stages: with step starts for training, in order otherwise."""
  if training:
    return setup.freeze_plan()
  # Only the union of trained variables matters outside training; any
  # increasing starts do (epoch starts need the data counted).
  plan = specs.parse_schedule(config.freeze.unfreeze_schedule, config.freeze.spec)
  return [specs.Stage(i, stage.spec) for i, stage in enumerate(plan)]


def _model_input(features):
  """The backbone's input: images, or numeric features (CSV / arrays)."""
  if not isinstance(features, dict):
    return features
  if IMAGE_KEY in features:
    return features[IMAGE_KEY]
  if NUMERIC_KEY in features:
    return features[NUMERIC_KEY]
  raise ConfigError(f"the input has neither '{IMAGE_KEY}' nor '{NUMERIC_KEY}' features "
                    f"(got {sorted(features)}); check the input_fn.")


def _input_summaries(config, images, labels, count: int = 3):
  """A few training images with their labels, for TensorBoard's image tab."""
  tf.compat.v1.summary.image("input_images", images, max_outputs=count)
  if labels is None or isinstance(labels, tf.sparse.SparseTensor):
    return
  first = labels[:count]
  if config.head.class_names and first.shape.rank == 1 and first.dtype.is_integer:
    names = tf.constant(list(config.head.class_names))
    text = tf.gather(names, tf.clip_by_value(tf.cast(first, tf.int32), 0,
                                             len(config.head.class_names) - 1))
  else:
    text = tf.strings.as_string(tf.cast(first, tf.float32)) if first.shape.rank == 1 else \
        tf.strings.reduce_join(tf.strings.as_string(tf.cast(first, tf.float32)), axis=-1,
                               separator=",")
  tf.compat.v1.summary.text("input_labels", text)


def _loss(head, labels, logits, extra_losses):
  """The head's mean loss plus the backbone's regularization losses."""
  loss = head.loss(labels, logits)
  if extra_losses:
    loss += tf.add_n([tf.cast(l, tf.float32) for l in extra_losses])
  return loss


def _eval_scaffold(config, backbone, head):
  """With EMA, evaluation restores the moving averages of the trained weights."""
  ema = optimizers.build_ema(config.optimizer)
  if ema is None:
    return None
  variables = optimizers.unique(backbone.trainable_variables + head.trainable_weights)
  return tf.compat.v1.train.Scaffold(saver=optimizers.ema_restore_saver(ema, variables))


def _train_spec(config, setup, loss, backbone, head):
  """TRAIN spec: weight decay, the train op, pretrained-weight init."""
  decay = optimizers.weight_decay_loss(
      config.optimizer, optimizers.unique(backbone.trainable_variables +
                                          head.trainable_weights))
  if decay is not None:
    loss = tf.add(loss, decay, name="total_loss")
  train_op, init_fn = _train_op(config, loss, backbone, head, setup.lr_boundaries())
  scaffold = tf.compat.v1.train.Scaffold(init_fn=init_fn) if init_fn else None
  # The checkpoint NaN/Inf check looks only at what this op can write.
  tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.TRAIN_OP, train_op)
  # The training loop adds the progress log and the NaN/Inf guard around it.
  return tf.estimator.EstimatorSpec(ModeKeys.TRAIN, loss=loss, train_op=train_op,
                                    scaffold=scaffold)


def _train_op(config, loss, backbone, head, boundaries):
  """The train op and the Scaffold init_fn (pretrained weights, EMA start)."""
  global_step = tf.compat.v1.train.get_or_create_global_step()
  s = config.schedule
  learning_rate = schedules.piecewise_constant_op(
      global_step, boundaries, s.values, s.warmup_steps)
  tf.compat.v1.summary.scalar("learning_rate", learning_rate)
  head_vars = list(head.trainable_weights)
  _check_stages_expose_variables(config, backbone)
  # Explicit var_lists: hub.KerasLayer variables are not in the graph's
  # TRAINABLE_VARIABLES collection, so nothing may rely on it.
  stage_lists = [optimizers.unique(st.trainable_variables + head_vars)
                 for st in backbone.stages]
  var_list = optimizers.unique(backbone.trainable_variables + head_vars)
  names = {id(v): "backbone/" + freezing.var_name(v) for v in backbone.trainable_variables}
  names.update({id(v): "head/" + freezing.var_name(v) for v in head_vars})
  multipliers = specs.parse_multipliers(s.lr_multipliers)
  factors = {id(v): specs.multiplier_for(names[id(v)], multipliers) for v in var_list}
  _record_variables(config, backbone, var_list, stage_lists, names, factors)
  # Keras layers and hub.KerasLayer keep their BatchNorm updates off the
  # UPDATE_OPS collection: the backbone collected them from the layers.
  update_ops = optimizers.unique(backbone.update_ops + tf.compat.v1.get_collection(
      tf.compat.v1.GraphKeys.UPDATE_OPS))
  train_op = optimizers.build_train_op(
      config.optimizer, loss, learning_rate, global_step, stage_lists,
      stage_index=backbone.stage_index, factor_fn=lambda v: factors[id(v)],
      update_ops=update_ops,
      loss_scale=config.run.mixed_precision == "mixed_float16")
  return _with_ema(config, train_op, var_list, backbone.init_fn)


def _check_stages_expose_variables(config, backbone) -> None:
  """Raises ConfigError when a stage should train the backbone but it has no variables."""
  for stage in backbone.stages:
    if not stage.trainable_variables and not all(stage.frozen):
      raise ConfigError(
          f"--freeze={stage.spec} should train part of the backbone but "
          f"{config.backbone.handle} exposes no trainable variables there; use "
          "--freeze=all, or a module/model with trainable weights.")


def _with_ema(config, train_op, var_list, pretrained_init_fn):
  """The train op followed by the EMA update (when on), and the Scaffold init_fn."""
  init_ops = []
  ema = optimizers.build_ema(config.optimizer)
  if ema is not None:
    with tf.control_dependencies([train_op]):
      train_op = optimizers.apply_ema(ema, var_list)
    # The averages start at the weights training starts from (pretrained
    # values are assigned after the variable initializers ran).
    init_ops.append(tf.group(*[ema.average(v).assign(v.read_value()) for v in var_list],
                             name="ema_start"))
  return train_op, _chain_init(pretrained_init_fn, init_ops)


def _xla_scope(enabled: bool):
  """Marks the ops built inside for XLA compilation (auto-clustered; works on CPU).

  A jit_scope, not the session's global_jit_level: that one ignores CPUs
  unless TF_XLA_FLAGS is set before TensorFlow starts, and would compile
  everything the session runs. Ops XLA cannot compile (strings, asserts,
  summaries) stay outside the clusters.
  """
  if not enabled:
    return contextlib.nullcontext()
  return tf.xla.experimental.jit_scope(compile_ops=True, separate_compiled_gradients=False)


def _chain_init(first, ops):
  """Scaffold init_fn: `first` (pretrained weights), then `ops`."""
  if first is None and not ops:
    return None

  def init_fn(scaffold, session):
    if first is not None:
      first(scaffold, session)
    for op in ops:
      session.run(op)

  return init_fn


def _predict_spec(config, logits, features, scaffold=None):
  """PREDICT spec; its export_outputs are what export.py turns into signatures.

  Classification: `predict` outputs classes (int64), class_names (from the
  label map; the id as text without one), probabilities and, with
  --export_features, the backbone features; `classify` gives every label with
  its score in class-id order, as TF Serving's ClassificationResponse wants.
  Regression (head kind `regression`): `predict` outputs `outputs`
  [batch, num_outputs]; `regress` (a single output only) gives `outputs`.
  `scaffold` is evaluation's (with EMA on it restores the moving averages,
  as the exports do).
  """
  features = tf.cast(features, tf.float32)
  export_outputs = {}
  if config.head.kind == "regression":
    predictions = {"outputs": logits}
    if config.head.num_outputs == 1:
      export_outputs["regress"] = tf.estimator.export.RegressionOutput(logits[:, 0])
  else:
    probabilities = (tf.sigmoid(logits) if config.head.multi_label
                     else tf.nn.softmax(logits))
    classes = tf.argmax(logits, axis=-1)
    names = tf.constant(list(config.head.class_names) or
                        [str(i) for i in range(config.head.num_classes)])
    predictions = {"classes": classes, "class_names": tf.gather(names, classes),
                   "probabilities": probabilities}
    labels = tf.tile(names[tf.newaxis], [tf.shape(probabilities)[0], 1])
    export_outputs["classify"] = tf.estimator.export.ClassificationOutput(
        scores=probabilities, classes=labels)
  served = dict(predictions)
  if config.export.export_features:
    served["features"] = features
  predict = tf.estimator.export.PredictOutput(served)
  export_outputs.update(serving_default=predict, predict=predict)
  return tf.estimator.EstimatorSpec(
      ModeKeys.PREDICT, predictions=dict(predictions, features=features),
      export_outputs=export_outputs, scaffold=scaffold)


def _record_variables(config, backbone, var_list, stage_lists, names, factors):
  """Logs once and saves which backbone variables train and which stay frozen.

  Raises:
    ConfigError: nothing is trainable.
  """
  record = _variables_record(config, backbone, var_list, stage_lists, names, factors)
  if not var_list:
    raise ConfigError("nothing is trainable; loosen --freeze.")
  text = json.dumps(record, indent=1)
  model_dir = config.run.model_dir
  path = os.path.join(model_dir, VARIABLES_FILENAME) if model_dir else ""
  if path and files.read_text(path) == text:
    return  # logged and saved when this run (or its first segment) started
  _log_stages(backbone, stage_lists, path or VARIABLES_FILENAME)
  if path:
    files.write_atomically(path, text)


def _variables_record(config, backbone, var_list, stage_lists, names, factors) -> dict:
  """The trainable_variables.json content: per stage, what trains and what not."""
  trainable_ids = {id(v) for v in var_list}
  first_stage_ids = {id(x) for x in stage_lists[0]}
  return {
      "freeze": config.freeze.spec,
      "unfreeze_schedule": config.freeze.unfreeze_schedule,
      "trainable": [v.name for v in stage_lists[0]],
      "frozen": [v.name for g in backbone.groups for v in g.variables
                 if id(v) not in first_stage_ids],
      "frozen_layers": [g.name for g, f in zip(backbone.groups, backbone.frozen) if f],
      "trainable_layers": [g.name for g, f in zip(backbone.groups, backbone.frozen)
                           if not f],
      "stages": [{"start_step": st.start, "spec": st.spec,
                  "frozen_layers": [g.name for g, f in zip(backbone.groups, st.frozen) if f],
                  "trainable": [v.name for v in variables]}
                 for st, variables in zip(backbone.stages, stage_lists)],
      "trained_in_some_stage": [v.name for v in var_list],
      "never_trained": [v.name for g in backbone.groups for v in g.variables
                        if id(v) not in trainable_ids],
      "lr_multipliers": {names[id(v)]: factors[id(v)] for v in var_list
                         if factors[id(v)] != 1.0},
  }


def _log_stages(backbone, stage_lists, where: str) -> None:
  """One log line per unfreeze stage: frozen layers, trained parameters."""
  backbone_vars = [v for g in backbone.groups for v in g.variables]
  for st, variables in zip(backbone.stages, stage_lists):
    training_ids = {id(v) for v in variables}
    log.info("freeze=%s from step %d: %d of %d backbone layers frozen (%s); "
             "parameters: %s trained, %s not trained (frozen or BatchNorm statistics; see %s).",
             st.spec, st.start,
             sum(st.frozen), len(backbone.groups),
             _abbreviate([g.name for g, f in zip(backbone.groups, st.frozen) if f]),
             f"{_count_parameters(variables):,}",
             f"{_count_parameters([v for v in backbone_vars if id(v) not in training_ids]):,}",
             where)


def _count_parameters(variables) -> int:
  return int(sum(v.shape.num_elements() or 0 for v in variables))


def _abbreviate(names, limit=6) -> str:
  if not names:
    return "none"
  if len(names) <= limit:
    return ", ".join(names)
  return f"{', '.join(names[:3])}, ..., {', '.join(names[-2:])}"
