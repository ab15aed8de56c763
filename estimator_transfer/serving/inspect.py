"""Describe a SavedModel's signatures and run each one, as TF Serving would.

`check_saved_model` loads the export with the TF1 loader (what TF Serving's
SavedModelBundle does: restore the variables, run the main_op), feeds every
signature a small batch of sample inputs by the tensor names in its
SignatureDef, and checks what TF Serving checks on the answer (one row per
example; classify: string classes and float scores of shape [batch, k];
regress: one float per example) plus finite numbers. When the export has a
warmup file and tensorflow-serving-api is installed, every warmup request is
replayed too, because TF Serving refuses a version whose warmup fails.
"""
import dataclasses
import io
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import saved_model_pb2

from estimator_transfer.errors import ConfigError
from estimator_transfer.serving import saved_model
from estimator_transfer.serving import signatures as signatures_lib
from estimator_transfer.serving import versions
from estimator_transfer.serving import warmup


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  key: str  # the alias clients use
  tensor: str  # the graph tensor it maps to
  dtype: str
  shape: Optional[Tuple[int, ...]]  # -1 for a dynamic dimension; None: unknown rank


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
  name: str
  method: str
  inputs: Tuple[TensorSpec, ...]
  outputs: Tuple[TensorSpec, ...]


@dataclasses.dataclass(frozen=True)
class CheckResult:
  name: str  # a signature name, or "warmup"
  ok: bool
  message: str


def _spec(key, info) -> TensorSpec:
  shape = None if info.tensor_shape.unknown_rank else tuple(
      d.size for d in info.tensor_shape.dim)
  return TensorSpec(key, info.name, tf.as_dtype(info.dtype).name, shape)


def _meta_graph(saved_model_dir: str):
  path = os.path.join(saved_model_dir, versions.SAVED_MODEL_FILENAME)
  if not tf.io.gfile.exists(path):
    raise ConfigError(f"{saved_model_dir} has no saved_model.pb; give a version "
                      "directory or a TF Serving base path with versions.")
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      saved_model = saved_model_pb2.SavedModel.FromString(f.read())
  except (DecodeError, tf.errors.OpError) as e:
    raise ConfigError(f"{path} is not a readable SavedModel (truncated, half-written "
                      f"or another kind of file: {error_line(e) or 'cannot parse'}); "
                      "re-export that version or remove it.") from None
  for meta_graph in saved_model.meta_graphs:
    if tf.saved_model.SERVING in meta_graph.meta_info_def.tags:
      return meta_graph
  raise ConfigError(f"{saved_model_dir} has no '{tf.saved_model.SERVING}' meta "
                    "graph, so TF Serving cannot load it; re-export it.")


def signature_info(name: str, signature_def) -> SignatureInfo:
  """A SignatureDef proto as a SignatureInfo (inputs and outputs sorted by key)."""
  return SignatureInfo(
      name, signature_def.method_name,
      tuple(_spec(k, v) for k, v in sorted(signature_def.inputs.items())),
      tuple(_spec(k, v) for k, v in sorted(signature_def.outputs.items())))


def describe(saved_model_dir: str) -> List[SignatureInfo]:
  """The serving signatures of a SavedModel, serving_default first.

  Raises:
    ConfigError: not a SavedModel, or no serving meta graph.
  """
  signatures = _meta_graph(saved_model_dir).signature_def
  names = sorted(signatures, key=lambda n: (n != signatures_lib.DEFAULT_SIGNATURE, n))
  return [signature_info(name, signatures[name])
          for name in names if not name.startswith("__")]


def format_signatures(infos: List[SignatureInfo]) -> str:
  """A table of signatures, their method and each input/output tensor."""
  out = io.StringIO()
  for info in infos:
    out.write(f"signature '{info.name}'  method {info.method}\n")
    for role, specs in (("input ", info.inputs), ("output", info.outputs)):
      for s in specs:
        shape = "?" if s.shape is None else "[" + ", ".join(
            "n" if (d == -1 and i == 0) else str(d) for i, d in enumerate(s.shape)) + "]"
        out.write(f"  {role} {s.key:<15} {s.dtype:<8} {shape:<16} {s.tensor}\n")
  return out.getvalue()


