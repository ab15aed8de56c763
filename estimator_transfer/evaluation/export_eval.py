"""Evaluating an exported SavedModel, as TF Serving would run it.

The labelled images go through the export's image-bytes `predict` signature,
so its own decoding and resizing are what is measured; the numbers land in the
same report as a checkpoint evaluation (`report.full_report`).
"""
import logging
from typing import Dict, Iterable, Iterator, List, Tuple

from google.protobuf.message import DecodeError
import numpy as np
import tensorflow as tf

from estimator_transfer.data import sources
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import tfrecords
from estimator_transfer.evaluation import report as report_lib
from estimator_transfer.model import metrics
from estimator_transfer.serving import predictor as predictor_lib

log = logging.getLogger("estimator_transfer")


def labelled_images(data: str, image_key: str, label_key: str,
                    label_offset: int = 0) -> Iterator[Tuple[bytes, int]]:
  """Yields (encoded image bytes, class id) from TFRecords or an image folder.

  Args:
    data: an image folder (class per subfolder) or TFRecords (file, glob, dir).
    image_key: the tf.Example feature of the encoded image.
    label_key: the tf.Example feature of the int64 class id.
    label_offset: subtracted from every TFRecord label (--label_offset, as
      training reads them).

  Returns:
    An iterator; records lacking either feature are skipped.
  """
  if labels_lib.is_image_folder(data):
    files, ids, _ = sources.list_image_folder(data)
    for path, label in zip(files, ids):
      try:
        with tf.io.gfile.GFile(path, "rb") as f:
          yield f.read(), label
      except tf.errors.OpError as e:
        log.warning("skipped %s: %s", path, e.message.splitlines()[0])
    return
  paths = sources.list_tfrecord_files(data)
  for path in paths:
    list(tfrecords.read_records(path, 1))  # not a TFRecord file at all: one sentence
  for path in paths:
    for image, label in _file_examples(path, image_key, label_key):
      yield image, label - label_offset


def _file_examples(path: str, image_key: str, label_key: str):
  """(image, label) of one TFRecord file; a truncated or corrupt tail is skipped."""
  count = 0
  try:
    for record in tf.compat.v1.io.tf_record_iterator(path):
      count += 1
      try:
        feature = tf.train.Example.FromString(record).features.feature
      except DecodeError:
        continue
      if image_key not in feature or label_key not in feature:
        continue
      yield feature[image_key].bytes_list.value[0], int(feature[label_key].int64_list.value[0])
  except tf.errors.DataLossError:
    log.warning("skipped the rest of %s after its first %d record(s) (a truncated or "
                "corrupt TFRecord file)", path, count)


def _predict_batch(predictor, images: List[bytes], labels: List[int]):
  """(probabilities per decodable image, their labels, number skipped)."""
  try:
    return [predictor(images)["probabilities"]], list(labels), 0
  except tf.errors.InvalidArgumentError:
    pass
  probabilities, kept, skipped = [], [], 0
  for image, label in zip(images, labels):  # find the bad one(s)
    try:
      probabilities.append(predictor([image])["probabilities"])
      kept.append(label)
    except tf.errors.InvalidArgumentError:
      skipped += 1
  return probabilities, kept, skipped


def _batches(examples: Iterable[Tuple[bytes, int]], batch_size: int):
  """Yields (images, labels) lists of up to `batch_size` examples."""
  images, labels = [], []
  for image, label in examples:
    images.append(image)
    labels.append(label)
    if len(images) == batch_size:
      yield images, labels
      images, labels = [], []
  if images:
    yield images, labels


def predict_labelled(predictor, examples: Iterable[Tuple[bytes, int]], batch_size: int):
  """Runs the predictor over labelled images, skipping the undecodable ones.

  Args:
    predictor: a `serving.predictor.Predictor`.
    examples: (encoded image, class id) pairs (`labelled_images`).
    batch_size: images per request; a failing batch is retried per image.

  Returns:
    (probability arrays [n_i, k] per request, labels of the rows, skipped count).
  """
  probabilities, labels, skipped = [], [], 0
  for images, batch_labels in _batches(examples, batch_size):
    probs, kept, bad = _predict_batch(predictor, images, batch_labels)
    probabilities.extend(probs)
    labels.extend(kept)
    skipped += bad
  return probabilities, labels, skipped


def _scores(probs: np.ndarray, labels: np.ndarray) -> Dict:
  """Confusion matrix, loss, top-k and accuracy of predicted probabilities."""
  num_classes = probs.shape[1]
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
  return result


def evaluate_export(export_path: str, data: str, image_key: str = "image/encoded",
                    label_key: str = "image/class/label", batch_size: int = 32,
                    label_offset: int = 0) -> Dict:
  """Evaluates an exported SavedModel through its image-bytes signature.

  The images go through the export's own decoding and resizing, as TF Serving
  would run them; undecodable images are counted in `skipped_examples`.

  Args:
    export_path: a version directory, or a base path (its newest version).
    data: labelled images (`labelled_images`).
    image_key: the tf.Example feature of the encoded image.
    label_key: the tf.Example feature of the class id.
    batch_size: images per request.
    label_offset: subtracted from every TFRecord label (--label_offset).

  Returns:
    A report like `full_report` (accuracy, top-k, loss, per-class numbers).

  Raises:
    ValueError: no labelled decodable example, or a label the export lacks.
  """
  predictor = predictor_lib.Predictor.from_saved_model(export_path)
  names = predictor.class_names
  try:
    probabilities, labels, skipped = predict_labelled(
        predictor, labelled_images(data, image_key, label_key, label_offset), batch_size)
  finally:
    predictor.close()
  if not labels:
    raise ValueError(f"no labelled, decodable examples in {data}")
  probs = np.concatenate(probabilities)
  labels = np.asarray(labels)
  num_classes = probs.shape[1]
  if labels.min() < 0:
    raise ValueError(f"{data} has label {labels.min()}, below 0 after --label_offset="
                     f"{label_offset}; check --label_offset")
  if labels.max() >= num_classes:
    raise ValueError(f"{data} has label {labels.max()} but the export has "
                     f"{num_classes} classes")
  report = report_lib.full_report(_scores(probs, labels),
                                  names or [str(i) for i in range(num_classes)], data=data)
  report["export"] = export_path
  report["skipped_examples"] = skipped
  return report
