"""The model_fn factory: backbone + head + freeze + schedule -> EstimatorSpec."""
import contextlib
import json
import logging
import os
from typing import Optional

import tensorflow as tf

from estimator_transfer.model import backbones
from estimator_transfer.model import heads
from estimator_transfer.training import hooks
from estimator_transfer.model import optimizers
from estimator_transfer.model import schedules
from estimator_transfer.errors import ConfigError
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.data import bad_records
from estimator_transfer import specs

ModeKeys = tf.estimator.ModeKeys
IMAGE_KEY = "image"
NUMERIC_KEY = "features"  # CSV / array inputs (data.input_fns.NUMERIC_FEATURE)
CACHED_FEATURES_KEY = "backbone_features"  # feature-cache mode (feature_cache.py)
VARIABLES_FILENAME = "trainable_variables.json"
log = logging.getLogger("estimator_transfer")


def build_model_fn(config: ExperimentConfig,
                   resolved: Optional[backbones.ResolvedBackbone] = None):
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
  training_setup = _TrainingSetup(config)

  def model_fn(features, labels, mode, params=None):
    # --xla compiles the training step only: exported graphs must not ask
    # TF Serving for XLA, and evaluation runs too few steps to repay it.
    with _xla_scope(config.run.xla and mode == ModeKeys.TRAIN):
      return _model_spec(features, labels, mode)

  def _model_spec(features, labels, mode):
    training = mode == ModeKeys.TRAIN
    plan = training_setup.freeze_plan() if training else \
        specs.parse_schedule(config.freeze.unfreeze_schedule, config.freeze.spec)
    if not training:
      # Only the union of trained variables matters outside training; any
      # increasing starts do (epoch starts need the data counted).
      plan = [specs.Stage(i, stage.spec) for i, stage in enumerate(plan)]
    if isinstance(features, dict) and CACHED_FEATURES_KEY in features:
      backbone = _cached_backbone(features[CACHED_FEATURES_KEY])
    else:
      images = _model_input(features)
      if training and images.shape.rank == 4:
        _input_summaries(config, images, labels)
      backbone = resolved.instantiate(images, plan, training,
                                      policy=config.run.mixed_precision)
    head = heads.build_head(config.head, training_setup.class_weights() if training
                            else None, seed=config.run.seed)
    logits = head(backbone.features, training)
    if mode == ModeKeys.PREDICT:
      return _predict_spec(config, logits, backbone.features,
                           _eval_scaffold(config, backbone, head))
    loss = _loss(head, labels, logits, backbone.losses)
    if mode == ModeKeys.EVAL:
      return tf.estimator.EstimatorSpec(
          mode, loss=loss, eval_metric_ops=head.eval_metric_ops(labels, logits),
          scaffold=_eval_scaffold(config, backbone, head))
    decay = optimizers.weight_decay_loss(
        config.optimizer, _unique(backbone.trainable_variables + head.trainable_weights))
    if decay is not None:
      loss = tf.add(loss, decay, name="total_loss")
    train_op, init_fn = _train_op(config, loss, backbone, head,
                                  training_setup.lr_boundaries())
    scaffold = tf.compat.v1.train.Scaffold(init_fn=init_fn) if init_fn else None
    progress = hooks.ProgressHook(loss, config.run.max_steps, config.input.batch_size,
                                  config.run.log_every_steps, config.run.model_dir)
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op,
                                      scaffold=scaffold, training_hooks=[progress])

  # Adds the input pipeline's skipped-record count (eval metric, log, summary).
  return bad_records.wrap_model_fn(model_fn)


class _TrainingSetup:
  """Derived training values, computed once, when the train graph is built.

  Epoch boundaries need the epoch size and `balanced` class weights the class
  counts: the training data is counted (once) only when one of them needs
  it, and only for training, so et-evaluate and et-export never read it.
  """

  def __init__(self, config: ExperimentConfig):
    self._config = config
    self._counts = None

  def _data_counts(self):
    if self._counts is None:
      self._counts = count_training_data(self._config)
    return self._counts

  def steps_per_epoch(self) -> Optional[float]:
    c = self._config
    size = c.schedule.train_size
    if not size and (specs.needs_epoch_size(c.schedule.boundaries) or any(
        isinstance(s.start, str) for s in specs.parse_schedule(
            c.freeze.unfreeze_schedule, c.freeze.spec))):
      size = self._data_counts()[0]
    return specs.steps_per_epoch(size, c.input.batch_size) if size else None

  def lr_boundaries(self):
    return specs.resolve_boundaries(self._config.schedule.boundaries,
                                        self.steps_per_epoch())

  def freeze_plan(self):
    c = self._config.freeze
    stages = specs.parse_schedule(c.unfreeze_schedule, c.spec)
    return specs.resolve_plan_steps(stages, self.steps_per_epoch())

  def class_weights(self):
    h = self._config.head
    weights = specs.parse_class_weights(h.class_weights, h.num_classes)
    if weights == specs.BALANCED:
      weights = heads.balanced_class_weights(self._data_counts()[1])
      log.info("class weights (balanced): %s", ", ".join(f"{w:.4g}" for w in weights))
    return weights


