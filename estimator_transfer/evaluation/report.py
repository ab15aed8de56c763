"""Evaluation reports: per-class precision/recall/F1, confusion matrix, PNG.

The PNG (`confusion_matrix.png`: counts and row shares, class names, accuracy
and step in the title) is drawn by `evaluation.confusion_image` with Pillow.

The numbers come from a confusion matrix accumulated in the eval graph (one
pass over the data, see `model.metrics.confusion_matrix_metric`), so a report costs no
second pass; the same report is built for an exported SavedModel by
`evaluation.export_eval`.
"""
import json
import os
from typing import Dict, Mapping, Sequence

import numpy as np

from estimator_transfer import files
from estimator_transfer.evaluation import pictures

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

  Returns:
    The report dict (`write_report` writes it).
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
  """Writes eval_results.json and confusion_matrix.png atomically into `out_dir`.

  Args:
    report: a `full_report` / `classification_report` dict; the PNG is drawn
      when it has a confusion matrix; inside `pictures.in_background()` it is written by the
      picture thread, after this returns.
    out_dir: the directory (created when missing).

  Returns:
    {"json": path} plus {"png": path} when a PNG was written.
  """
  json_path = os.path.join(out_dir, REPORT_FILENAME)
  files.write_atomically(json_path, json.dumps(report, indent=2, sort_keys=True))
  paths = {"json": json_path}
  if report.get("confusion_matrix"):
    png_path = os.path.join(out_dir, CONFUSION_PNG)
    # Drawn in the background while training (`pictures.in_background`).
    pictures.then(pictures.confusion_png(report),
                  lambda png: files.write_atomically(png_path, png), png_path)
    paths["png"] = png_path
  return paths
