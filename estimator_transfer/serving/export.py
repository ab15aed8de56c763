"""Serving exports in TF Serving's layout: <export_dir>/<version>/saved_model.pb.

Signatures, picked by `ExportOptions.serving_inputs` (the first one listed is
also exported as `serving_default`):

  image_bytes   `predict`          input  image_bytes: string [n], encoded
                                          JPEG/PNG/GIF/BMP of any size (REST:
                                          {"b64": ...}), decoded and resized in
                                          the graph exactly as in training
                                   output classes int64 [n], class_names
                                          string [n], probabilities float
                                          [n, k], features float [n, d] (with
                                          `export_features`)
  tf_example    `classify`         input  inputs: serialized tf.Example [n],
                                          the image under `image_key`
                                          (method tensorflow/serving/classify)
                                   output classes string [n, k] (label map),
                                          scores float [n, k]
                `regress`          the same input for regression heads
                                   (method tensorflow/serving/regress)
  image_tensor  `predict_images`   input  images: float32 [n, size, size, 3],
                                          RGB in [0, 1], already resized
                                   output as `predict`

The signatures are assembled here, not by `Estimator.export_saved_model`: that
feeds every export output from one receiver and silently drops a classify
signature whose receiver is not a single string tensor. One graph serves all
three entry points: serialized examples are parsed into image bytes, the bytes
are decoded into images, and each signature feeds the stage it starts at
(`placeholder_with_default`), so there is one copy of the model's variables.

A version is written under `temp-<version>-<id>` (TF Serving ignores
non-numeric names), optionally verified, and renamed to `<version>` only when
complete; on failure the temporary directory is removed. The newest
`exports_to_keep` versions are kept.
"""
import dataclasses
import json
import logging
import os
import time
import uuid
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from estimator_transfer.errors import ConfigError

from estimator_transfer.config import SERVING_INPUTS
from estimator_transfer.data import input_fns
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import preprocessing

log = logging.getLogger("estimator_transfer")

