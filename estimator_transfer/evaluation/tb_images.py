"""The confusion matrix of each evaluation during training, as a TensorBoard image.

`ConfusionMatrixImages` is an after-evaluation callback (called as
f(metrics, checkpoint_path), like the best exporter): it reads the report
that the evaluation just wrote into model_dir (`report.write_report`) and
adds its confusion matrix, drawn by `evaluation.confusion_image` (the same PNG
as the report's), as the image `confusion_matrix_image` at the evaluated global
step to model_dir/eval, next to the eval curves.

The events are written as records of `tf.compat.v1.Event` protos, the event
file format itself: the callback runs wherever the loop calls it (eagerly,
or inside a finalized training graph), where neither `tf.summary` writers nor
`tf.compat.v1.summary.FileWriter` can be used in both.
"""
import json
import logging
import os
import socket
import struct
import time
from typing import Dict, Optional

import tensorflow as tf

from estimator_transfer.evaluation import pictures
from estimator_transfer.evaluation import report as report_lib

log = logging.getLogger("estimator_transfer")

# Not "confusion_matrix": the eval writer already uses that tag for the matrix tensor.
IMAGE_TAG = "confusion_matrix_image"
# Our own event file in model_dir/eval: the eval writer keeps its own.
FILENAME_SUFFIX = ".confusion_matrix"
_FILE_VERSION = "brain.Event:2"


class ConfusionMatrixImages:
  """Writes each evaluation's confusion matrix into model_dir/eval as an image."""

  def __init__(self, model_dir: str):
    self._model_dir = model_dir
    self._writer = None

  def __call__(self, metrics: Dict[str, float], checkpoint_path: str) -> None:
    report = self._report_of(checkpoint_path)
    if report is None or not report.get("confusion_matrix"):
      return
    step = int(report.get("global_step", metrics.get("global_step", 0)))
    # The picture the report's PNG is (being) drawn from, drawn once.
    pictures.then(pictures.confusion_png(report), lambda png: self._add(png, step),
                  f"the confusion-matrix image of step {step}")

  def _add(self, png: bytes, step: int) -> None:
    width, height = struct.unpack(">II", png[16:24])  # the PNG's IHDR chunk
    image = tf.compat.v1.Summary.Image(height=height, width=width, colorspace=4,
                                       encoded_image_string=png)
    self._write(tf.compat.v1.Event(
        wall_time=time.time(), step=step,
        summary=tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(
            tag=IMAGE_TAG, image=image)])))

  def _write(self, event) -> None:
    if self._writer is None:
      eval_dir = os.path.join(self._model_dir, "eval")
      tf.io.gfile.makedirs(eval_dir)
      name = (f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}."
              f"{os.getpid()}{FILENAME_SUFFIX}")
      self._writer = tf.io.TFRecordWriter(os.path.join(eval_dir, name))
      self._writer.write(tf.compat.v1.Event(
          wall_time=time.time(), file_version=_FILE_VERSION).SerializeToString())
    self._writer.write(event.SerializeToString())
    self._writer.flush()

  def _report_of(self, checkpoint_path: str) -> Optional[dict]:
    """The report in model_dir when it is the one of `checkpoint_path`."""
    path = os.path.join(self._model_dir, report_lib.REPORT_FILENAME)
    try:
      with open(path) as f:
        report = json.load(f)
    except (OSError, ValueError) as e:
      log.warning("no confusion-matrix image: cannot read %s (%s)", path, e)
      return None
    if report.get("checkpoint") and os.path.basename(report["checkpoint"]) != \
        os.path.basename(checkpoint_path):
      log.warning("no confusion-matrix image: %s is the report of %s, not of %s", path,
                  report["checkpoint"], checkpoint_path)
      return None
    return report


def build_callback(model_dir: str) -> ConfusionMatrixImages:
  """The callback for `model_dir`."""
  return ConfusionMatrixImages(model_dir)
