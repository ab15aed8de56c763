"""Batch inference over image folders or TFRecords, into CSV or JSON Lines.

The model is either an export (a SavedModel, run through its image-bytes
`predict` signature exactly as TF Serving runs it) or a model_dir checkpoint
(the same serving graph, built in memory), so a batch job and the served model
give the same answers. A corrupt or unreadable image becomes a row with an
`error` and does not stop the job; the output file is written under a
temporary name and renamed when complete.
"""
import csv
import dataclasses
import io
import json
import logging
import os
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from estimator_transfer import files
from estimator_transfer.data import sources
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import tfrecords
from estimator_transfer.errors import ConfigError
from estimator_transfer.serving import inspect as inspection
from estimator_transfer.serving import saved_model
from estimator_transfer.serving import signatures as signatures_lib
from estimator_transfer.serving import versions
from estimator_transfer.serving.signatures import ExportOptions

log = logging.getLogger("estimator_transfer")

OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
CSV_COLUMNS = ("path", "class_id", "class", "probability", "top_k", "error")


@dataclasses.dataclass(frozen=True)
class Item:
  """One input: where it came from and its encoded image (None on error)."""
  path: str
  image: Optional[bytes]
  error: str = ""


class Predictor:
  """Runs an image-bytes predict signature in a session."""

  def __init__(self, session: tf.compat.v1.Session, signature: inspection.SignatureInfo,
               class_names: Sequence[str] = ()):
    self._session = session
    self._input = signature.inputs[0].tensor
    self._outputs = {s.key: s.tensor for s in signature.outputs}
    if "probabilities" not in self._outputs:
      raise ConfigError(f"signature '{signature.name}' has no 'probabilities' "
                        "output; et-predict needs a classification export.")
    self.class_names = list(class_names)

  @classmethod
  def from_saved_model(cls, path: str) -> "Predictor":
    """Loads an export (a version dir, or the newest version of a base path).

    Raises:
      ConfigError: not a SavedModel, or no image-bytes predict signature.
    """
    path = versions.latest_version(path)
    signature = _bytes_signature(inspection.describe(path), path)
    metadata = saved_model.read_metadata(path)
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    try:
      with graph.as_default():
        tf.compat.v1.saved_model.loader.load(session, [tf.saved_model.SERVING], path)
    except (tf.errors.OpError, ValueError, RuntimeError) as e:
      session.close()
      raise ConfigError(f"cannot load the SavedModel {path}: its variables are missing, "
                        f"truncated or corrupt ({inspection.error_line(e)}); re-export "
                        "that version or remove it.") from None
    log.info("model %s", path)
    return cls(session, signature, metadata.get("class_names") or ())

  @classmethod
  def from_estimator(cls, estimator, options: ExportOptions,
                     class_names: Sequence[str] = (),
                     checkpoint_path: Optional[str] = None) -> "Predictor":
    """Builds the serving graph of a checkpoint in memory (no export written)."""
    options = dataclasses.replace(options, serving_inputs=("image_bytes",), warmup_images=())
    serving = saved_model.build_serving_graph(estimator, options, checkpoint_path)
    name = signatures_lib.PREDICT_SIGNATURE
    signature = inspection.signature_info(name, serving.signature_defs[name])
    log.info("checkpoint %s", serving.checkpoint_path)
    return cls(serving.session(estimator.config.session_config), signature, class_names)

  def __call__(self, images: List[bytes]) -> Dict[str, np.ndarray]:
    return self._session.run(self._outputs,
                             {self._input: np.array(images, dtype=object)})

  def close(self) -> None:
    self._session.close()