IMAGE_BYTES_KEY = "image_bytes"  # *_bytes: the name clients expect for {"b64": ...}
IMAGES_KEY = "images"
EXAMPLES_KEY = tf.saved_model.CLASSIFY_INPUTS  # "inputs", required by classify/regress
DEFAULT_SIGNATURE = tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
PREDICT_SIGNATURE = "predict"
CLASSIFY_SIGNATURE = "classify"
REGRESS_SIGNATURE = "regress"
IMAGES_SIGNATURE = "predict_images"
ASSETS_EXTRA = "assets.extra"
WARMUP_FILENAME = "tf_serving_warmup_requests"
METADATA_FILENAME = "et_export.json"
EMA_SUFFIX = "/ExponentialMovingAverage"  # tf.train.ExponentialMovingAverage's default name
TEMP_PREFIX = "temp-"
_STALE_TEMP_SECONDS = 3600
_SERVING_API_HINT = ("pip install 'tensorflow-serving-api==2.15.*' (or "
                     "'estimator-transfer[serving]')")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
  """What a serving export contains (everything except the model itself).

  Attributes:
    image_size: the model's input size; images are resized to it in the graph.
    serving_inputs: receivers to export (see the module docstring); the first
      is also `serving_default`.
    image_key: the tf.Example feature holding the encoded image (tf_example).
    exports_to_keep: newest versions kept under the export directory.
    use_ema: restore the exponential-moving-average shadow of every variable
      that has one in the checkpoint (`<name>/ExponentialMovingAverage`).
    warmup_images: encoded images written as TF Serving warmup requests (one
      request per signature); empty for no warmup file.
    metadata: extra JSON-serialisable facts for `assets.extra/et_export.json`
      (class names, backbone, eval metrics...).
  """
  image_size: int
  serving_inputs: Tuple[str, ...] = SERVING_INPUTS
  image_key: str = "image/encoded"
  exports_to_keep: int = 5
  use_ema: bool = False
  warmup_images: Tuple[bytes, ...] = ()
  metadata: Mapping[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ServingGraph:
  """The serving graph for one checkpoint, before it is saved or run."""
  graph: tf.Graph
  signature_defs: Dict[str, object]  # name -> SignatureDef proto
  restorer: tf.compat.v1.train.Saver  # reads the checkpoint (EMA-mapped)
  saver: tf.compat.v1.train.Saver  # writes plain variable names
  local_init_op: object
  checkpoint_path: str

  def session(self, session_config=None) -> tf.compat.v1.Session:
    """A session with the checkpoint restored and local init run."""
    sess = tf.compat.v1.Session(graph=self.graph, config=session_config)
    with self.graph.as_default():  # Saver.restore outside it takes the eager path
      self.restorer.restore(sess, self.checkpoint_path)
      sess.run(self.local_init_op)
    return sess


def build_serving_input_receiver_fn(image_size: int):
  """Receiver for `Estimator.export_saved_model`: image bytes only.

  `export_saved_model` below is the complete export; this stays for callers
  that use Estimator's own exporters with the `predict` signature alone.
  """

  def serving_input_receiver_fn():
    image_bytes = tf.compat.v1.placeholder(tf.string, [None], name=IMAGE_BYTES_KEY)
    images = _decode_images(image_bytes, image_size)
    return tf.estimator.export.ServingInputReceiver(
        {input_fns.IMAGE_FEATURE: images}, {IMAGE_BYTES_KEY: image_bytes})

  return serving_input_receiver_fn


def _decode_images(image_bytes, image_size):
  images = tf.map_fn(lambda b: preprocessing.decode_and_resize(b, image_size),
                     image_bytes, fn_output_signature=tf.float32)
  images.set_shape([None, image_size, image_size, 3])
  return images


@dataclasses.dataclass
class _Receivers:
  examples: Optional[tf.Tensor]
  image_bytes: Optional[tf.Tensor]
  images: tf.Tensor


def _build_receivers(options: ExportOptions) -> _Receivers:
  """examples -> image bytes -> images, each stage feedable on its own."""
  kinds = options.serving_inputs
  size = options.image_size
  examples = image_bytes = None
  if "tf_example" in kinds:
    examples = tf.compat.v1.placeholder(tf.string, [None], name="input_examples")
    parsed = tf.io.parse_example(
        examples, {options.image_key: tf.io.FixedLenFeature([], tf.string)})
    image_bytes = tf.compat.v1.placeholder_with_default(
        parsed[options.image_key], [None], name=IMAGE_BYTES_KEY)
  elif "image_bytes" in kinds:
    image_bytes = tf.compat.v1.placeholder(tf.string, [None], name=IMAGE_BYTES_KEY)
  if image_bytes is not None:
    images = tf.compat.v1.placeholder_with_default(
        _decode_images(image_bytes, size), [None, size, size, 3], name=IMAGES_KEY)
  else:
    images = tf.compat.v1.placeholder(tf.float32, [None, size, size, 3], name=IMAGES_KEY)
  return _Receivers(examples, image_bytes, images)


def _signature_defs(export_outputs, receivers: _Receivers,
                    serving_inputs: Sequence[str]) -> Dict[str, object]:
  """Signature name -> SignatureDef for the requested receivers.

  Raises:
    ConfigError: a requested receiver has no matching export output.
  """
  outputs = dict(export_outputs or {})
  predict = outputs.get(PREDICT_SIGNATURE)
  if not isinstance(predict, tf.estimator.export.PredictOutput):
    predict = next((o for o in outputs.values()
                    if isinstance(o, tf.estimator.export.PredictOutput)), None)
  example_outputs = []
  for output in outputs.values():
    if isinstance(output, tf.estimator.export.ClassificationOutput):
      example_outputs.append((CLASSIFY_SIGNATURE, output))
    elif isinstance(output, tf.estimator.export.RegressionOutput):
      example_outputs.append((REGRESS_SIGNATURE, output))
  # Several keys may hold the same output object (serving_default and its twin).
  example_outputs = list(dict(example_outputs).items())
  signatures, first = {}, None
  for kind in serving_inputs:
    if kind == "tf_example":
      if not example_outputs:
        raise ConfigError("--serving_inputs=tf_example needs a model with a "
                          "classification or regression head; drop tf_example.")
      names = []
      for name, output in example_outputs:
        signatures[name] = output.as_signature_def({EXAMPLES_KEY: receivers.examples})
        names.append(name)
    else:
      if predict is None:
        raise ConfigError(f"--serving_inputs={kind} needs a model that returns "
                          "a PredictOutput; drop it from --serving_inputs.")
      name, tensor, key = ((PREDICT_SIGNATURE, receivers.image_bytes, IMAGE_BYTES_KEY)
                           if kind == "image_bytes" else
                           (IMAGES_SIGNATURE, receivers.images, IMAGES_KEY))
      signatures[name] = predict.as_signature_def({key: tensor})
      names = [name]
    first = first or names[0]
  signatures[DEFAULT_SIGNATURE] = signatures[first]
  for name, signature in signatures.items():
    # Estimator would drop an invalid signature with a log line; fail instead.
    if not tf.compat.v1.saved_model.is_valid_signature(signature):
      raise ValueError(f"signature {name} is not valid for TF Serving: {signature}")
  return signatures


def restore_var_list(checkpoint_path: str, use_ema: bool):
  """Checkpoint name -> graph variable for restoring a serving graph.

  With `use_ema`, every variable whose moving-average shadow
  (`<name>/ExponentialMovingAverage`, as `tf.train.ExponentialMovingAverage`
  names it) is in the checkpoint is restored from the shadow; the others
  (BatchNorm statistics, global_step, frozen layers) from themselves. This is
  `ExponentialMovingAverage.variables_to_restore()` decided by the checkpoint
  rather than by graph collections, which Keras and Hub layers do not fill.

  Returns:
    None (restore every variable by its own name) or a dict for `Saver`.

  Raises:
    ConfigError: EMA is on but the checkpoint has no averaged variables.
  """
  if not use_ema:
    return None
  in_checkpoint = {name for name, _ in tf.train.list_variables(checkpoint_path)}
  mapping, averaged = {}, 0
  for variable in tf.compat.v1.global_variables():
    name = variable.op.name
    if name + EMA_SUFFIX in in_checkpoint:
      mapping[name + EMA_SUFFIX] = variable
      averaged += 1
    else:
      mapping[name] = variable
  for saveable in tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.SAVEABLE_OBJECTS):
    mapping[saveable.name] = saveable
  if not averaged:
    raise ConfigError(f"EMA is on but checkpoint {checkpoint_path} has no "
                      "moving-average variables; export a checkpoint trained "
                      "with EMA, or turn EMA off for the export.")
  log.info("export: %d variables restored from their moving averages", averaged)
  return mapping


