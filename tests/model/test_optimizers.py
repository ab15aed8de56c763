"""Optimizers and the train op: update sizes checked against hand-written formulas."""
import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.model import backbones
from estimator_transfer import config as config_lib
from estimator_transfer.model import freezing
from estimator_transfer.model import heads
from estimator_transfer.model import optimizers
from estimator_transfer.errors import ConfigError
from estimator_transfer.config import OptimizerConfig

from transfer_helpers import checkpoint_at, train

LR = 0.1
K0 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)  # a "kernel" (rank 2)
B0 = np.array([0.5, -0.5], np.float32)               # a "bias" (rank 1)
GK = np.array([[0.1, -0.2], [0.3, 0.4]], np.float32)  # constant gradients
GB = np.array([1.0, -2.0], np.float32)


def _run(config, steps=1, factors=None, stages=None, stage_feed=None, with_decay_loss=False):
  """Takes `steps` train steps on loss = <GK, k> + <GB, b>; returns (k, b) per step."""
  with tf.Graph().as_default():
    global_step = tf.compat.v1.train.get_or_create_global_step()
    k = tf.Variable(K0, name="kernel")
    b = tf.Variable(B0, name="bias")
    loss = tf.reduce_sum(GK * k) + tf.reduce_sum(GB * b)
    if with_decay_loss:
      loss += optimizers.weight_decay_loss(config, [k, b])
    names = {id(k): "kernel", id(b): "bias"}
    stage_index = tf.compat.v1.placeholder(tf.int32, []) if stage_feed else None
    stage_lists = [[k if n == "kernel" else b for n in s] for s in stages] if stages \
        else [[k, b]]
    train_op = optimizers.build_train_op(
        config, loss, tf.constant(LR), global_step, stage_lists, stage_index=stage_index,
        factor_fn=lambda v: (factors or {}).get(names[id(v)], 1.0))
    out = []
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      for i in range(steps):
        sess.run(train_op, {stage_index: stage_feed[i]} if stage_feed else None)
        out.append(sess.run([k, b]))
      assert sess.run(global_step) == steps
  return out