def _bytes_signature(infos, path) -> inspection.SignatureInfo:
  by_name = {i.name: i for i in infos}
  for name in (signatures_lib.PREDICT_SIGNATURE, signatures_lib.DEFAULT_SIGNATURE, *by_name):
    info = by_name.get(name)
    if (info and info.method == tf.saved_model.PREDICT_METHOD_NAME and
        len(info.inputs) == 1 and info.inputs[0].dtype == "string" and
        info.inputs[0].key == signatures_lib.IMAGE_BYTES_KEY):
      return info
  raise ConfigError(f"{path} has no predict signature that takes image bytes; "
                    "re-export it with --serving_inputs including image_bytes.")


def _is_image(path: str) -> bool:
  return path.lower().endswith(labels_lib.IMAGE_EXTENSIONS)


def _has_tfrecords(path: str) -> bool:
  return any(".tfrecord" in n or "-of-" in n for n in tf.io.gfile.listdir(path))


def iter_items(data: str, image_key: str = "image/encoded") -> Iterator[Item]:
  """Inputs in a stable order: an image, a folder (recursive) or TFRecords.

  TFRecord items are named `<file>:<record index>`.

  Raises:
    ConfigError: nothing is found at `data`.
  """
  if tf.io.gfile.isdir(data) and not _has_tfrecords(data):
    found = False
    for root, dirs, names in tf.io.gfile.walk(data):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for name in sorted(names):
        if not name.startswith(".") and _is_image(name):
          found = True
          yield _read_item(os.path.join(root, name))
    if not found:
      raise ConfigError(f"no images (jpg, png, gif, bmp) under {data}; check "
                        "--predict_data.")
  elif _is_image(data):
    if not tf.io.gfile.exists(data):
      raise ConfigError(f"--predict_data={data} does not exist.")
    if not _is_regular(data):
      raise ConfigError(f"--predict_data={data} is not a regular file (a FIFO or "
                        "device); give an image, a folder or TFRecords.")
    yield _read_item(data)
  else:
    yield from _record_items(data, image_key)


def _is_regular(path: str) -> bool:
  """False for a local FIFO, socket or device (opening a FIFO blocks forever)."""
  return "://" in path or not os.path.exists(path) or os.path.isfile(path) or \
      os.path.isdir(path)


def _record_items(data: str, image_key: str) -> Iterator[Item]:
  """Items of TFRecords; a truncated file's unreadable tail is one error row."""
  paths = sources.list_tfrecord_files(data)
  for path in paths:
    if not _is_regular(path):
      raise ConfigError(f"--predict_data={path} is not a regular file (a FIFO or "
                        "device); give an image, a folder or TFRecords.")
    list(tfrecords.read_records(path, 1))  # not a TFRecord file at all: one sentence
  if not any(tf.io.gfile.stat(p).length for p in paths):
    raise ConfigError(f"--predict_data={data}: the TFRecord files are all empty "
                      f"({paths[0]}...); re-create them or give images.")
  spec = {image_key: tf.io.FixedLenFeature([], tf.string, default_value="")}
  for path in paths:
    index = 0
    try:
      for index, record in enumerate(tf.data.TFRecordDataset(path)):
        key = f"{path}:{index}"
        try:
          image = tf.io.parse_single_example(record, spec)[image_key].numpy()
        except tf.errors.InvalidArgumentError:
          yield Item(key, None, "not a tf.Example")
          continue
        yield Item(key, image or None, "" if image else f"no '{image_key}' feature")
    except tf.errors.DataLossError:
      log.warning("%s is truncated or corrupt after record %d; its other records "
                  "were predicted", path, index)
      yield Item(f"{path}:{index}+", None, "truncated or corrupt TFRecord: the rest "
                 "of the file is unreadable")


def _read_item(path: str) -> Item:
  if not _is_regular(path):
    return Item(path, None, "not a regular file (a FIFO or device)")
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return Item(path, f.read())
  except tf.errors.OpError as e:
    return Item(path, None, f"unreadable: {e.message.splitlines()[0]}")


