"""Optimizers and the train op: tf.compat.v1 optimizers (slots in checkpoints).

`build_train_op` puts together what surrounds the optimizer:

* explicit var_lists (hub.KerasLayer variables are not in the graph's
  TRAINABLE_VARIABLES collection, so nothing relies on it);
* gradual unfreezing: one apply step per stage, each over that stage's
  variables, picked by `tf.switch_case` on the stage index read from the
  global step. Gradients are computed once for the union of all stages (a
  frozen variable's gradient is computed but never applied), and a variable
  that is frozen in a stage is not touched at all in it: no momentum or Adam
  update moves it, because its apply op is not in that stage's branch (Adam's
  bias-correction counters are shared, so a variable unfrozen late starts
  with the corrections of the global step, not of its own first step);
* discriminative learning rates: one optimizer per distinct multiplier, with
  learning_rate * factor (exact for every optimizer, Adam included, unlike
  scaling gradients); factor 0 leaves the variables out. Slots of a group
  with factor != 1 are named `<var>/<Optimizer>_x<i>`, so changing the
  multipliers of a run changes its checkpoint layout;
* `clip_norm` on the global norm of the gradients applied in the step;
* weight decay on trainable kernels only (rank >= 2: conv and dense kernels,
  not biases nor BatchNorm gamma/beta/statistics): an L2 term wd/2 * |w|^2 in
  the loss (`weight_decay_loss`; SGD then does w -= lr * wd * w), or
  decoupled w -= lr * factor * wd * w before the Adam step for `adamw`;
* an exponential moving average of the trained variables (`build_ema`),
  updated after each step.
"""
from typing import Callable, Optional, Sequence

import tensorflow as tf
from tensorflow.python.training import slot_creator  # pylint: disable=g-direct-tensorflow-import

from estimator_transfer.config import OptimizerConfig
from estimator_transfer.errors import ConfigError

_DEFAULT_NAMES = {"sgd": "GradientDescent", "momentum": "Momentum",
                  "nesterov": "Momentum", "adam": "Adam", "adamw": "Adam",
                  "rmsprop": "RMSProp"}


def build_optimizer(config: OptimizerConfig, learning_rate, name: Optional[str] = None):
  """Returns a `tf.compat.v1.train.Optimizer` for `config`.

  Args:
    config: the optimizer config (`adamw` gives Adam: the decoupled decay is
      applied by `build_train_op`).
    learning_rate: float or scalar tensor.
    name: the optimizer's name (slot variables are `<var>/<name>`); None for
      the default.

  Raises:
    ConfigError: unknown optimizer name.
  """
  v1 = tf.compat.v1.train
  if config.name not in _DEFAULT_NAMES:
    raise ConfigError(f"--optimizer={config.name} is not supported; choose sgd, "
                      "momentum, nesterov, adam, adamw or rmsprop.")
  name = name or _DEFAULT_NAMES[config.name]
  if config.name == "sgd":
    return v1.GradientDescentOptimizer(learning_rate, name=name)
  if config.name in ("momentum", "nesterov"):
    return v1.MomentumOptimizer(learning_rate, config.momentum, name=name,
                                use_nesterov=config.nesterov or config.name == "nesterov")
  if config.name in ("adam", "adamw"):
    return v1.AdamOptimizer(learning_rate, name=name)
  return v1.RMSPropOptimizer(learning_rate, momentum=config.momentum, name=name)


def is_decayed(variable) -> bool:
  """Weight decay applies to kernels (rank >= 2), never to biases or BatchNorm."""
  return variable.shape.rank is not None and variable.shape.rank >= 2


def weight_decay_loss(config: OptimizerConfig, variables: Sequence) -> Optional[tf.Tensor]:
  """wd/2 * sum |w|^2 over the decayed variables; None when not applicable.

  Not used for `adamw`, whose decay is decoupled from the gradient.
  """
  if not config.weight_decay or config.name == "adamw":
    return None
  kernels = [v for v in variables if is_decayed(v)]
  if not kernels:
    return None
  return tf.multiply(config.weight_decay,
                     tf.add_n([tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in kernels]),
                     name="weight_decay_loss")