def count_training_data(config: ExperimentConfig):
  """Counts `input.train_data`: (examples, per-class label counts).

  TFRecords are read record by record in Python (no graph needed), parsing
  only the label; multi-label lists count once per listed class.

  Raises:
    ConfigError: no training data to count.
  """
  from estimator_transfer.data import input_fns  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import labels as labels_lib  # pylint: disable=g-import-not-at-top
  data = config.input.train_data
  if not data:
    raise ConfigError("the epoch size or class counts are needed but there is no "
                      "--train_data to count; set --train_size or explicit "
                      "--class_weights.")
  num_classes = max(config.head.num_classes, 1)
  counts = [0] * num_classes
  if labels_lib.is_image_folder(data):
    _, ids, _ = input_fns.list_image_folder(data)
    for i in ids:
      if 0 <= i < num_classes:
        counts[i] += 1
    total = len(ids)
  else:
    total = 0
    key = config.input.label_key
    for path in input_fns.list_tfrecord_files(data):
      for record in tf.compat.v1.io.tf_record_iterator(path):
        total += 1
        feature = tf.train.Example.FromString(record).features.feature.get(key)
        for i in (feature.int64_list.value if feature is not None else ()):
          if 0 <= i < num_classes:
            counts[i] += 1
  log.info("counted %d training examples in %s (per class: %s); --train_size "
           "skips the count.", total, data, counts)
  return total, counts


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


def _cached_backbone(features) -> backbones.BackboneOutput:
  """Feature-cache mode: the frozen backbone already ran (feature_cache.py).

  `features` are its float [batch, D] outputs; nothing of it is in the graph,
  so nothing of it trains, updates or is checkpointed: only the head.
  """
  frozen = backbones.StageVariables(0, "all", [], [])
  return backbones.BackboneOutput(tf.cast(features, tf.float32), groups=[],
                                  stages=[frozen], trainable_variables=[],
                                  update_ops=[], losses=[])


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
  variables = _unique(backbone.trainable_variables + head.trainable_weights)
  return tf.compat.v1.train.Scaffold(saver=optimizers.ema_restore_saver(ema, variables))


def _train_op(config, loss, backbone, head, boundaries):
  """The train op and the Scaffold init_fn (pretrained weights, EMA start)."""
  global_step = tf.compat.v1.train.get_or_create_global_step()
  s = config.schedule
  learning_rate = schedules.piecewise_constant_op(
      global_step, boundaries, s.values, s.warmup_steps)
  tf.compat.v1.summary.scalar("learning_rate", learning_rate)
  head_vars = list(head.trainable_weights)
  for stage in backbone.stages:
    if not stage.trainable_variables and not all(stage.frozen):
      raise ConfigError(
          f"--freeze={stage.spec} should train part of the backbone but "
          f"{config.backbone.handle} exposes no trainable variables there; use "
          "--freeze=all, or a module/model with trainable weights.")
  stage_lists = [_unique(st.trainable_variables + head_vars) for st in backbone.stages]
  var_list = _unique(backbone.trainable_variables + head_vars)
  names = {id(v): "backbone/" + backbones._var_name(v) for v in backbone.trainable_variables}  # pylint: disable=protected-access
  names.update({id(v): "head/" + backbones._var_name(v) for v in head_vars})  # pylint: disable=protected-access
  multipliers = specs.parse_multipliers(s.lr_multipliers)
  factors = {id(v): specs.multiplier_for(names[id(v)], multipliers) for v in var_list}
  _record_variables(config, backbone, var_list, stage_lists, names, factors)
  update_ops = _unique(backbone.update_ops + tf.compat.v1.get_collection(
      tf.compat.v1.GraphKeys.UPDATE_OPS))
  train_op = optimizers.build_train_op(
      config.optimizer, loss, learning_rate, global_step, stage_lists,
      stage_index=backbone.stage_index, factor_fn=lambda v: factors[id(v)],
      update_ops=update_ops,
      loss_scale=config.run.mixed_precision == "mixed_float16")
  init_ops = []
  ema = optimizers.build_ema(config.optimizer)
  if ema is not None:
    with tf.control_dependencies([train_op]):
      train_op = optimizers.apply_ema(ema, var_list)
    # The averages start at the weights training starts from (pretrained
    # values are assigned after the variable initializers ran).
    init_ops.append(tf.group(*[ema.average(v).assign(v.read_value()) for v in var_list],
                             name="ema_start"))
  init_fn = _chain_init(backbone.init_fn, init_ops)
  return train_op, init_fn


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


def _unique(items):
  seen, out = set(), []
  for item in items:
    if id(item) not in seen:
      seen.add(id(item))
      out.append(item)
  return out


def _record_variables(config, backbone, var_list, stage_lists, names, factors):
  """Logs once and saves which backbone variables train and which stay frozen."""
  trainable_ids = {id(v) for v in var_list}
  frozen_layers = [g.name for g, f in zip(backbone.groups, backbone.frozen) if f]
  record = {
      "freeze": config.freeze.spec,
      "unfreeze_schedule": config.freeze.unfreeze_schedule,
      "trainable": [v.name for v in stage_lists[0]],
      "frozen": [v.name for g in backbone.groups for v in g.variables
                 if id(v) not in {id(x) for x in stage_lists[0]}],
      "frozen_layers": frozen_layers,
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
  if not var_list:
    raise ConfigError("nothing is trainable; loosen --freeze.")
  text = json.dumps(record, indent=1)
  model_dir = config.run.model_dir
  path = os.path.join(model_dir, VARIABLES_FILENAME) if model_dir else ""
  if path and tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      if f.read() == text:
        return  # logged and saved when this run (or its first segment) started
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
             path or VARIABLES_FILENAME)
  if path:
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
      f.write(text)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def _count_parameters(variables) -> int:
  return int(sum(v.shape.num_elements() or 0 for v in variables))


def _abbreviate(names, limit=6) -> str:
  if not names:
    return "none"
  if len(names) <= limit:
    return ", ".join(names)
  return f"{', '.join(names[:3])}, ..., {', '.join(names[-2:])}"