def _sample_images(image_size: int) -> List[bytes]:
  """A PNG and a JPEG of sizes other than the model's (exercises the resize)."""
  rng = np.random.RandomState(0)
  small = rng.randint(0, 255, (max(image_size // 2, 5), max(image_size - 3, 7), 3), np.uint8)
  large = rng.randint(0, 255, (image_size * 2 + 1, image_size + 9, 3), np.uint8)
  return [tf.io.encode_png(small).numpy(), tf.io.encode_jpeg(large).numpy()]


def sample_feed(info: SignatureInfo, metadata: Dict, batch: int = 2) -> Dict[str, np.ndarray]:
  """Input alias -> a sample batch for one signature.

  String inputs are serialized tf.Examples for classify/regress (and inputs
  named `inputs`/`examples`), encoded images otherwise; numeric inputs are
  uniform [0, 1] values of the signature's shape.
  """
  image_size = int(metadata.get("image_size") or 32)
  image_key = metadata.get("image_key") or "image/encoded"
  images = (_sample_images(image_size) * batch)[:batch]
  feed = {}
  for spec in info.inputs:
    if spec.dtype == "string":
      if info.method in signatures_lib.EXAMPLE_METHODS or spec.key in ("inputs", "examples"):
        feed[spec.key] = np.array(
            [signatures_lib.image_example(i, image_key).SerializeToString() for i in images],
            dtype=object)
      else:
        feed[spec.key] = np.array(images, dtype=object)
    else:
      shape = [batch] + [d if d > 0 else image_size for d in (spec.shape or (-1,))[1:]]
      feed[spec.key] = np.random.RandomState(1).uniform(0, 1, shape).astype(spec.dtype)
  return feed


def _validate(info: SignatureInfo, outputs: Dict[str, np.ndarray], batch: int) -> str:
  """Returns a one-line summary; raises ValueError when TF Serving would balk."""
  parts = []
  for key, value in sorted(outputs.items()):
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] != batch:
      raise ValueError(f"output '{key}' has shape {list(value.shape)}, not one row "
                       f"per example (batch {batch})")
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
      raise ValueError(f"output '{key}' has NaN or Inf values")
    parts.append(f"{key} {list(value.shape)}")
  if info.method == tf.saved_model.CLASSIFY_METHOD_NAME:
    classes, scores = outputs.get("classes"), outputs.get("scores")
    if classes is not None and (classes.ndim != 2 or classes.dtype.kind not in "OSU"):
      raise ValueError("classify output 'classes' must be strings of shape [batch, k]")
    if scores is not None and (scores.ndim != 2 or scores.dtype.kind != "f"):
      raise ValueError("classify output 'scores' must be floats of shape [batch, k]")
    if classes is not None and scores is not None and classes.shape != scores.shape:
      raise ValueError("classify outputs 'classes' and 'scores' differ in shape")
  if info.method == tf.saved_model.REGRESS_METHOD_NAME:
    values = outputs.get("outputs")
    if values is None or values.size != batch:
      raise ValueError("regress must output one value per example in 'outputs'")
  return ", ".join(parts)


def _run(sess, info: SignatureInfo, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  by_key = {s.key: s.tensor for s in info.inputs}
  fetches = {s.key: s.tensor for s in info.outputs}
  return sess.run(fetches, {by_key[k]: v for k, v in feed.items()})


def _warmup_feeds(saved_model_dir: str, infos: Dict[str, SignatureInfo]):
  """(signature name, feed) per warmup record; [] without a warmup file."""
  path = os.path.join(saved_model_dir, versions.ASSETS_EXTRA, warmup.WARMUP_FILENAME)
  if not tf.io.gfile.exists(path):
    return []
  _, _, prediction_log_pb2, _ = warmup.require_serving_api()
  feeds = []
  for record in tf.data.TFRecordDataset(path):
    entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
    kind = entry.WhichOneof("log_type")
    request = getattr(entry, kind).request
    name = request.model_spec.signature_name or signatures_lib.DEFAULT_SIGNATURE
    if name not in infos:
      raise ValueError(f"warmup request for missing signature '{name}'")
    if kind == "predict_log":
      feed = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
    elif kind in ("classify_log", "regress_log"):
      examples = request.input.example_list.examples
      feed = {infos[name].inputs[0].key: np.array(
          [e.SerializeToString() for e in examples], dtype=object)}
    else:
      raise ValueError(f"warmup record of type {kind} is not supported here")
    feeds.append((name, feed))
  return feeds


_RUN_ERRORS = (tf.errors.OpError, ValueError, KeyError, TypeError)


def _check_signature(sess, info: SignatureInfo, feed, batch: int) -> CheckResult:
  start = time.time()
  try:
    summary = _validate(info, _run(sess, info, feed), batch)
  except _RUN_ERRORS as e:
    return CheckResult(info.name, False, error_line(e))
  return CheckResult(info.name, True, f"{time.time() - start:.2f}s, {summary}")


def _replay_warmup(sess, infos: Dict[str, SignatureInfo], replays) -> CheckResult:
  try:
    for name, feed in replays:
      _run(sess, infos[name], feed)
  except _RUN_ERRORS as e:
    return CheckResult("warmup", False, error_line(e))
  return CheckResult("warmup", True, f"{len(replays)} requests replayed")


def check_saved_model(saved_model_dir: str, batch: int = 2) -> List[CheckResult]:
  """Loads the SavedModel as TF Serving does and runs every signature.

  Args:
    saved_model_dir: a SavedModel (version) directory.
    batch: examples per sample request.

  Returns:
    One result per signature, plus one for the warmup file when present.

  Raises:
    ConfigError: not a SavedModel (a model that loads but whose signatures
      fail gives failed results instead).
  """
  infos = {i.name: i for i in describe(saved_model_dir)}
  metadata = saved_model.read_metadata(saved_model_dir)
  # Sample inputs are made eagerly, before the loader's graph takes over.
  feeds = {name: sample_feed(info, metadata, batch) for name, info in infos.items()}
  try:
    replays, warmup_note = _warmup_feeds(saved_model_dir, infos), ""
  except ConfigError as e:
    replays, warmup_note = [], f"not replayed: {e}"
  except ValueError as e:
    return [CheckResult("warmup", False, error_line(e))]
  with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    try:
      tf.compat.v1.saved_model.loader.load(sess, [tf.saved_model.SERVING], saved_model_dir)
    except (tf.errors.OpError, ValueError, RuntimeError) as e:
      return [CheckResult("load", False, error_line(e))]
    results = [_check_signature(sess, info, feeds[name], batch)
               for name, info in infos.items()]
    if warmup_note:
      results.append(CheckResult("warmup", True, warmup_note))
    elif replays:
      results.append(_replay_warmup(sess, infos, replays))
  return results


def error_line(error) -> str:
  """The line of a TensorFlow error that says what went wrong.

  Session errors start with "Graph execution error:" and node/stack details;
  the cause is the first line that is none of those.
  """
  text = getattr(error, "message", None) or str(error)
  for line in text.splitlines():
    if (line.strip() and not line[0].isspace() and
        not line.startswith(("Graph execution error", "Detected at node", "Node: "))):
      return line.strip()
  return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def format_results(results: List[CheckResult]) -> str:
  """One `ok`/`FAIL` line per check result."""
  return "".join(f"  {'ok ' if r.ok else 'FAIL'} {r.name}: {r.message}\n" for r in results)


def failures(results: List[CheckResult]) -> List[CheckResult]:
  """The results that did not pass."""
  return [r for r in results if not r.ok]
