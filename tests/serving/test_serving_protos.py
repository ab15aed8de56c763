"""Requests built with TF Serving's own protos get Estimator.predict's answers.

The export is loaded as TF Serving loads it; PredictRequest and
ClassificationRequest (tensorflow-serving-api 2.15) are mapped onto the
signatures as the server maps them (tests/serving_util.py), and the answers
must equal `Estimator.predict` through the training input pipeline, for
images of other sizes, formats and channel counts than the training data.
"""
import base64
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2

from estimator_transfer.serving import signatures
from estimator_transfer.data import preprocessing

import conftest
import serving_util

WARMUP = 3


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_data, tiny_backbone):
  root = tmp_path_factory.mktemp("serving_protos")
  experiment = serving_util.trained_experiment(
      root, tiny_data, tiny_backbone, export__export_features=True,
      export__serving_warmup=WARMUP)
  images, labels = serving_util.mixed_size_images()
  records = serving_util.write_records(str(root / "requests.tfrecord"), images, labels)
  expected = serving_util.estimator_predict(experiment, records)
  path = experiment.export()
  model = serving_util.ServedModel(path)
  yield {"experiment": experiment, "path": path, "model": model, "images": images,
         "expected": expected}
  model.close()


def _expected(served, key):
  return np.stack([p[key] for p in served["expected"]])


def _image_tensor(images):
  return np.stack([preprocessing.decode_and_resize(tf.constant(i), conftest.IMAGE_SIZE)
                   .numpy() for i in images])


@pytest.mark.parametrize("signature, key", [
    ("serving_default", "image_bytes"),
    ("predict", "image_bytes"),
    ("predict_images", "images"),
])
def test_predict_request_answers_like_estimator_predict(served, signature, key):
  images = served["images"]
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "tiny"
  request.model_spec.signature_name = signature
  value = (np.array(images, dtype=object) if key == "image_bytes"
           else _image_tensor(images))
  request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
  response = served["model"].predict(request)
  out = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
  assert set(out) == {"classes", "class_names", "probabilities", "features"}
  np.testing.assert_allclose(out["probabilities"], _expected(served, "probabilities"),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["features"], _expected(served, "features"),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["classes"], _expected(served, "classes"))
  np.testing.assert_array_equal(out["class_names"], _expected(served, "class_names"))
  assert set(out["class_names"]) <= {n.encode() for n in conftest.CLASS_NAMES}


def test_output_filter_returns_only_the_asked_outputs(served):
  request = predict_pb2.PredictRequest()
  request.inputs["image_bytes"].CopyFrom(
      tf.make_tensor_proto(np.array(served["images"][:2], dtype=object)))
  request.output_filter.append("class_names")
  response = served["model"].predict(request)
  assert list(response.outputs) == ["class_names"]
  np.testing.assert_array_equal(tf.make_ndarray(response.outputs["class_names"]),
                                _expected(served, "class_names")[:2])


@pytest.mark.parametrize("with_context", [False, True])
def test_classification_request_answers_like_estimator_predict(served, with_context):
  request = classification_pb2.ClassificationRequest()
  request.model_spec.signature_name = "classify"
  examples = [tf.train.Example(features=tf.train.Features(feature={
      "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[i]))}))
              for i in served["images"]]
  if with_context:
    ctx = request.input.example_list_with_context
    ctx.context.features.feature["image/format"].bytes_list.value.append(b"mixed")
    ctx.examples.extend(examples)
  else:
    request.input.example_list.examples.extend(examples)
  response = served["model"].classify(request)
  probabilities = _expected(served, "probabilities")
  assert len(response.result.classifications) == len(served["images"])
  for row, classification in zip(probabilities, response.result.classifications):
    # Every label of the label map, in class-id order, with its probability.
    assert [c.label for c in classification.classes] == list(conftest.CLASS_NAMES)
    np.testing.assert_allclose([c.score for c in classification.classes], row,
                               rtol=1e-5, atol=1e-6)


def test_rest_b64_instances_are_decoded_and_answered(served):
  body = {"signature_name": "serving_default",
          "instances": [{"b64": base64.b64encode(i).decode()} for i in served["images"]]}
  answer = served["model"].rest_predict(body)
  assert [p["class_names"] for p in answer["predictions"]] == \
      [n.decode() for n in _expected(served, "class_names")]
  # Named form, as clients that name the input send it.
  body = {"instances": [{"image_bytes": {"b64": base64.b64encode(served["images"][1]).decode()}}]}
  np.testing.assert_allclose(served["model"].rest_predict(body)["predictions"][0]
                             ["probabilities"], _expected(served, "probabilities")[1],
                             rtol=1e-5, atol=1e-6)


def test_tf2_loader_calls_the_signatures_by_input_name(served):
  loaded = tf.saved_model.load(served["path"])
  out = loaded.signatures["serving_default"](
      image_bytes=tf.constant(served["images"], dtype=tf.string))
  np.testing.assert_allclose(out["probabilities"].numpy(),
                             _expected(served, "probabilities"), rtol=1e-5, atol=1e-6)
  out = loaded.signatures["classify"](
      inputs=tf.constant([tf.train.Example(features=tf.train.Features(feature={
          "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[i]))}))
                          .SerializeToString() for i in served["images"]]))
  np.testing.assert_allclose(out["scores"].numpy(), _expected(served, "probabilities"),
                             rtol=1e-5, atol=1e-6)


def test_warmup_file_replays_through_the_server(served, tiny_data):
  path = os.path.join(served["path"], "assets.extra", "tf_serving_warmup_requests")
  logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
          for r in tf.data.TFRecordDataset(path)]
  by_signature = {}
  for entry in logs:
    kind = entry.WhichOneof("log_type")
    request = getattr(entry, kind).request
    by_signature[request.model_spec.signature_name] = (kind, request)
  assert set(by_signature) == {"serving_default", "predict", "classify", "predict_images"}
  kind, request = by_signature["classify"]
  assert kind == "classify_log"
  assert len(served["model"].classify(request).result.classifications) == WARMUP
  # The images are the first records of the eval set, as they are stored there.
  shards = sorted(tf.io.gfile.glob(os.path.join(tiny_data["eval"], "*.tfrecord")))
  eval_images = [tf.train.Example.FromString(r.numpy()).features
                 .feature["image/encoded"].bytes_list.value[0]
                 for r in tf.data.TFRecordDataset(shards).take(WARMUP)]
  kind, request = by_signature["serving_default"]
  assert kind == "predict_log"
  sent = tf.make_ndarray(request.inputs[signatures.IMAGE_BYTES_KEY])
  assert list(sent) == list(eval_images) and len(sent) == WARMUP
  for name in ("serving_default", "predict", "predict_images"):
    response = served["model"].predict(by_signature[name][1])
    assert tf.make_ndarray(response.outputs["probabilities"]).shape == (WARMUP, 3)