def _rows(items: List[Item], outputs: Dict[str, np.ndarray], class_names, top_k):
  rows = []
  for i, item in enumerate(items):
    probs = outputs["probabilities"][i]
    order = np.argsort(-probs, kind="stable")[:top_k]

    def name(c):
      return class_names[c] if c < len(class_names) else str(c)

    best = int(outputs["classes"][i]) if "classes" in outputs else int(order[0])
    label = (outputs["class_names"][i].decode() if "class_names" in outputs
             else name(best))
    rows.append({"path": item.path, "class_id": best, "class": label,
                 "probability": float(probs[best]),
                 "top_k": [{"class_id": int(c), "class": name(int(c)),
                            "probability": float(probs[c])} for c in order]})
  return rows


def predict_rows(predictor: Predictor, items: Iterator[Item], batch_size: int = 32,
                 top_k: int = 3) -> Iterator[dict]:
  """Yields one row per item; a batch with a bad image is retried per image."""
  batch: List[Item] = []

  def flush():
    good = [i for i in batch if i.image is not None]
    rows = {}
    if good:
      try:
        for item, row in zip(good, _rows(good, predictor([i.image for i in good]),
                                          predictor.class_names, top_k)):
          rows[id(item)] = row
      except tf.errors.InvalidArgumentError:
        for item in good:
          try:
            rows[id(item)] = _rows([item], predictor([item.image]),
                                   predictor.class_names, top_k)[0]
          except tf.errors.InvalidArgumentError as e:
            rows[id(item)] = {"path": item.path, "error": _reason(e)}
    out = [rows.get(id(i)) or {"path": i.path, "error": i.error} for i in batch]
    batch.clear()
    return out

  for item in items:
    batch.append(item)
    if len(batch) >= batch_size:
      yield from flush()
  if batch:
    yield from flush()


def _reason(error) -> str:
  # A single image that fails in the serving graph fails in its decode.
  return "cannot decode image: " + inspection.error_line(error)


def output_format(path: str) -> str:
  """`csv` or `jsonl` from the output file's extension.

  Raises:
    ConfigError: another extension.
  """
  fmt = OUTPUT_FORMATS.get(os.path.splitext(path)[1].lower())
  if not fmt:
    raise ConfigError(f"--output={path} must end in .csv or .jsonl.")
  return fmt


def _csv_line(row: dict) -> str:
  buf = io.StringIO()
  top = ";".join(f"{t['class']}:{t['probability']:.6f}" for t in row.get("top_k", []))
  csv.writer(buf, lineterminator="\n").writerow([
      row["path"], row.get("class_id", ""), row.get("class", ""),
      f"{row['probability']:.6f}" if "probability" in row else "", top,
      row.get("error", "")])
  return buf.getvalue()


def write_predictions(rows: Iterator[dict], output: str) -> Dict[str, int]:
  """Writes rows as CSV or JSON Lines (by extension), atomically.

  The file appears only once every row is written: a job that fails half way
  leaves no output (or the previous one) rather than a truncated file.

  Args:
    rows: prediction rows (`predict_rows`).
    output: the .csv or .jsonl file to write; its directory is created.

  Returns:
    {"rows": n, "errors": m}.

  Raises:
    ConfigError: `output` has another extension.
  """
  fmt = output_format(output)
  counts = {"rows": 0, "errors": 0}
  # Held in memory until complete (a few hundred bytes a row): files.write_atomically
  # is the one place that knows how to publish a file whole, locally and on gs://.
  out = io.StringIO()
  if fmt == "csv":
    out.write(",".join(CSV_COLUMNS) + "\n")
  for row in rows:
    out.write(_csv_line(row) if fmt == "csv" else json.dumps(row, sort_keys=True) + "\n")
    counts["rows"] += 1
    counts["errors"] += bool(row.get("error"))
  files.write_atomically(output, out.getvalue())
  return counts


def shard(items: Iterator[Item], index: int, count: int) -> Iterator[Item]:
  """Every `count`-th item starting at `index` (cluster jobs split inputs)."""
  for i, item in enumerate(items):
    if i % count == index:
      yield item
