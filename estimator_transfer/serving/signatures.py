"""Serving signatures: what a client sends and what it gets back.

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
"""
import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf

from estimator_transfer.config import SERVING_INPUTS
from estimator_transfer.data import preprocessing
from estimator_transfer.errors import ConfigError

IMAGE_BYTES_KEY = "image_bytes"  # *_bytes: the name clients expect for {"b64": ...}
IMAGES_KEY = "images"
EXAMPLES_KEY = tf.saved_model.CLASSIFY_INPUTS  # "inputs", required by classify/regress
DEFAULT_SIGNATURE = tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
PREDICT_SIGNATURE = "predict"
CLASSIFY_SIGNATURE = "classify"
REGRESS_SIGNATURE = "regress"
IMAGES_SIGNATURE = "predict_images"
# Methods whose requests carry tf.Examples (TF Serving's Classify/Regress APIs).
EXAMPLE_METHODS = (tf.saved_model.CLASSIFY_METHOD_NAME, tf.saved_model.REGRESS_METHOD_NAME)


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


@dataclasses.dataclass
class Receivers:
  """The graph's entry points; each stage is fed by the one before it."""
  examples: Optional[tf.Tensor]
  image_bytes: Optional[tf.Tensor]
  images: tf.Tensor


def image_example(image: bytes, image_key: str) -> tf.train.Example:
  """The tf.Example a `tf_example` receiver parses: the encoded image under `image_key`."""
  return tf.train.Example(features=tf.train.Features(feature={
      image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))}))


def _decode_images(image_bytes, image_size):
  images = tf.map_fn(lambda b: preprocessing.decode_and_resize(b, image_size),
                     image_bytes, fn_output_signature=tf.float32)
  images.set_shape([None, image_size, image_size, 3])
  return images


def build_receivers(options: ExportOptions) -> Receivers:
  """examples -> image bytes -> images, each stage feedable on its own.

  Args:
    options: the requested `serving_inputs`, image size and tf.Example key.

  Returns:
    The placeholders, in the current graph; `examples` and `image_bytes` are
    None when no requested receiver starts there.
  """
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
  return Receivers(examples, image_bytes, images)


def _predict_output(outputs: Mapping[str, object]):
  """The `predict` PredictOutput, else any PredictOutput, else None."""
  predict = outputs.get(PREDICT_SIGNATURE)
  if isinstance(predict, tf.estimator.export.PredictOutput):
    return predict
  return next((o for o in outputs.values()
               if isinstance(o, tf.estimator.export.PredictOutput)), None)


def _example_outputs(outputs: Mapping[str, object]) -> List[Tuple[str, object]]:
  """(classify|regress, output) for every classification/regression output."""
  found = []
  for output in outputs.values():
    if isinstance(output, tf.estimator.export.ClassificationOutput):
      found.append((CLASSIFY_SIGNATURE, output))
    elif isinstance(output, tf.estimator.export.RegressionOutput):
      found.append((REGRESS_SIGNATURE, output))
  # Several keys may hold the same output object (serving_default and its twin).
  return list(dict(found).items())


def _signatures_for(kind: str, predict, example_outputs,
                    receivers: Receivers) -> Dict[str, object]:
  """The signatures one `serving_inputs` entry asks for, in order.

  Raises:
    ConfigError: the model has no export output this receiver can serve.
  """
  if kind == "tf_example":
    if not example_outputs:
      raise ConfigError("--serving_inputs=tf_example needs a model with a "
                        "classification or regression head; drop tf_example.")
    return {name: output.as_signature_def({EXAMPLES_KEY: receivers.examples})
            for name, output in example_outputs}
  if predict is None:
    raise ConfigError(f"--serving_inputs={kind} needs a model that returns "
                      "a PredictOutput; drop it from --serving_inputs.")
  name, tensor, key = ((PREDICT_SIGNATURE, receivers.image_bytes, IMAGE_BYTES_KEY)
                       if kind == "image_bytes" else
                       (IMAGES_SIGNATURE, receivers.images, IMAGES_KEY))
  return {name: predict.as_signature_def({key: tensor})}


def build_signature_defs(export_outputs, receivers: Receivers,
                         serving_inputs: Sequence[str]) -> Dict[str, object]:
  """Signature name -> SignatureDef for the requested receivers.

  Args:
    export_outputs: the model_fn's `EstimatorSpec.export_outputs`.
    receivers: the graph's entry points (`build_receivers`).
    serving_inputs: the requested receivers; the first one's (first)
      signature is also `serving_default`.

  Returns:
    The signature map for `SavedModelBuilder`.

  Raises:
    ConfigError: a requested receiver has no matching export output.
    ValueError: a signature TF Serving would not accept.
  """
  outputs = dict(export_outputs or {})
  predict = _predict_output(outputs)
  example_outputs = _example_outputs(outputs)
  signatures, first = {}, None
  for kind in serving_inputs:
    added = _signatures_for(kind, predict, example_outputs, receivers)
    signatures.update(added)
    first = first or next(iter(added))
  signatures[DEFAULT_SIGNATURE] = signatures[first]
  for name, signature in signatures.items():
    # Estimator would drop an invalid signature with a log line; fail instead.
    if not tf.compat.v1.saved_model.is_valid_signature(signature):
      raise ValueError(f"signature {name} is not valid for TF Serving: {signature}")
  return signatures