def build_train_op(config: OptimizerConfig, loss, learning_rate, global_step,
                   stage_var_lists: Sequence[list], stage_index=None,
                   factor_fn: Callable[[object], float] = lambda v: 1.0,
                   update_ops: Sequence = (), loss_scale: bool = False):
  """Builds the op that takes one training step and increments global_step.

  Args:
    config: the optimizer config.
    loss: scalar loss tensor (regularization included).
    learning_rate: scalar tensor (the schedule).
    global_step: the global step variable.
    stage_var_lists: per stage, the variables to train (head included).
    stage_index: int32 scalar tensor picking the stage; None for one stage.
    factor_fn: variable -> learning-rate multiplier.
    update_ops: ops to run before the step (BatchNorm moving statistics).
    loss_scale: dynamic loss scaling (float16 mixed precision, see
      `DynamicLossScale`): gradients of loss * scale, unscaled; a step whose
      gradients are not finite is skipped (the global step still advances).

  Returns:
    The train op.

  Raises:
    ConfigError: a stage has nothing to train.
  """
  union = unique([v for vs in stage_var_lists for v in vs])
  factors = {id(v): float(factor_fn(v)) for v in union}
  _check_stages_train(stage_var_lists, factors)
  scaler = DynamicLossScale() if loss_scale else None
  if scaler is None:
    grads = tf.gradients(loss, union)
  else:
    grads = scaler.unscale(tf.gradients(scaler.scale(loss), union))
  step = _StageSteps(config, learning_rate, union, grads, factors)

  def apply_step():
    if stage_index is None or len(stage_var_lists) == 1:
      return step(stage_var_lists[0])
    return step.switch(stage_var_lists, stage_index)

  with tf.control_dependencies(list(update_ops)):
    applied = apply_step() if scaler is None else scaler.apply_if_finite(grads, apply_step)
  with tf.control_dependencies([applied]):
    return tf.compat.v1.assign_add(global_step, 1, name="train_op").op


def _check_stages_train(stage_var_lists: Sequence[list], factors: dict) -> None:
  """Raises ConfigError when a stage has no variable with a multiplier above 0."""
  for i, variables in enumerate(stage_var_lists):
    if not [v for v in variables if factors[id(v)] > 0]:
      raise ConfigError(
          f"nothing is trainable{' in unfreeze stage ' + str(i) if len(stage_var_lists) > 1 else ''}: "
          "every variable is frozen or has learning-rate multiplier 0; loosen "
          "--freeze / --unfreeze_schedule or --lr_multipliers.")


class _StageSteps:
  """Builds the apply step of one unfreeze stage from gradients computed once.

  One optimizer per distinct learning-rate factor, shared by all stages, so
  every variable has one set of slots; factor 1 keeps the default name.
  """

  def __init__(self, config: OptimizerConfig, learning_rate, union: list, grads: list,
               factors: dict):
    self._config = config
    self._learning_rate = learning_rate
    self._grad_of = {id(v): g for v, g in zip(union, grads)}
    self._factors = factors
    self._optimizers = {}
    for v in union:
      f = factors[id(v)]
      if f > 0 and f not in self._optimizers:
        suffix = "" if f == 1.0 else f"_x{len(self._optimizers)}"
        self._optimizers[f] = build_optimizer(
            config, learning_rate * f if f != 1.0 else learning_rate,
            name=_DEFAULT_NAMES[config.name] + suffix)

  def __call__(self, variables):
    """The op applying clipped gradients (and adamw decay) to `variables`."""
    config, factors = self._config, self._factors
    pairs = [(self._grad_of[id(v)], v) for v in unique(variables)
             if self._grad_of[id(v)] is not None and factors[id(v)] > 0]
    if config.clip_norm and pairs:
      clipped, _ = tf.clip_by_global_norm([g for g, _ in pairs], config.clip_norm)
      pairs = [(g, v) for g, (_, v) in zip(clipped, pairs)]
    decays = []
    if config.name == "adamw" and config.weight_decay:
      for _, v in pairs:
        if is_decayed(v):
          rate = self._learning_rate * factors[id(v)] * config.weight_decay
          decays.append(v.assign_sub(rate * v.read_value()).op)
    applies = []
    with tf.control_dependencies(decays):
      for f, optimizer in self._optimizers.items():
        group = [(g, v) for g, v in pairs if factors[id(v)] == f]
        if group:
          applies.append(optimizer.apply_gradients(group))
    return tf.group(*applies, *decays)

  def switch(self, stage_var_lists: Sequence[list], stage_index):
    """One branch per stage, picked by `stage_index` (a frozen variable is untouched)."""
    branches = []
    for i, variables in enumerate(stage_var_lists):
      def branch(variables=variables, i=i):
        with tf.control_dependencies([self(variables)]):
          return tf.constant(i)
      branches.append(branch)
    return tf.switch_case(stage_index, branches, name="unfreeze_stage_step")