def build_serving_graph(estimator, options: ExportOptions,
                        checkpoint_path: Optional[str] = None) -> ServingGraph:
  """Builds receivers, the model (PREDICT mode) and signatures in a new graph.

  Args:
    estimator: any Estimator whose model_fn takes {"image": float images}.
    options: what to export.
    checkpoint_path: the checkpoint to restore; the latest when None.

  Raises:
    ConfigError: no checkpoint, or a requested signature cannot be built.
  """
  checkpoint_path = checkpoint_path or estimator.latest_checkpoint()
  if not checkpoint_path:
    raise ConfigError(f"no checkpoint in {estimator.model_dir}; train first.")
  graph = tf.Graph()
  with graph.as_default():
    if estimator.config.tf_random_seed is not None:
      tf.compat.v1.set_random_seed(estimator.config.tf_random_seed)
    tf.compat.v1.train.get_or_create_global_step()
    receivers = _build_receivers(options)
    spec = estimator.model_fn({input_fns.IMAGE_FEATURE: receivers.images}, None,
                              tf.estimator.ModeKeys.PREDICT, estimator.config)
    signatures = _signature_defs(spec.export_outputs, receivers, options.serving_inputs)
    restorer = tf.compat.v1.train.Saver(
        var_list=restore_var_list(checkpoint_path, options.use_ema), sharded=True)
    saver = tf.compat.v1.train.Saver(sharded=True)
    scaffold = spec.scaffold
    local_init_op = (scaffold.local_init_op if scaffold is not None and
                     scaffold.local_init_op is not None
                     else tf.compat.v1.train.Scaffold.default_local_init_op())
  return ServingGraph(graph, signatures, restorer, saver, local_init_op, checkpoint_path)


