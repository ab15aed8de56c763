"""Exports: TF Serving layout, every requested signature present, EMA weights,
warmup, and the et-export --check / et-inspect-export tools."""
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer import config as config_lib
from estimator_transfer.serving import exporters
from estimator_transfer.serving import inspect as inspection
from estimator_transfer.serving import saved_model
from estimator_transfer.serving import signatures
from estimator_transfer.serving import warmup
from estimator_transfer.training import experiment as runner
from estimator_transfer.errors import ConfigError

import conftest
import serving_util

PREDICT_OUTPUTS = {"classes", "class_names", "probabilities"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data, tiny_backbone):
  root = tmp_path_factory.mktemp("export")
  experiment = serving_util.trained_experiment(root, tiny_data, tiny_backbone)
  return {"root": root, "experiment": experiment,
          "checkpoint": tf.train.latest_checkpoint(experiment.config.run.model_dir)}


def _options(**kwargs):
  kwargs.setdefault("serving_inputs", ("image_bytes", "tf_example", "image_tensor"))
  return signatures.ExportOptions(image_size=conftest.IMAGE_SIZE, **kwargs)


def _listing(path):
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def test_versions_are_numeric_complete_and_pruned(trained, tmp_path):
  export_dir = str(tmp_path / "serving")
  experiment = trained["experiment"]
  paths = [saved_model.export_saved_model(experiment.estimator, export_dir,
                                         _options(exports_to_keep=2))
           for _ in range(3)]
  versions = [int(os.path.basename(p)) for p in paths]
  assert versions == sorted(set(versions))  # strictly increasing, even within a second
  # Only the newest two remain; nothing temporary is left behind.
  assert _listing(export_dir) == [str(v) for v in versions[1:]]
  for path in paths[1:]:
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert os.path.exists(os.path.join(path, "variables", "variables.index"))
    metadata = saved_model.read_metadata(path)
    assert metadata["global_step"] == 6 and metadata["image_size"] == conftest.IMAGE_SIZE


def _break(path):
  raise ConfigError("verification said no")


@pytest.mark.parametrize("failure", ["bad_checkpoint", "verify"])
def test_failed_export_publishes_nothing(trained, tmp_path, failure):
  export_dir = str(tmp_path / "serving")
  experiment = trained["experiment"]
  good = saved_model.export_saved_model(experiment.estimator, export_dir, _options())
  before = _listing(export_dir)
  if failure == "bad_checkpoint":
    # A checkpoint that lacks the model's variables: restore fails mid-export.
    with tf.Graph().as_default():
      step = tf.compat.v1.train.get_or_create_global_step()
      with tf.compat.v1.Session() as sess:
        sess.run(step.initializer)
        bad = tf.compat.v1.train.Saver([step]).save(sess, str(tmp_path / "bad.ckpt"))
    with pytest.raises(tf.errors.NotFoundError):
      saved_model.export_saved_model(experiment.estimator, export_dir, _options(),
                                    checkpoint_path=bad)
  else:
    with pytest.raises(ConfigError, match="verification said no"):
      saved_model.export_saved_model(experiment.estimator, export_dir, _options(),
                                    verify=_break)
  assert _listing(export_dir) == before == [os.path.basename(good)]


