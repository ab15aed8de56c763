"""Test helpers for the export tests: a trained tiny model, and TF Serving's
request handling re-done in Python.

`serve_predict` / `serve_classify` follow tensorflow_serving's
servables/tensorflow/predict_util.cc and classifier.cc (2.15): the SavedModel
is loaded with the TF1 loader (SavedModelBundle), request tensors are fed by
the tensor names their aliases map to in the SignatureDef, and the answers are
checked and packed as the server does (classify: string classes and float
scores of shape [batch, k], one Classification per example).
"""
import base64
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import predict_pb2

from estimator_transfer import config as config_lib
from estimator_transfer.training import experiment as runner
from estimator_transfer.data import tfrecords

import conftest

BIN = os.path.dirname(sys.executable)


def experiment_config(root, tiny_data, tiny_backbone, **overrides):
  """The conftest `make_config` settings, for module-scoped fixtures."""
  cfg = config_lib.ExperimentConfig(
      backbone=config_lib.BackboneConfig(handle=tiny_backbone["h5"]),
      head=config_lib.HeadConfig(num_classes=3, class_names=conftest.CLASS_NAMES),
      freeze=config_lib.FreezeConfig("none"),
      schedule=config_lib.ScheduleConfig(values=(0.05,)),
      input=config_lib.InputConfig(train_data=tiny_data["train"],
                                   eval_data=tiny_data["eval"], batch_size=8,
                                   shuffle_buffer=64),
      run=config_lib.RunConfig(model_dir=str(root / "model"), max_steps=6,
                               save_checkpoints_steps=3, log_every_steps=3, seed=7),
      export=config_lib.ExportConfig(export_dir=str(root / "export")))
  return cfg.replace(**overrides) if overrides else cfg


def trained_experiment(root, tiny_data, tiny_backbone, **overrides):
  experiment = runner.Experiment(experiment_config(root, tiny_data, tiny_backbone,
                                                   **overrides))
  experiment.train()
  return experiment


def mixed_size_images(seed=5):
  """(encoded images, labels): PNG and JPEG, RGB, grey and RGBA, many sizes."""
  rng = np.random.RandomState(seed)
  shapes = [(16, 16, 3, "png"), (23, 31, 3, "jpg"), (40, 20, 3, "png"),
            (9, 12, 1, "png"), (30, 30, 4, "png"), (64, 48, 3, "jpg")]
  images, labels = [], []
  for i, (h, w, c, fmt) in enumerate(shapes):
    label = i % 3
    rgb = conftest.make_image(label, rng, size=max(h, w))[:h, :w]
    if c == 1:
      pixels = rgb[..., label:label + 1]
    elif c == 4:
      pixels = np.concatenate([rgb, np.full((h, w, 1), 255, np.uint8)], -1)
    else:
      pixels = rgb
    encoded = (tf.io.encode_png(pixels) if fmt == "png" else
               tf.io.encode_jpeg(pixels)).numpy()
    images.append(encoded)
    labels.append(label)
  return images, labels


def write_records(path, images, labels):
  """One TFRecord file (order preserved, unlike interleaved shards)."""
  with tf.io.TFRecordWriter(path) as writer:
    for image, label in zip(images, labels):
      writer.write(tfrecords.make_example(image, label).SerializeToString())
  return path


def estimator_predict(experiment, data):
  """Estimator.predict over `data` through the training input pipeline."""
  return list(experiment.estimator.predict(experiment.input_fn(data, training=False)))