def list_versions(export_dir: str) -> List[str]:
  """Complete version directories under `export_dir`, oldest first."""
  if not tf.io.gfile.isdir(export_dir):
    return []
  versions = [int(d.rstrip("/")) for d in tf.io.gfile.listdir(export_dir)
              if d.rstrip("/").isdigit()]
  return [os.path.join(export_dir, str(v)) for v in sorted(versions)
          if tf.io.gfile.exists(os.path.join(export_dir, str(v), "saved_model.pb"))]


def latest_version(path: str) -> str:
  """`path` itself when it is a SavedModel, else its newest version.

  Raises:
    ConfigError: neither.
  """
  if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
    return path
  versions = list_versions(path)
  if not versions:
    raise ConfigError(f"{path} is not a SavedModel and has no version "
                      "directories (<n>/saved_model.pb); check the path.")
  return versions[-1]


def _version_of(name: str) -> Optional[int]:
  """The version a numeric or temporary directory name stands for."""
  name = name.rstrip("/")
  if name.startswith(TEMP_PREFIX):
    name = name[len(TEMP_PREFIX):].split("-")[0]
  return int(name) if name.isdigit() else None


def _new_version(export_dir: str) -> int:
  # Seconds like Estimator, but always above what is there: two exports in
  # one second, or a clock that went back, must not reuse or lower a version.
  taken = [_version_of(n) for n in tf.io.gfile.listdir(export_dir)]
  return max([int(time.time())] + [t + 1 for t in taken if t is not None])


def _remove_stale_temps(export_dir: str) -> None:
  """Removes temp dirs left by a killed export (old enough to be dead)."""
  now = time.time()
  for name in tf.io.gfile.listdir(export_dir):
    if not name.startswith(TEMP_PREFIX):
      continue
    path = os.path.join(export_dir, name.rstrip("/"))
    try:
      age = now - tf.io.gfile.stat(path).mtime_nsec / 1e9
    except tf.errors.OpError:
      continue
    if age > _STALE_TEMP_SECONDS:
      log.info("export: removing %s left by an interrupted export", path)
      tf.io.gfile.rmtree(path)


def export_saved_model(estimator, export_dir: str, options: ExportOptions,
                       checkpoint_path: Optional[str] = None,
                       verify: Optional[Callable[[str], None]] = None) -> str:
  """Writes one complete TF Serving version; returns its directory.

  Args:
    estimator: the Estimator (its model_fn and model_dir are used).
    export_dir: the TF Serving model base path.
    options: signatures, EMA, warmup and metadata.
    checkpoint_path: the checkpoint to export; the latest when None.
    verify: called with the finished temporary directory before it is
      published; raising there aborts the export and publishes nothing.

  Returns:
    `<export_dir>/<version>`.

  Raises:
    ConfigError: no checkpoint, a signature that cannot be built, or a
      warmup/EMA problem. Nothing is published then.
  """
  tf.io.gfile.makedirs(export_dir)
  _remove_stale_temps(export_dir)
  version = _new_version(export_dir)
  temp = os.path.join(export_dir, f"{TEMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}")
  final = os.path.join(export_dir, str(version))
  try:
    serving = build_serving_graph(estimator, options, checkpoint_path)
    with serving.graph.as_default(), tf.compat.v1.Session(
        graph=serving.graph, config=estimator.config.session_config) as sess:
      serving.restorer.restore(sess, serving.checkpoint_path)
      builder = tf.compat.v1.saved_model.Builder(temp)
      builder.add_meta_graph_and_variables(
          sess, [tf.saved_model.SERVING], signature_def_map=serving.signature_defs,
          assets_collection=tf.compat.v1.get_collection(
              tf.compat.v1.GraphKeys.ASSET_FILEPATHS),
          main_op=serving.local_init_op, saver=serving.saver, strip_default_attrs=True)
      builder.save()
    extra = os.path.join(temp, ASSETS_EXTRA)
    tf.io.gfile.makedirs(extra)
    if options.warmup_images:
      write_warmup_file(os.path.join(extra, WARMUP_FILENAME), options,
                        serving.signature_defs)
    _write_metadata(os.path.join(extra, METADATA_FILENAME), options, serving)
    if verify is not None:
      verify(temp)
    tf.io.gfile.rename(temp, final)
  except BaseException:
    if tf.io.gfile.exists(temp):
      tf.io.gfile.rmtree(temp)
    raise
  for old in list_versions(export_dir)[:-options.exports_to_keep]:
    tf.io.gfile.rmtree(old)
  log.info("export: wrote %s (signatures %s)", final,
           ", ".join(sorted(serving.signature_defs)))
  return final