class DynamicLossScale:
  """Dynamic loss scaling for float16 training (as Keras' LossScaleOptimizer).

  The loss is multiplied by `scale` before the gradients are taken, so small
  float16 gradients do not flush to zero, and the gradients are divided by it
  again. A step with a non-finite gradient is skipped and halves the scale;
  `growth_steps` finite steps in a row double it. The two counters are LOCAL
  variables: they are not in checkpoints (a float32 run can resume in mixed
  precision and back), and a resumed run re-finds its scale within a few steps.
  """

  def __init__(self, initial_scale: float = 2.0 ** 15, growth_steps: int = 2000):
    local = [tf.compat.v1.GraphKeys.LOCAL_VARIABLES]
    self._growth_steps = growth_steps
    self.loss_scale = tf.compat.v1.Variable(initial_scale, trainable=False,
                                            collections=local, name="loss_scale")
    self.good_steps = tf.compat.v1.Variable(0, trainable=False, collections=local,
                                            name="loss_scale_good_steps")

  def scale(self, loss):
    return loss * tf.cast(self.loss_scale, loss.dtype)

  def unscale(self, grads):
    inverse = 1.0 / self.loss_scale
    out = []
    for g in grads:
      if isinstance(g, tf.IndexedSlices):
        g = tf.IndexedSlices(g.values * tf.cast(inverse, g.values.dtype), g.indices,
                             g.dense_shape)
      elif g is not None:
        g = g * tf.cast(inverse, g.dtype)
      out.append(g)
    return out

  def apply_if_finite(self, grads, apply_fn):
    """Runs `apply_fn()` only when every gradient is finite; updates the scale."""
    values = [g.values if isinstance(g, tf.IndexedSlices) else g
              for g in grads if g is not None]
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in values]) \
        if values else tf.constant(True)

    def applied():
      with tf.control_dependencies([apply_fn()]):
        good = self.good_steps + 1
        grow = good >= self._growth_steps
        return tf.group(
            self.loss_scale.assign(tf.where(grow, self.loss_scale * 2.0, self.loss_scale)),
            self.good_steps.assign(tf.where(grow, 0, good)))

    def skipped():
      return tf.group(self.loss_scale.assign(tf.maximum(self.loss_scale / 2.0, 1.0)),
                      self.good_steps.assign(0))

    return tf.cond(finite, applied, skipped, name="apply_if_finite")


def build_ema(config: OptimizerConfig) -> Optional[tf.compat.v1.train.ExponentialMovingAverage]:
  """The moving average of the trained weights, or None when off."""
  if not config.ema_decay:
    return None
  return tf.compat.v1.train.ExponentialMovingAverage(config.ema_decay)


def apply_ema(ema, var_list):
  """`ema.apply(var_list)` that also works for restored Hub module variables.

  `ExponentialMovingAverage.apply` seeds each average with
  `cond(initialized, read_value, initial_value)`, which fails for variables
  restored from a SavedModel in graph mode (no usable `initial_value`). The
  averages are created here as zero slots under the same names instead; the
  model_fn's init_fn then copies the starting weights into them.
  """
  averages = ema._averages  # pylint: disable=protected-access
  with tf.init_scope():
    for var in var_list:
      if var.ref() not in averages:
        with tf.device(var.device):
          averages[var.ref()] = slot_creator.create_zeros_slot(
              var, ema.name, colocate_with_primary=True)
        tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.MOVING_AVERAGE_VARIABLES, var)
  return ema.apply(var_list)


def ema_restore_saver(ema, variables: Sequence) -> tf.compat.v1.train.Saver:
  """A Saver that loads each of `variables` from its moving average.

  Every other global variable loads from itself, so evaluation and export
  graphs see the averaged weights under their usual names.
  """
  mapping = ema.variables_to_restore(list(variables))
  for saveable in tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.SAVEABLE_OBJECTS):
    mapping[saveable.name] = saveable
  return tf.compat.v1.train.Saver(mapping, sharded=True)


def unique(items) -> list:
  """`items` in first-seen order, each once, compared by identity.

  Graph tensors and variables are not hashable by value; the same variable
  reaches a var_list from several places (a stage, the union, the head).
  """
  seen, out = set(), []
  for item in items:
    if id(item) not in seen:
      seen.add(id(item))
      out.append(item)
  return out