def run_tool(tool, *args, timeout=300):
  """Runs an installed console script (.venv/bin/et-*) in a subprocess."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([os.path.join(BIN, tool)] + list(args), env=env,
                        capture_output=True, text=True, timeout=timeout)


def one_error_line(result, prog):
  assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
  assert "Traceback" not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith(f"{prog}: error: ")]
  assert len(errors) == 1, result.stderr
  return errors[0]


class ServedModel:
  """A SavedModel loaded as TF Serving loads it, answering request protos."""

  def __init__(self, path):
    self.graph = tf.Graph()
    self.session = tf.compat.v1.Session(graph=self.graph)
    with self.graph.as_default():
      meta_graph = tf.compat.v1.saved_model.loader.load(
          self.session, [tf.saved_model.SERVING], path)
    self.signatures = dict(meta_graph.signature_def)

  def close(self):
    self.session.close()

  def _signature(self, request):
    name = request.model_spec.signature_name or "serving_default"
    if name not in self.signatures:
      raise ValueError(f"Serving signature name: \"{name}\" not found in signature def")
    return self.signatures[name]

  def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    signature = self._signature(request)
    if signature.method_name not in (tf.saved_model.PREDICT_METHOD_NAME,
                                     tf.saved_model.CLASSIFY_METHOD_NAME,
                                     tf.saved_model.REGRESS_METHOD_NAME):
      raise ValueError("Expected prediction signature method_name")
    if len(request.inputs) != len(signature.inputs):
      raise ValueError("input size does not match signature")
    feed = {}
    for alias, proto in request.inputs.items():
      if alias not in signature.inputs:
        raise ValueError(f"input tensor alias not found in signature: {alias}")
      feed[signature.inputs[alias].name] = tf.make_ndarray(proto)
    aliases = list(request.output_filter) or sorted(signature.outputs)
    for alias in aliases:
      if alias not in signature.outputs:
        raise ValueError(f"output tensor alias not found in signature: {alias}")
    values = self.session.run([signature.outputs[a].name for a in aliases], feed)
    response = predict_pb2.PredictResponse()
    response.model_spec.CopyFrom(request.model_spec)
    for alias, value in zip(aliases, values):
      response.outputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return response

  def classify(self, request: classification_pb2.ClassificationRequest
               ) -> classification_pb2.ClassificationResponse:
    signature = self._signature(request)
    if signature.method_name != tf.saved_model.CLASSIFY_METHOD_NAME:
      raise ValueError("Expected classification signature method_name to be "
                       "tensorflow/serving/classify")
    if len(signature.inputs) != 1:
      raise ValueError("Expected one input Tensor.")
    if not 1 <= len(signature.outputs) <= 2:
      raise ValueError("Expected one or two output Tensors")
    kind = request.input.WhichOneof("kind")
    if kind == "example_list":
      examples = list(request.input.example_list.examples)
    else:  # example_list_with_context: context features merged into each
      context = request.input.example_list_with_context.context
      examples = []
      for example in request.input.example_list_with_context.examples:
        merged = tf.train.Example()
        merged.CopyFrom(context)
        merged.MergeFrom(example)
        examples.append(merged)
    serialized = np.array([e.SerializeToString() for e in examples], dtype=object)
    names = {k: v.name for k, v in signature.outputs.items()
             if k in (tf.saved_model.CLASSIFY_OUTPUT_CLASSES,
                      tf.saved_model.CLASSIFY_OUTPUT_SCORES)}
    if not names:
      raise ValueError("Expected classification signature outputs to contain at "
                       "least one of classes/scores")
    input_name = next(iter(signature.inputs.values())).name
    out = self.session.run(names, {input_name: serialized})
    classes, scores = out.get("classes"), out.get("scores")
    for value, dtype in ((classes, object), (scores, np.float32)):
      if value is None:
        continue
      if value.dtype != dtype or value.ndim != 2:
        raise ValueError("Expected Tensor shape: [batch_size num_classes]")
      if value.shape[0] != len(examples):
        raise ValueError("Input batch size did not match output batch size")
    if classes is not None and scores is not None and classes.shape != scores.shape:
      raise ValueError("Tensors class and score should match in dim[1]")
    response = classification_pb2.ClassificationResponse()
    response.model_spec.CopyFrom(request.model_spec)
    for i in range(len(examples)):
      classification = response.result.classifications.add()
      for c in range((classes if classes is not None else scores).shape[1]):
        entry = classification.classes.add()
        if classes is not None:
          entry.label = classes[i, c]
        if scores is not None:
          entry.score = scores[i, c]
    return response

  def rest_predict(self, body: dict) -> dict:
    """TF Serving's REST :predict for the row ("instances") format.

    As http_rest_api_handler / json_tensor.cc: {"b64": ...} objects become
    bytes; a bare value per instance is allowed when the signature has one
    input; the answer is {"predictions": [...]} with one entry per instance
    (a dict of outputs when there are several).
    """
    signature = self.signatures[body.get("signature_name", "serving_default")]
    instances = body["instances"]

    def decode(value):
      if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
      return value

    feed = {}
    for alias, info in signature.inputs.items():
      column = [decode(i[alias] if isinstance(i, dict) and "b64" not in i else i)
                for i in instances] if len(signature.inputs) == 1 else \
          [decode(i[alias]) for i in instances]
      feed[info.name] = np.array(column, dtype=object if info.dtype == tf.string.as_datatype_enum
                                 else tf.as_dtype(info.dtype).as_numpy_dtype)
    aliases = sorted(signature.outputs)
    values = self.session.run([signature.outputs[a].name for a in aliases], feed)
    predictions = []
    for i in range(len(instances)):
      row = {a: (v[i].decode() if isinstance(v[i], bytes) else v[i].tolist())
             for a, v in zip(aliases, values)}
      predictions.append(row if len(aliases) > 1 else row[aliases[0]])
    return {"predictions": predictions}