def export(estimator, export_dir: str, image_size: int, checkpoint_path=None,
           exports_to_keep: int = 5) -> str:
  """Exports the latest (or the given) checkpoint with default signatures.

  See `export_saved_model` for the full set of options.
  """
  return export_saved_model(
      estimator, export_dir,
      ExportOptions(image_size=image_size, exports_to_keep=exports_to_keep),
      checkpoint_path=checkpoint_path)


def _checkpoint_step(checkpoint_path: str) -> Optional[int]:
  try:
    return int(tf.train.load_checkpoint(checkpoint_path).get_tensor("global_step"))
  except (tf.errors.OpError, ValueError):
    return None


def _write_metadata(path: str, options: ExportOptions, serving: ServingGraph) -> None:
  signatures = {}
  for name, signature in sorted(serving.signature_defs.items()):
    signatures[name] = {"method": signature.method_name,
                        "inputs": sorted(signature.inputs),
                        "outputs": sorted(signature.outputs)}
  record = {
      "image_size": options.image_size,
      "image_key": options.image_key,
      "serving_inputs": list(options.serving_inputs),
      "preprocessing": ("decode JPEG/PNG/GIF/BMP to RGB, bilinear antialiased "
                        f"resize to {options.image_size}x{options.image_size}, "
                        "float32 in [0, 1] (the predict_images input)"),
      "checkpoint": serving.checkpoint_path,
      "global_step": _checkpoint_step(serving.checkpoint_path),
      "ema": options.use_ema,
      "signatures": signatures,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  record.update(options.metadata)
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(json.dumps(record, indent=2, sort_keys=True, default=_json_default))


def _json_default(value):
  if isinstance(value, (np.generic,)):
    return value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", "replace")
  return str(value)


def read_metadata(saved_model_dir: str) -> dict:
  """The export's `assets.extra/et_export.json`, or {} for other SavedModels."""
  path = os.path.join(saved_model_dir, ASSETS_EXTRA, METADATA_FILENAME)
  if not tf.io.gfile.exists(path):
    return {}
  with tf.io.gfile.GFile(path) as f:
    return json.loads(f.read())


# --- TF Serving warmup ------------------------------------------------------


def require_serving_api():
  """Imports TF Serving's request protos (used for warmup files).

  Raises:
    ConfigError: tensorflow-serving-api is not installed.
  """
  try:
    from tensorflow_serving.apis import classification_pb2  # pylint: disable=g-import-not-at-top
    from tensorflow_serving.apis import predict_pb2  # pylint: disable=g-import-not-at-top
    from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=g-import-not-at-top
    from tensorflow_serving.apis import regression_pb2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("--serving_warmup needs TF Serving's protos: "
                      f"{_SERVING_API_HINT}, or set --serving_warmup=0.") from None
  return classification_pb2, predict_pb2, prediction_log_pb2, regression_pb2


def _decodable(image: bytes, image_size: int) -> Optional[np.ndarray]:
  try:
    return preprocessing.decode_and_resize(tf.constant(image), image_size).numpy()
  except tf.errors.InvalidArgumentError:
    return None


def read_warmup_images(data: str, image_key: str, count: int,
                       image_size: int) -> Tuple[bytes, ...]:
  """The first `count` decodable encoded images of an eval set.

  Undecodable records are skipped: a warmup request that fails makes TF
  Serving refuse to load the whole version.

  Args:
    data: TFRecords (file, glob, dir) or an image folder, as --eval_data.
    image_key: the tf.Example key of the encoded image.
    count: how many images to return.
    image_size: the model's input size (for the decode check).

  Raises:
    ConfigError: no data, or none of it decodes.
  """
  if count <= 0:
    return ()
  if not data:
    raise ConfigError("--serving_warmup needs --eval_data to take real records "
                      "from; set it or use --serving_warmup=0.")
  images = []

  def take(image):
    if _decodable(image, image_size) is not None:
      images.append(image)
    return len(images) >= count

  if labels_lib.is_image_folder(data):
    files, _, _ = input_fns.list_image_folder(data)
    for path in files:
      with tf.io.gfile.GFile(path, "rb") as f:
        if take(f.read()):
          break
  else:
    spec = {image_key: tf.io.FixedLenFeature([], tf.string, default_value="")}
    for record in tf.data.TFRecordDataset(input_fns.list_tfrecord_files(data)):
      image = tf.io.parse_single_example(record, spec)[image_key].numpy()
      if image and take(image):
        break
  if not images:
    raise ConfigError(f"no decodable images under '{image_key}' in {data} for "
                      "--serving_warmup; check --image_key and the data.")
  return tuple(images)


def _example(image: bytes, image_key: str) -> tf.train.Example:
  return tf.train.Example(features=tf.train.Features(feature={
      image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))}))


