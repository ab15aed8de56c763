"""Evaluation reports: hand-computed precision/recall/F1 and the PNG."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.evaluation import report as evaluation
from estimator_transfer.model import metrics


def test_report_matches_hand_computed_numbers():
  # rows true, columns predicted:
  #   a: 3 right, 1 predicted as b        -> recall a = 3/4
  #   b: 2 right                          -> recall b = 2/2
  #   c: 1 as a, 0 right                  -> recall c = 0
  # precision a = 3/(3+1) = 0.75, b = 2/(1+2) = 2/3, c = 0 (never predicted)
  matrix = np.array([[3, 1, 0], [0, 2, 0], [1, 0, 0]])
  report = evaluation.classification_report(matrix, ["a", "b", "c"])
  assert report["num_examples"] == 7
  assert report["accuracy"] == pytest.approx(5 / 7)
  a, b, c = (report["per_class"][k] for k in "abc")
  assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(0.75), 0.75, 4)
  assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == 1.0
  assert b["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
  assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)
  assert report["macro_recall"] == pytest.approx((0.75 + 1 + 0) / 3)


def test_streaming_confusion_matrix_accumulates_batches():
  with tf.Graph().as_default():
    labels = tf.compat.v1.placeholder(tf.int64, [None])
    preds = tf.compat.v1.placeholder(tf.int64, [None])
    value, update = metrics.confusion_matrix_metric(labels, preds, 3)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.local_variables_initializer())
      sess.run(update, {labels: [0, 1, 2], preds: [0, 2, 2]})
      sess.run(update, {labels: [0, 0], preds: [1, 0]})
      np.testing.assert_array_equal(sess.run(value), [[2, 1, 0], [0, 0, 1], [0, 0, 1]])


def test_write_report_json_and_png(tmp_path):
  report = evaluation.classification_report(np.array([[5, 1], [2, 7]]), ["cat", "dog"])
  paths = evaluation.write_report(report, str(tmp_path))
  with open(paths["json"]) as f:
    assert json.load(f)["per_class"]["dog"]["support"] == 9
  png = tf.io.decode_png(open(paths["png"], "rb").read()).numpy()
  assert png.ndim == 3 and png.shape[0] > 40 and png.shape[1] > 40
  # The diagonal cells are drawn in blue, the off-diagonal ones in red.
  assert (png[..., 2] > png[..., 0] + 50).any() and (png[..., 0] > png[..., 2] + 50).any()
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
  assert sorted(os.listdir(tmp_path)) == ["confusion_matrix.png", "eval_results.json"]