@pytest.mark.parametrize("serving_inputs, features, expected", [
    (("image_bytes", "tf_example", "image_tensor"), False,
     {"serving_default": "predict", "predict": "predict", "classify": "classify",
      "predict_images": "predict"}),
    (("tf_example",), False, {"serving_default": "classify", "classify": "classify"}),
    (("image_tensor", "image_bytes"), True,
     {"serving_default": "predict", "predict_images": "predict", "predict": "predict"}),
])
def test_signatures_follow_serving_inputs(trained, tmp_path, serving_inputs, features,
                                          expected):
  cfg = trained["experiment"].config.replace(export__export_features=features)
  experiment = runner.Experiment(cfg)
  path = saved_model.export_saved_model(
      experiment.estimator, str(tmp_path / "serving"),
      _options(serving_inputs=serving_inputs))
  infos = {i.name: i for i in inspection.describe(path)}
  # Exactly the requested signatures: none dropped with only a log line.
  assert set(infos) == set(expected)
  for name, method in expected.items():
    assert infos[name].method == f"tensorflow/serving/{method}"
  first = {"image_bytes": "predict", "tf_example": "classify",
           "image_tensor": "predict_images"}[serving_inputs[0]]
  assert infos["serving_default"].inputs == infos[first].inputs
  if "predict" in infos:
    (spec,) = infos["predict"].inputs
    # REST clients send {"b64": ...} for this input; any batch size.
    assert (spec.key, spec.dtype, spec.shape) == ("image_bytes", "string", (-1,))
    outputs = {s.key for s in infos["predict"].outputs}
    assert outputs == PREDICT_OUTPUTS | ({"features"} if features else set())
  if "predict_images" in infos:
    (spec,) = infos["predict_images"].inputs
    assert (spec.key, spec.dtype, spec.shape) == ("images", "float32", (-1, 16, 16, 3))
  if "classify" in infos:
    assert [s.key for s in infos["classify"].inputs] == ["inputs"]
    assert {s.key: s.dtype for s in infos["classify"].outputs} == \
        {"classes": "string", "scores": "float32"}
  assert not inspection.failures(inspection.check_saved_model(path))


