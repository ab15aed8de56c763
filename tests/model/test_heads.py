"""Heads: softmax / multi-label / regression losses, class weights, dropout, metrics."""
import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.model import heads
from estimator_transfer.model import training_setup
from estimator_transfer.training import experiment as runner
from estimator_transfer.errors import ConfigError
from estimator_transfer.config import HeadConfig

from conftest import IMAGE_SIZE, write_tfrecord_split
from transfer_helpers import array_input_fn

LOGITS = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0],
                   [0.0, 0.0, 4.0]], np.float32)
IDS = np.array([0, 2, 1, 1])


def _log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _sigmoid_ce(targets, logits):
  return np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))


def _eval(tensor, feed=None):
  with tf.compat.v1.Session() as sess:
    sess.run(tf.compat.v1.global_variables_initializer())
    return sess.run(tensor, feed)


@pytest.mark.parametrize("smoothing, weights", [(0.0, None), (0.2, None), (0.0, (1.0, 2.0, 0.5)),
                                                (0.1, (0.0, 1.0, 3.0))])
def test_softmax_loss_label_smoothing_and_class_weights(smoothing, weights):
  with tf.Graph().as_default():
    head = heads.build_head(HeadConfig(num_classes=3, label_smoothing=smoothing), weights)
    loss = _eval(head.loss(tf.constant(IDS), tf.constant(LOGITS)))
  # Targets: (1 - s) * onehot + s / K; each example's loss times its class
  # weight, averaged over the batch (Keras class_weight semantics).
  targets = np.eye(3)[IDS] * (1 - smoothing) + smoothing / 3
  per_example = -(targets * _log_softmax(LOGITS)).sum(axis=1)
  w = np.asarray(weights)[IDS] if weights else np.ones(4)
  assert loss == pytest.approx(np.mean(w * per_example), rel=1e-5)


MULTI_HOT = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]], np.float32)


def _labels(form):
  if form == "multi_hot":
    return tf.constant(MULTI_HOT)
  if form == "sparse_ids":  # what tf.io.VarLenFeature gives
    return tf.sparse.SparseTensor([[0, 0], [0, 1], [2, 0], [3, 0], [3, 1], [3, 2]],
                                  tf.constant([0, 2, 1, 0, 1, 2], tf.int64), [4, 3])
  return tf.constant([[0, 2], [-1, -1], [1, -1], [0, 1]])  # -1-padded ids, k=2


@pytest.mark.parametrize("form", ["multi_hot", "sparse_ids", "padded_ids"])
def test_multi_label_sigmoid_loss_accepts_label_forms(form):
  weights = (1.0, 2.0, 0.5)
  expected_targets = MULTI_HOT.copy()
  if form == "padded_ids":
    expected_targets[3] = [1, 1, 0]
  with tf.Graph().as_default():
    labels = _labels(form)
    head = heads.build_head(HeadConfig(num_classes=3, multi_label=True), weights)
    loss, targets = _eval([head.loss(labels, tf.constant(LOGITS)),
                           heads.multi_hot(labels, 3)])
  np.testing.assert_array_equal(targets, expected_targets)
  # Mean over all example-class terms, each weighted by its class.
  expected = np.mean(np.asarray(weights) * _sigmoid_ce(expected_targets, LOGITS))
  assert loss == pytest.approx(expected, rel=1e-5)


def test_regression_loss_and_metrics():
  predictions = np.array([[1.0], [2.0], [0.5]], np.float32)
  targets = np.array([1.5, 2.0, -0.5], np.float32)
  with tf.Graph().as_default():
    head = heads.build_head(HeadConfig(kind="regression"))
    loss = head.loss(tf.constant(targets), tf.constant(predictions))
    metrics = head.eval_metric_ops(tf.constant(targets), tf.constant(predictions))
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.local_variables_initializer())
      sess.run([op for _, op in metrics.values()])
      values = sess.run({k: v for k, (v, _) in metrics.items()})
      loss = sess.run(loss)
  errors = predictions[:, 0] - targets  # -0.5, 0, 1.0
  assert loss == pytest.approx(np.mean(errors ** 2), rel=1e-6)
  assert values["mean_squared_error"] == pytest.approx(1.25 / 3, rel=1e-6)
  assert values["mean_absolute_error"] == pytest.approx(0.5, rel=1e-6)
  assert values["root_mean_squared_error"] == pytest.approx(np.sqrt(1.25 / 3), rel=1e-6)


def test_multi_label_metrics():
  with tf.Graph().as_default():
    head = heads.build_head(HeadConfig(num_classes=3, multi_label=True))
    metrics = head.eval_metric_ops(tf.constant(MULTI_HOT), tf.constant(LOGITS))
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.local_variables_initializer())
      sess.run([op for _, op in metrics.values()])
      values = sess.run({k: v for k, (v, _) in metrics.items()})
  decisions = (LOGITS >= 0).astype(np.float32)  # sigmoid >= 0.5
  assert values["accuracy"] == pytest.approx(np.mean(decisions == MULTI_HOT))
  tp = np.sum(decisions * MULTI_HOT)
  assert values["precision"] == pytest.approx(tp / decisions.sum())
  assert values["recall"] == pytest.approx(tp / MULTI_HOT.sum())
  assert set(values) == {"accuracy", "auc", "precision", "recall"}