def test_sgd():
  (k, b), = _run(OptimizerConfig(name="sgd"))
  np.testing.assert_allclose(k, K0 - LR * GK, rtol=1e-6)
  np.testing.assert_allclose(b, B0 - LR * GB, rtol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_two_steps(nesterov):
  m = 0.9
  (k1, _), (k2, _) = _run(OptimizerConfig(name="momentum", momentum=m, nesterov=nesterov),
                          steps=2)
  a1, a2 = GK, m * GK + GK  # accumulators after steps 1 and 2
  if nesterov:  # var -= lr * (grad + momentum * accumulator)
    e1 = K0 - LR * (GK + m * a1)
    e2 = e1 - LR * (GK + m * a2)
  else:         # var -= lr * accumulator
    e1 = K0 - LR * a1
    e2 = e1 - LR * a2
  np.testing.assert_allclose(k1, e1, rtol=1e-6)
  np.testing.assert_allclose(k2, e2, rtol=1e-6)


def _adam_step(w, g, lr=LR, b1=0.9, b2=0.999, eps=1e-8):
  lr_t = lr * np.sqrt(1 - b2) / (1 - b1)
  return w - lr_t * ((1 - b1) * g) / (np.sqrt((1 - b2) * g * g) + eps)


def test_adam_first_step():
  (k, b), = _run(OptimizerConfig(name="adam"))
  np.testing.assert_allclose(k, _adam_step(K0, GK), rtol=1e-5)
  np.testing.assert_allclose(b, _adam_step(B0, GB), rtol=1e-5)


def test_adamw_decays_kernels_only_and_decoupled():
  wd = 0.5
  (k, b), = _run(OptimizerConfig(name="adamw", weight_decay=wd))
  # w -= lr * wd * w, then the Adam step (whose gradient ignores the decay).
  np.testing.assert_allclose(k, _adam_step(K0 - LR * wd * K0, GK), rtol=1e-5)
  np.testing.assert_allclose(b, _adam_step(B0, GB), rtol=1e-5)


def test_rmsprop_first_step():
  rho, m, eps = 0.9, 0.9, 1e-10
  (k, _), = _run(OptimizerConfig(name="rmsprop", momentum=m))
  ms = rho * 1.0 + (1 - rho) * GK * GK  # TF's v1 RMSProp starts ms at 1
  np.testing.assert_allclose(k, K0 - LR * GK / np.sqrt(ms + eps), rtol=1e-5)


def test_weight_decay_loss_with_sgd_shrinks_kernels_not_biases():
  wd = 0.5
  (k, b), = _run(OptimizerConfig(name="sgd", weight_decay=wd), with_decay_loss=True)
  # d/dw (wd/2 * |w|^2) = wd * w: the same shrink as the decoupled form.
  np.testing.assert_allclose(k, K0 - LR * (GK + wd * K0), rtol=1e-6)
  np.testing.assert_allclose(b, B0 - LR * GB, rtol=1e-6)


def test_weight_decay_picks_kernels_of_backbone_and_head(tiny_backbone):
  resolved = backbones.resolve(config_lib.BackboneConfig(handle=tiny_backbone["h5"]))
  with tf.Graph().as_default():
    out = resolved.instantiate(tf.zeros([2, 16, 16, 3]), "none", True)
    head = heads.build_head(config_lib.HeadConfig(num_classes=3, hidden_units=(5,)))
    head(out.features, True)
    variables = out.trainable_variables + head.trainable_weights
    decayed = [freezing.var_name(v) for v in variables if optimizers.is_decayed(v)]
  assert decayed == ["conv1/kernel", "conv2/kernel", "head_hidden_0/kernel",
                     "head_logits/kernel"]


def test_clip_norm_limits_the_global_norm_of_the_step():
  clip = 0.5
  (k, b), = _run(OptimizerConfig(name="sgd", clip_norm=clip))
  norm = np.sqrt(np.sum(GK ** 2) + np.sum(GB ** 2))  # 2.3979..., above the clip
  np.testing.assert_allclose(k, K0 - LR * GK * clip / norm, rtol=1e-5)
  step = np.sqrt(np.sum((k - K0) ** 2) + np.sum((b - B0) ** 2))
  assert step == pytest.approx(LR * clip, rel=1e-5)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_lr_multipliers_scale_the_update(name):
  (k, b), = _run(OptimizerConfig(name=name), factors={"kernel": 0.1})
  if name == "sgd":
    np.testing.assert_allclose(k, K0 - 0.1 * LR * GK, rtol=1e-5)
  else:
    # Adam is invariant to gradient scale: only a scaled learning rate gives
    # the smaller step.
    np.testing.assert_allclose(k, _adam_step(K0, GK, lr=0.1 * LR), rtol=1e-5)
    np.testing.assert_allclose(b, _adam_step(B0, GB), rtol=1e-5)


def test_lr_multiplier_zero_leaves_variable_alone():
  (k, b), = _run(OptimizerConfig(name="momentum"), factors={"kernel": 0.0})
  np.testing.assert_array_equal(k, K0)
  assert not np.array_equal(b, B0)
  with pytest.raises(ConfigError, match="nothing is trainable"):
    _run(OptimizerConfig(name="sgd"), factors={"kernel": 0.0, "bias": 0.0})


def test_stage_switch_stops_adam_updates_of_refrozen_variables():
  # Stage 1 trains both, stage 0 only the bias: after switching back the
  # kernel does not move, although Adam's moments for it are not zero.
  steps = _run(OptimizerConfig(name="adam"), steps=3, stages=[["bias"], ["kernel", "bias"]],
               stage_feed=[1, 0, 0])
  (k1, b1), (k2, b2), (k3, b3) = steps
  assert not np.array_equal(k1, K0)
  np.testing.assert_array_equal(k2, k1)
  np.testing.assert_array_equal(k3, k1)
  assert not np.array_equal(b3, b2)


def test_discriminative_rates_end_to_end_update_sizes(make_config, tmp_path):
  """One SGD step: the backbone moves exactly half as far with backbone/=0.5."""
  base = dict(freeze__spec="none", optimizer__name="sgd", run__max_steps=1,
              schedule__values=(0.05,))
  plain = train(make_config(**base, run__model_dir=str(tmp_path / "plain")))
  half = train(make_config(**base, schedule__lr_multipliers="backbone/=0.5",
                           run__model_dir=str(tmp_path / "half")))
  start = checkpoint_at(str(tmp_path / "plain"), 0)  # same seed: same start
  np.testing.assert_array_equal(start["head_logits/kernel"],
                                checkpoint_at(str(tmp_path / "half"), 0)["head_logits/kernel"])
  for name in ("conv1/kernel", "conv2/kernel", "bn1/gamma", "bn2/beta"):
    np.testing.assert_allclose(half[name] - start[name], 0.5 * (plain[name] - start[name]),
                               rtol=1e-3, atol=1e-8, err_msg=name)
  np.testing.assert_allclose(half["head_logits/kernel"] - start["head_logits/kernel"],
                             plain["head_logits/kernel"] - start["head_logits/kernel"],
                             rtol=1e-3, atol=1e-8)