def test_regression_head_gets_a_regress_signature(make_config, tmp_path):
  cfg = make_config(head__kind="regression", head__num_classes=0, head__class_names=(),
                    run__max_steps=2)
  experiment = runner.Experiment(cfg)
  experiment.train()
  path = saved_model.export_saved_model(
      experiment.estimator, str(tmp_path / "serving"),
      _options(serving_inputs=("tf_example", "image_bytes")))
  infos = {i.name: i for i in inspection.describe(path)}
  assert set(infos) == {"serving_default", "regress", "predict"}
  assert infos["serving_default"].method == "tensorflow/serving/regress"
  assert not inspection.failures(inspection.check_saved_model(path))
  images, labels = serving_util.mixed_size_images()
  records = serving_util.write_records(str(tmp_path / "r.tfrecord"), images, labels)
  expected = [p["outputs"][0] for p in serving_util.estimator_predict(experiment, records)]
  model = serving_util.ServedModel(path)
  sig = model.signatures["regress"]
  examples = [tf.train.Example(features=tf.train.Features(feature={
      "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[i]))}))
              .SerializeToString() for i in images]
  got = model.session.run(sig.outputs["outputs"].name,
                          {sig.inputs["inputs"].name: np.array(examples, dtype=object)})
  model.close()
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_tf_example_needs_a_classify_or_regress_output(tmp_path):
  def model_fn(features, labels, mode):
    outputs = {"x": tf.reduce_mean(features["image"], axis=[1, 2, 3])}
    return tf.estimator.EstimatorSpec(mode, predictions=outputs, export_outputs={
        "serving_default": tf.estimator.export.PredictOutput(outputs)})

  with tf.Graph().as_default():  # a checkpoint for a model without variables
    step = tf.compat.v1.train.get_or_create_global_step()
    with tf.compat.v1.Session() as sess:
      sess.run(step.initializer)
      tf.compat.v1.train.Saver().save(sess, str(tmp_path / "m" / "model.ckpt"), 0)
  estimator = tf.compat.v1.estimator.Estimator(model_fn, str(tmp_path / "m"))
  with pytest.raises(ConfigError, match="tf_example needs a model with a classification"):
    saved_model.export_saved_model(estimator, str(tmp_path / "s"),
                                  _options(serving_inputs=("tf_example",)))
  assert _listing(str(tmp_path / "s")) == []
  # The same model exports its predict signature; any Estimator can be exported.
  path = saved_model.export_saved_model(
      estimator, str(tmp_path / "s"), _options(serving_inputs=("image_bytes", "image_tensor")))
  assert {i.name for i in inspection.describe(path)} == \
      {"serving_default", "predict", "predict_images"}


def _write_ema_checkpoint(source_checkpoint, model_dir, bias):
  """The trained variables plus EMA shadows: head kernel 0, head bias `bias`."""
  reader = tf.train.load_checkpoint(source_checkpoint)
  values = {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}
  shadows = {f"{n}/ExponentialMovingAverage": v for n, v in values.items()
             if n != "global_step" and "Momentum" not in n}
  shadows["head_logits/kernel/ExponentialMovingAverage"] = np.zeros_like(
      values["head_logits/kernel"])
  shadows["head_logits/bias/ExponentialMovingAverage"] = np.asarray(bias, np.float32)
  with tf.Graph().as_default():
    variables = {n: tf.compat.v1.Variable(v, name=n.replace("/", "_"))
                 for n, v in {**values, **shadows}.items()}
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      os.makedirs(model_dir, exist_ok=True)
      return tf.compat.v1.train.Saver(variables).save(
          sess, os.path.join(model_dir, "model.ckpt"), global_step=int(values["global_step"]))


def test_ema_exports_and_predictions_use_the_averaged_weights(trained, tmp_path):
  experiment = trained["experiment"]
  bias = np.log([1.0, 2.0, 1.0])  # softmax -> [0.25, 0.5, 0.25] for every image
  model_dir = str(tmp_path / "ema_model")
  checkpoint = _write_ema_checkpoint(trained["checkpoint"], model_dir, bias)
  images, _ = serving_util.mixed_size_images()
  probabilities = {}
  for use_ema in (True, False):
    path = saved_model.export_saved_model(
        experiment.estimator, str(tmp_path / f"serving_{use_ema}"),
        _options(use_ema=use_ema, serving_inputs=("image_bytes",)), checkpoint)
    model = serving_util.ServedModel(path)
    sig = model.signatures["predict"]
    probabilities[use_ema] = model.session.run(
        sig.outputs["probabilities"].name,
        {sig.inputs["image_bytes"].name: np.array(images, dtype=object)})
    model.close()
  np.testing.assert_allclose(probabilities[True], [[0.25, 0.5, 0.25]] * len(images),
                             rtol=1e-5)
  assert not np.allclose(probabilities[False], probabilities[True], atol=1e-3)
  # Estimator.predict restores the same averages when the config has EMA on.
  cfg = experiment.config.replace(optimizer__ema_decay=0.99, run__model_dir=model_dir)
  records = serving_util.write_records(str(tmp_path / "r.tfrecord"), images, [0] * 6)
  predicted = serving_util.estimator_predict(runner.Experiment(cfg), records)
  np.testing.assert_allclose([p["probabilities"] for p in predicted],
                             probabilities[True], rtol=1e-5)


def test_ema_without_averages_in_checkpoint_is_clear_error(trained, tmp_path):
  with pytest.raises(ConfigError, match="no moving-average variables"):
    saved_model.export_saved_model(trained["experiment"].estimator, str(tmp_path / "s"),
                                  _options(use_ema=True))
  assert _listing(str(tmp_path / "s")) == []


def test_warmup_images_are_real_decodable_eval_records(tmp_path):
  good = [conftest.encode(conftest.make_image(i, np.random.RandomState(i))) for i in range(3)]
  records = serving_util.write_records(str(tmp_path / "e.tfrecord"),
                                       [b"not an image", good[0], b"", good[1], good[2]],
                                       [0, 0, 0, 1, 2])
  # Undecodable and empty records are skipped: a failing warmup request would
  # make TF Serving refuse the whole version.
  assert warmup.read_warmup_images(records, "image/encoded", 2, 16) == tuple(good[:2])
  with pytest.raises(ConfigError, match="--serving_warmup needs --eval_data"):
    warmup.read_warmup_images("", "image/encoded", 2, 16)
  with pytest.raises(ConfigError, match="no decodable images under 'image/other'"):
    warmup.read_warmup_images(records, "image/other", 2, 16)


@pytest.mark.parametrize("overrides, message", [
    (dict(export__serving_inputs=("jpeg",)), "--serving_inputs=jpeg is invalid"),
    (dict(export__serving_inputs=("tf_example",), head__kind="regression",
          head__num_outputs=2, head__num_classes=0, head__class_names=()),
     "the head has 2 outputs"),
    (dict(export__serving_inputs=("tf_example", "tf_example")), "names an input twice"),
    (dict(guards__metric_mode="up"), "--metric_mode=up is invalid"),
    (dict(export__best_metric=" "), "--best_metric must name an eval metric"),
    (dict(export__serving_warmup=5000), "--serving_warmup=5000 must be between"),
])
def test_export_settings_are_validated(make_config, overrides, message):
  with pytest.raises(ConfigError, match=message):
    make_config(**overrides).validate()


def test_old_saved_configs_still_load():
  old = {"export": {"export_dir": "/x", "exports_to_keep": 3}}
  cfg = config_lib.ExperimentConfig.from_dict(old)
  assert cfg.export.serving_inputs == ()  # all that the head can serve
  assert exporters.serving_inputs(cfg) == config_lib.SERVING_INPUTS
  multi = cfg.replace(head__kind="regression", head__num_outputs=2)
  assert exporters.serving_inputs(multi) == ("image_bytes", "image_tensor")
  assert cfg.export.best_metric == "accuracy" and cfg.export.serving_warmup == 0


def test_et_export_check_then_inspect(trained, tmp_path):
  model_dir = trained["experiment"].config.run.model_dir
  export_dir = str(tmp_path / "serving")
  result = serving_util.run_tool("et-export", f"--model_dir={model_dir}",
                                 f"--export_dir={export_dir}", "--check",
                                 "--serving_inputs=tf_example,image_bytes")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "signature 'serving_default'  method tensorflow/serving/classify" in result.stdout
  assert "FAIL" not in result.stdout and "ok  classify" in result.stdout
  (version,) = _listing(export_dir)
  assert f"wrote {os.path.join(export_dir, version)}" in result.stdout
  result = serving_util.run_tool("et-inspect-export", f"--export_dir={export_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "input  inputs          string   [n]" in result.stdout
  assert "all 3 checks passed" in result.stdout


def _broken_saved_model(path):
  """Loads fine, but its serving_default fails whenever it runs."""
  with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    x = tf.compat.v1.placeholder(tf.float32, [None], name="x")
    check = tf.debugging.assert_less(x, -1.0, message="always fails")
    with tf.control_dependencies([check]):
      y = tf.identity(x)
    builder = tf.compat.v1.saved_model.Builder(path)
    builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map={
        "serving_default": tf.compat.v1.saved_model.predict_signature_def({"x": x},
                                                                          {"y": y})})
    builder.save()


def test_inspect_exits_1_when_a_signature_fails(tmp_path):
  path = str(tmp_path / "broken" / "1")
  _broken_saved_model(path)
  results = inspection.check_saved_model(path)
  assert [(r.name, r.ok) for r in results] == [("serving_default", False)]
  assert "always fails" in results[0].message
  result = serving_util.run_tool("et-inspect-export", f"--export_dir={tmp_path / 'broken'}")
  error = serving_util.one_error_line(result, "et-inspect-export")
  assert "1 of 1 checks failed, first 'serving_default'" in error
  assert "FAIL serving_default" in result.stdout  # the table still printed


def test_ema_training_exports_the_averages(make_config, tmp_path):
  cfg = make_config(optimizer__ema_decay=0.5, run__max_steps=4, schedule__values=(0.2,))
  experiment = runner.Experiment(cfg)
  experiment.train()
  images, labels = serving_util.mixed_size_images()
  records = serving_util.write_records(str(tmp_path / "r.tfrecord"), images, labels)
  expected = [p["probabilities"] for p in serving_util.estimator_predict(experiment, records)]
  served = {}
  for use_ema in (True, False):
    if use_ema:  # the config's EMA setting, as et-export and et-train export
      path = experiment.export(export_dir=str(tmp_path / "serving"))
      assert saved_model.read_metadata(path)["ema"] is True
    else:
      path = saved_model.export_saved_model(experiment.estimator, str(tmp_path / "raw"),
                                           _options(serving_inputs=("image_bytes",)))
    model = serving_util.ServedModel(path)
    sig = model.signatures["serving_default"]
    served[use_ema] = model.session.run(
        sig.outputs["probabilities"].name,
        {sig.inputs["image_bytes"].name: np.array(images, dtype=object)})
    model.close()
  np.testing.assert_allclose(served[True], expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(served[False], served[True], atol=1e-4)