def test_dropout_acts_in_training_only_and_hidden_units_shape_the_head():
  features = np.ones((64, 10), np.float32)
  with tf.Graph().as_default():
    head = heads.build_head(HeadConfig(num_classes=10, dropout_rate=0.5), seed=1)
    train_logits = head(tf.constant(features), training=True)
    eval_logits = head(tf.constant(features), training=False)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      # An identity head exposes the dropped features themselves.
      sess.run([head._logits.kernel.assign(np.eye(10)),  # pylint: disable=protected-access
                head._logits.bias.assign(np.zeros(10))])  # pylint: disable=protected-access
      dropped, kept = sess.run([train_logits, eval_logits])
  np.testing.assert_array_equal(kept, features)
  assert set(np.unique(dropped)) == {0.0, 2.0}  # zeroed, or scaled by 1 / (1 - 0.5)
  assert 0.35 < np.mean(dropped == 0) < 0.65
  with tf.Graph().as_default():
    head = heads.build_head(HeadConfig(num_classes=3, hidden_units=(7, 5)))
    head(tf.zeros([2, 10]), training=False)
    assert [tuple(w.shape) for w in head.trainable_weights] == [
        (10, 7), (7,), (7, 5), (5,), (5, 3), (3,)]


def test_balanced_class_weights_by_hand():
  # n = 40, k = 2: [40 / (2 * 10), 40 / (2 * 30)].
  assert heads.balanced_class_weights([10, 30]) == pytest.approx([2.0, 2 / 3])
  # n = 10, k = 3: 10 / (3 * 5); an absent class gets 0.
  assert heads.balanced_class_weights([5, 0, 5]) == pytest.approx([2 / 3, 0.0, 2 / 3])


@pytest.mark.parametrize("text, message", [
    ("1,2", "2 weights for 3 classes"),
    ("1,x,3", "must be 'balanced' or one number per class"),
    ("0,0,0", "at least one positive weight"),
])
def test_bad_class_weights_are_clear_errors(make_config, text, message):
  with pytest.raises(ConfigError, match=message):
    make_config(head__class_weights=text).validate()


def test_balanced_weights_are_counted_from_the_training_data(make_config, tmp_path):
  # 10 examples labelled i % 3: counts [4, 3, 3] -> 10 / (3 * [4, 3, 3]).
  data = write_tfrecord_split(str(tmp_path / "unbalanced"), 10, seed=4)
  cfg = make_config(input__train_data=data, head__class_weights="balanced")
  setup = training_setup.TrainingSetup(cfg)
  assert setup.class_weights() == pytest.approx([10 / 12, 10 / 9, 10 / 9])


def _images_and_targets(count, seed=0):
  rng = np.random.RandomState(seed)
  images, multi_hot = [], []
  for i in range(count):
    present = [(i + j) % 3 == 0 or rng.rand() < 0.3 for j in range(3)]
    image = rng.uniform(0, 60, (IMAGE_SIZE, IMAGE_SIZE, 3))
    for c, on in enumerate(present):
      image[..., c] += 180 * on
    images.append(image / 255.0)
    multi_hot.append(present)
  return np.asarray(images, np.float32), np.asarray(multi_hot, np.float32)


@pytest.mark.parametrize("kind", ["multi_label", "regression"])
def test_heads_train_evaluate_and_predict(make_config, kind):
  images, multi_hot = _images_and_targets(32)
  if kind == "multi_label":
    cfg = make_config(head__multi_label=True, head__class_weights="1,1,2")
    labels = multi_hot
  else:
    cfg = make_config(head__kind="regression", head__num_classes=0, head__class_names=(),
                      head__num_outputs=2)
    labels = images.mean(axis=(1, 2))[:, :2] * 4  # mean red and green, scaled
  cfg = cfg.replace(freeze__spec="none", run__max_steps=15, optimizer__name="adam",
                    schedule__values=(0.02,), run__keep_checkpoint_max=10)
  experiment = runner.Experiment(cfg)
  experiment.estimator.train(array_input_fn(images, labels), max_steps=15)
  eval_fn = array_input_fn(images, labels, repeat=False)
  first = experiment.estimator.evaluate(
      eval_fn, checkpoint_path=f"{cfg.run.model_dir}/model.ckpt-0")
  last = experiment.estimator.evaluate(eval_fn)
  assert last["loss"] < first["loss"]
  predictions = list(experiment.estimator.predict(
      array_input_fn(images[:4], labels[:4], repeat=False)))
  if kind == "multi_label":
    assert {"accuracy", "auc", "precision", "recall"} <= set(last)
    probabilities = np.stack([p["probabilities"] for p in predictions])
    assert probabilities.shape == (4, 3)
    assert np.all((probabilities > 0) & (probabilities < 1))
    assert not np.allclose(probabilities.sum(axis=1), 1.0)  # sigmoids, not a softmax
  else:
    assert {"mean_squared_error", "mean_absolute_error"} <= set(last)
    assert last["mean_squared_error"] < first["mean_squared_error"]
    outputs = np.stack([p["outputs"] for p in predictions])
    assert outputs.shape == (4, 2)
