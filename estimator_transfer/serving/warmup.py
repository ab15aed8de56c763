"""TF Serving warmup: `assets.extra/tf_serving_warmup_requests`.

TF Serving replays these PredictionLog records when it loads a version, so the
first real request does not pay for graph initialisation; a record that fails
makes it refuse the whole version, which is why the images are real,
decodable eval records. The request protos come from tensorflow-serving-api,
an optional dependency: they are imported only when a warmup file is written
or replayed.
"""
from typing import Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from estimator_transfer.data import sources
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import preprocessing
from estimator_transfer.errors import ConfigError
from estimator_transfer.serving import signatures
from estimator_transfer.serving.signatures import ExportOptions

WARMUP_FILENAME = "tf_serving_warmup_requests"
_SERVING_API_HINT = ("pip install 'tensorflow-serving-api==2.15.*' (or "
                     "'estimator-transfer[serving]')")


def require_serving_api():
  """Imports TF Serving's request protos (used for warmup files).

  Returns:
    The modules (classification_pb2, predict_pb2, prediction_log_pb2,
    regression_pb2).

  Raises:
    ConfigError: tensorflow-serving-api is not installed.
  """
  # Imported here: tensorflow-serving-api is optional (the [serving] extra).
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


def _encoded_images(data: str, image_key: str):
  """Yields the encoded images of an image folder or TFRecords (may be empty)."""
  if labels_lib.is_image_folder(data):
    files, _, _ = sources.list_image_folder(data)
    for path in files:
      with tf.io.gfile.GFile(path, "rb") as f:
        yield f.read()
    return
  spec = {image_key: tf.io.FixedLenFeature([], tf.string, default_value="")}
  for record in tf.data.TFRecordDataset(sources.list_tfrecord_files(data)):
    image = tf.io.parse_single_example(record, spec)[image_key].numpy()
    if image:
      yield image


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

  Returns:
    Up to `count` encoded images; () when `count` is 0.

  Raises:
    ConfigError: no data, or none of it decodes.
  """
  if count <= 0:
    return ()
  if not data:
    raise ConfigError("--serving_warmup needs --eval_data to take real records "
                      "from; set it or use --serving_warmup=0.")
  images = []
  for image in _encoded_images(data, image_key):
    if _decodable(image, image_size) is not None:
      images.append(image)
      if len(images) >= count:
        break
  if not images:
    raise ConfigError(f"no decodable images under '{image_key}' in {data} for "
                      "--serving_warmup; check --image_key and the data.")
  return tuple(images)


def _example_log(protos, name: str, method: str, options: ExportOptions):
  """A classify or regress PredictionLog with every warmup image as a tf.Example."""
  classification_pb2, _, prediction_log_pb2, regression_pb2 = protos
  classify = method == tf.saved_model.CLASSIFY_METHOD_NAME
  request = (classification_pb2.ClassificationRequest() if classify
             else regression_pb2.RegressionRequest())
  request.model_spec.signature_name = name
  request.input.example_list.examples.extend(
      [signatures.image_example(i, options.image_key) for i in options.warmup_images])
  if classify:
    return prediction_log_pb2.PredictionLog(
        classify_log=prediction_log_pb2.ClassifyLog(request=request))
  return prediction_log_pb2.PredictionLog(
      regress_log=prediction_log_pb2.RegressLog(request=request))


def _predict_log(protos, name: str, signature, options: ExportOptions):
  """A PredictLog feeding image bytes, or decoded images to a float input."""
  _, predict_pb2, prediction_log_pb2, _ = protos
  images = list(options.warmup_images)
  request = predict_pb2.PredictRequest()
  request.model_spec.signature_name = name
  for key, info in signature.inputs.items():
    if info.dtype == tf.string.as_datatype_enum:
      value = tf.make_tensor_proto(images, dtype=tf.string, shape=[len(images)])
    else:
      value = tf.make_tensor_proto(np.stack(
          [_decodable(i, options.image_size) for i in images]), dtype=tf.float32)
    request.inputs[key].CopyFrom(value)
  return prediction_log_pb2.PredictionLog(
      predict_log=prediction_log_pb2.PredictLog(request=request))


def build_warmup_logs(options: ExportOptions, signature_defs: Mapping[str, object]) -> list:
  """One PredictionLog per signature, each batching all `options.warmup_images`.

  The request type follows the signature: classify and regress get
  ClassificationRequest / RegressionRequest with tf.Examples, predict
  signatures a PredictRequest with image bytes or decoded images.

  Raises:
    ConfigError: tensorflow-serving-api is not installed.
  """
  protos = require_serving_api()
  logs = []
  for name, signature in sorted(signature_defs.items()):
    if signature.method_name in signatures.EXAMPLE_METHODS:
      logs.append(_example_log(protos, name, signature.method_name, options))
    else:
      logs.append(_predict_log(protos, name, signature, options))
  return logs


def write_warmup_file(path: str, options: ExportOptions,
                      signature_defs: Mapping[str, object]) -> None:
  """Writes TF Serving's warmup file: a TFRecord of PredictionLog protos."""
  logs = build_warmup_logs(options, signature_defs)
  with tf.io.TFRecordWriter(path) as writer:
    for entry in logs:
      writer.write(entry.SerializeToString())
