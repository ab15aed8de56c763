"""Evaluation reports: per-class precision/recall/F1, confusion matrix, PNG.

The numbers come from a confusion matrix accumulated in the eval graph (one
pass over the data, see `model.metrics.confusion_matrix_metric`), so a report costs no
second pass; the same report can be built for an exported SavedModel.
"""
import json
import os
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from estimator_transfer.model import metrics

REPORT_FILENAME = "eval_results.json"
CONFUSION_PNG = "confusion_matrix.png"


def scalar_metrics(result: Mapping) -> Dict[str, float]:
  """The scalar entries of an Estimator eval result as plain numbers."""
  out = {}
  for key, value in result.items():
    if np.ndim(value) == 0:
      out[key] = int(value) if key == "global_step" else float(value)
  return out


def full_report(result: Mapping, class_names: Sequence[str],
                checkpoint_path: str = "", data: str = "") -> Dict:
  """Scalars of an eval result plus per-class precision/recall/F1.

  Args:
    result: Estimator.evaluate output (may hold "confusion_matrix").
    class_names: the model's class names.
    checkpoint_path: what was evaluated, recorded in the report.
    data: the evaluation data, recorded in the report.
  """
  report = scalar_metrics(result)
  matrix = result.get("confusion_matrix")
  if matrix is not None and np.ndim(matrix) == 2:
    names = list(class_names) or [str(i) for i in range(np.shape(matrix)[0])]
    per_class = classification_report(matrix, names)
    report.update({k: v for k, v in per_class.items() if k != "accuracy"})
  if checkpoint_path:
    report["checkpoint"] = checkpoint_path
  if data:
    report["eval_data"] = data
  return report


