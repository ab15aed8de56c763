"""Evaluation reports: hand-computed precision/recall/F1, the PNG, the TensorBoard image."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.evaluation import pictures
from estimator_transfer.evaluation import report as evaluation
from estimator_transfer.evaluation import tb_images
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
  report["global_step"] = 300
  paths = evaluation.write_report(report, str(tmp_path))
  with open(paths["json"]) as f:
    assert json.load(f)["per_class"]["dog"]["support"] == 9
  png = tf.io.decode_png(open(paths["png"], "rb").read()).numpy()
  assert png.ndim == 3 and png.shape[0] > 300 and png.shape[1] > 300
  # Row shares coloured in blues: the cells are blue-dominant, darker on the diagonal.
  assert (png[..., 2].astype(int) > png[..., 0].astype(int) + 80).any()
  assert pictures.report_title(report) == "confusion matrix: accuracy 0.800 at step 300"
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
  assert sorted(os.listdir(tmp_path)) == ["confusion_matrix.png", "eval_results.json"]


def test_confusion_matrix_image_per_evaluation_in_tensorboard(tmp_path):
  # What an evaluation during training leaves: the report of checkpoint 20 in
  # model_dir; the callback adds its picture to model_dir/eval at step 20.
  model_dir = str(tmp_path)
  report = evaluation.full_report(
      {"accuracy": 0.8, "global_step": 20, "confusion_matrix": np.array([[5, 1], [2, 7]])},
      ["cat", "dog"], checkpoint_path=os.path.join(model_dir, "model.ckpt-20"))
  evaluation.write_report(report, model_dir)
  callback = tb_images.build_callback(model_dir)
  with tf.Graph().as_default() as graph:  # as inside a training session's hooks
    graph.finalize()
    callback({"accuracy": 0.8, "global_step": 20}, os.path.join(model_dir, "model.ckpt-20"))
  # A report of another checkpoint is not drawn for this one.
  callback({"accuracy": 0.9, "global_step": 30}, os.path.join(model_dir, "model.ckpt-30"))
  events = [e for path in tf.io.gfile.glob(os.path.join(model_dir, "eval", "events.*"))
            for e in tf.compat.v1.train.summary_iterator(path)]
  images = [(e.step, v) for e in events for v in e.summary.value
            if v.tag == tb_images.IMAGE_TAG]
  assert [step for step, _ in images] == [20]
  image = images[0][1].image
  assert image.width > 300 and image.height > 300
  assert tf.io.decode_png(image.encoded_image_string).shape[:2] == (image.height, image.width)