def build_warmup_logs(options: ExportOptions, signature_defs: Mapping[str, object]) -> list:
  """One PredictionLog per signature, each batching all `options.warmup_images`.

  The request type follows the signature: classify and regress get
  ClassificationRequest / RegressionRequest with tf.Examples, predict
  signatures a PredictRequest with image bytes or decoded images.
  """
  classification_pb2, predict_pb2, prediction_log_pb2, regression_pb2 = \
      require_serving_api()
  images = list(options.warmup_images)
  logs = []
  for name, signature in sorted(signature_defs.items()):
    method = signature.method_name
    if method in (tf.saved_model.CLASSIFY_METHOD_NAME, tf.saved_model.REGRESS_METHOD_NAME):
      classify = method == tf.saved_model.CLASSIFY_METHOD_NAME
      request = (classification_pb2.ClassificationRequest() if classify
                 else regression_pb2.RegressionRequest())
      request.model_spec.signature_name = name
      request.input.example_list.examples.extend(
          [_example(i, options.image_key) for i in images])
      entry = (prediction_log_pb2.PredictionLog(
          classify_log=prediction_log_pb2.ClassifyLog(request=request)) if classify
               else prediction_log_pb2.PredictionLog(
                   regress_log=prediction_log_pb2.RegressLog(request=request)))
    else:
      request = predict_pb2.PredictRequest()
      request.model_spec.signature_name = name
      for key, info in signature.inputs.items():
        if info.dtype == tf.string.as_datatype_enum:
          value = tf.make_tensor_proto(images, dtype=tf.string, shape=[len(images)])
        else:
          value = tf.make_tensor_proto(np.stack(
              [_decodable(i, options.image_size) for i in images]), dtype=tf.float32)
        request.inputs[key].CopyFrom(value)
      entry = prediction_log_pb2.PredictionLog(
          predict_log=prediction_log_pb2.PredictLog(request=request))
    logs.append(entry)
  return logs


def write_warmup_file(path: str, options: ExportOptions,
                      signature_defs: Mapping[str, object]) -> None:
  """Writes TF Serving's warmup file: a TFRecord of PredictionLog protos."""
  logs = build_warmup_logs(options, signature_defs)
  with tf.io.TFRecordWriter(path) as writer:
    for entry in logs:
      writer.write(entry.SerializeToString())