def classification_report(matrix: np.ndarray, class_names: Sequence[str]) -> Dict:
  """Per-class and averaged precision/recall/F1 from a confusion matrix.

  Args:
    matrix: int [C, C], rows true class, columns predicted class.
    class_names: C names.

  Returns:
    dict with accuracy, num_examples, macro_* and per_class entries.
  """
  matrix = np.asarray(matrix, dtype=np.int64)
  true_positive = np.diag(matrix).astype(np.float64)
  predicted = matrix.sum(axis=0).astype(np.float64)
  actual = matrix.sum(axis=1).astype(np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    precision = np.where(predicted > 0, true_positive / predicted, 0.0)
    recall = np.where(actual > 0, true_positive / actual, 0.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
  total = int(matrix.sum())
  names = list(class_names) or [str(i) for i in range(matrix.shape[0])]
  per_class = {
      name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
      for name, p, r, f, s in zip(names, precision, recall, f1, actual)
  }
  present = actual > 0
  return {
      "num_examples": total,
      "accuracy": float(true_positive.sum() / total) if total else 0.0,
      "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
      "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
      "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
      "per_class": per_class,
      "confusion_matrix": matrix.tolist(),
      "class_names": names,
  }


def write_report(report: Dict, out_dir: str) -> Dict[str, str]:
  """Writes eval_results.json and confusion_matrix.png atomically into `out_dir`."""
  tf.io.gfile.makedirs(out_dir)
  json_path = os.path.join(out_dir, REPORT_FILENAME)
  with tf.io.gfile.GFile(json_path + ".tmp", "w") as f:
    f.write(json.dumps(report, indent=2, sort_keys=True))
  tf.io.gfile.rename(json_path + ".tmp", json_path, overwrite=True)
  paths = {"json": json_path}
  if report.get("confusion_matrix"):
    png_path = os.path.join(out_dir, CONFUSION_PNG)
    render_confusion_png(np.asarray(report["confusion_matrix"]), report["class_names"],
                         png_path + ".tmp")
    tf.io.gfile.rename(png_path + ".tmp", png_path, overwrite=True)
    paths["png"] = png_path
  return paths


def render_confusion_png(matrix: np.ndarray, class_names: Sequence[str], path: str,
                         cell: Optional[int] = None) -> None:
  """Draws a row-normalised confusion matrix heat map with counts, as PNG."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  n = matrix.shape[0]
  cell = cell or max(18, min(48, 720 // max(n, 1)))
  label_w = min(160, 8 + 7 * max((len(str(c)) for c in class_names), default=1))
  top = 28
  width, height = label_w + n * cell + 10, top + label_w + n * cell + 10
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  draw.text((4, 4), "true (rows) vs predicted (columns)", fill="black")
  rows = matrix.sum(axis=1, keepdims=True).astype(np.float64)
  norm = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=np.float64), where=rows > 0)
  x0, y0 = label_w, top + label_w
  for i in range(n):
    draw.text((4, y0 + i * cell + cell // 2 - 5), str(class_names[i])[:20], fill="black")
    column_label = Image.new("RGB", (label_w, 12), "white")
    ImageDraw.Draw(column_label).text((2, 0), str(class_names[i])[:20], fill="black")
    image.paste(column_label.rotate(90, expand=True), (x0 + i * cell + cell // 2 - 6, top))
    for j in range(n):
      shade = int(255 * (1.0 - norm[i, j]))
      colour = (shade, shade, 255) if i == j else (255, shade, shade)
      box = [x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1]
      draw.rectangle(box, fill=colour, outline=(200, 200, 200))
      if cell >= 18 and matrix[i, j]:
        draw.text((box[0] + 3, box[1] + cell // 2 - 5), str(int(matrix[i, j])),
                  fill="black" if shade > 110 else "white")
  with tf.io.gfile.GFile(path, "wb") as f:
    image.save(f, format="PNG")


def labelled_images(data: str, image_key: str, label_key: str):
  """Yields (encoded image bytes, class id) from TFRecords or an image folder."""
  from estimator_transfer.data import input_fns  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import labels as labels_lib  # pylint: disable=g-import-not-at-top
  if labels_lib.is_image_folder(data):
    files, ids, _ = input_fns.list_image_folder(data)
    for path, label in zip(files, ids):
      with tf.io.gfile.GFile(path, "rb") as f:
        yield f.read(), label
    return
  keys = {image_key: tf.io.FixedLenFeature([], tf.string),
          label_key: tf.io.FixedLenFeature([], tf.int64)}
  for path in input_fns.list_tfrecord_files(data):
    for record in tf.compat.v1.io.tf_record_iterator(path):
      example = tf.train.Example.FromString(record)
      feature = example.features.feature
      if image_key not in feature or label_key not in feature:
        continue
      yield feature[image_key].bytes_list.value[0], int(feature[label_key].int64_list.value[0])


def evaluate_export(export_path: str, data: str, image_key: str = "image/encoded",
                    label_key: str = "image/class/label", batch_size: int = 32) -> Dict:
  """Evaluates an exported SavedModel through its image-bytes signature.

  The images go through the export's own decoding and resizing, as TF Serving
  would run them; undecodable images are counted in `skipped_examples`.

  Returns:
    A report like `full_report` (accuracy, top-k, loss, per-class numbers).
  """
  from estimator_transfer.serving import predictor as predict  # pylint: disable=g-import-not-at-top
  predictor = predict.Predictor.from_saved_model(export_path)
  names = predictor.class_names
  probabilities, labels, skipped = [], [], 0
  batch, batch_labels = [], []

  def flush():
    nonlocal skipped
    if not batch:
      return
    try:
      probabilities.append(predictor(batch)["probabilities"])
      labels.extend(batch_labels)
    except tf.errors.InvalidArgumentError:
      for image, label in zip(batch, batch_labels):  # find the bad one(s)
        try:
          probabilities.append(predictor([image])["probabilities"])
          labels.append(label)
        except tf.errors.InvalidArgumentError:
          skipped += 1
    batch.clear()
    batch_labels.clear()

  try:
    for image, label in labelled_images(data, image_key, label_key):
      batch.append(image)
      batch_labels.append(label)
      if len(batch) == batch_size:
        flush()
    flush()
  finally:
    predictor.close()
  if not labels:
    raise ValueError(f"no labelled, decodable examples in {data}")
  probs = np.concatenate(probabilities)
  labels = np.asarray(labels)
  num_classes = probs.shape[1]
  if labels.max() >= num_classes:
    raise ValueError(f"{data} has label {labels.max()} but the export has "
                     f"{num_classes} classes")
  predicted = probs.argmax(axis=1)
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (labels, predicted), 1)
  result = {"confusion_matrix": matrix,
            "loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels],
                                                  1e-12, 1.0))))}
  k = metrics.top_k_for(num_classes)
  if k > 1:
    top = np.argsort(-probs, axis=1)[:, :k]
    result[f"top_{k}_accuracy"] = float(np.mean([l in row for l, row in zip(labels, top)]))
  result["accuracy"] = float(np.mean(predicted == labels))
  report = full_report(result, names or [str(i) for i in range(num_classes)],
                       data=data)
  report["export"] = export_path
  report["skipped_examples"] = skipped
  return report
