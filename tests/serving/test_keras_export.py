"""et-export --format=keras: the model loads in Keras 3 (the newest tensorflow-cpu, in
the second virtual environment `make test` builds) and in tf.keras 2.15, predicts what
the Estimator's SavedModel export predicts on real image bytes, and trains further with
fit: exactly the trainable weights change, frozen layers and their BatchNorm statistics
stay put. TF2 Hub backbones go through keras.layers.TFSMLayer; TF1 Hub modules are
refused in one sentence."""
import json
import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer import config as config_lib
from estimator_transfer.errors import ConfigError
from estimator_transfer.model import backbones
from estimator_transfer.serving import keras_export

import conftest
import serving_util
from transfer_helpers import tf1_module  # noqa: F401  (fixture)

KERAS3_PYTHON = os.path.join(conftest.ROOT, ".venv-keras3", "bin", "python")
CHECK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras3_check.py")
TOLERANCE = 1e-5


def _mobile_block_model(path: str) -> str:
  """A tiny MobileNet-like backbone: conv, depthwise, pointwise, BatchNorm, ReLU6, Add.

  DepthwiseConv2D and BatchNormalization are the layers whose tf.keras 2.15
  configs Keras 3 refuses unless rewritten (keras_compat).
  """
  tf.keras.utils.set_random_seed(0)
  layers = tf.keras.layers
  inputs = tf.keras.Input((conftest.IMAGE_SIZE, conftest.IMAGE_SIZE, 3), name="images")
  x = layers.ReLU(6.0, name="relu1")(layers.BatchNormalization(name="bn1")(
      layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)))
  y = layers.ReLU(6.0, name="relu2")(layers.BatchNormalization(name="bn2")(
      layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)))
  y = layers.BatchNormalization(name="bn3")(layers.Conv2D(4, 1, name="pw")(y))
  x = layers.Add(name="add")([x, y])
  model = tf.keras.Model(inputs, x, name="mobile_block")
  model.save(path)
  return path


CASES = {
    # Own Keras model, caffe value range (a fixed 1x1 conv in the export), the
    # first conv + BatchNorm frozen, EMA averages, a hidden head layer, dropout.
    "keras_model": dict(freeze__spec="first:2", optimizer__ema_decay=0.9,
                        backbone__value_range="caffe", head__hidden_units=(4,),
                        head__dropout_rate=0.1),
    # TF2 SavedModel (Hub) backbone, fine-tuned whole.
    "hub_tf2": dict(freeze__spec="none", head__hidden_units=(4,)),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_data, tiny_backbone):
  """Per case: the trained experiment, its SavedModel and its Keras export."""
  root = tmp_path_factory.mktemp("keras_export")
  handles = {"keras_model": _mobile_block_model(str(root / "mobile_block.h5")),
             "hub_tf2": tiny_backbone["saved_model"]}
  out = {}
  for name, overrides in CASES.items():
    case_root = root / name
    case_root.mkdir()
    experiment = serving_util.trained_experiment(
        case_root, tiny_data, tiny_backbone, backbone__handle=handles[name],
        run__max_steps=3, **overrides)
    checkpoint = tf.train.latest_checkpoint(experiment.config.run.model_dir)
    out[name] = {"experiment": experiment, "saved_model": experiment.export(),
                 "keras": keras_export.export_keras(experiment.config, experiment.backbone,
                                                    str(case_root / "keras"), checkpoint)}
  images, labels = serving_util.mixed_size_images()
  paths = []
  for i, data in enumerate(images):
    suffix = "jpg" if data.startswith(b"\xff\xd8") else "png"
    paths.append(str(root / f"image_{i}.{suffix}"))
    with open(paths[-1], "wb") as f:
      f.write(data)
  return {"cases": out, "images": images, "paths": paths, "labels": list(labels),
          "root": root}


def _served_probabilities(path, images):
  model = serving_util.ServedModel(path)
  try:
    sig = model.signatures["serving_default"]
    return model.session.run(sig.outputs["probabilities"].name,
                             {sig.inputs["image_bytes"].name: np.array(images, dtype=object)})
  finally:
    model.close()


def test_keras3_loads_predicts_equal_and_fits_exactly_the_trainable_weights(exports):
  assert os.path.exists(KERAS3_PYTHON), (
      f"{KERAS3_PYTHON} is missing: `make keras3-venv` (part of `make test`) builds it "
      "with the newest tensorflow-cpu from the package index")
  cases = {name: {"dir": c["keras"], "images": exports["paths"], "labels": exports["labels"]}
           for name, c in exports["cases"].items()}
  cases_path, result_path = exports["root"] / "cases.json", exports["root"] / "result.json"
  cases_path.write_text(json.dumps(cases))
  run = subprocess.run([KERAS3_PYTHON, CHECK_SCRIPT, str(cases_path), str(result_path)],
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads(result_path.read_text())
  for name, case in exports["cases"].items():
    result = results[name]
    assert int(result["keras"].split(".")[0]) >= 3, result["keras"]
    expected = _served_probabilities(case["saved_model"], exports["images"])
    diff = np.abs(np.array(result["predictions"]) - expected).max()
    assert diff <= TOLERANCE, f"{name}: Keras 3 predictions differ by {diff}"
    meta = keras_export.read_metadata(case["keras"])
    weights = result["weights"]
    # Every trainable weight moved in one fit step; nothing of a frozen layer did.
    assert all(w["changed"] for w in weights if w["trainable"]), name
    frozen = set(meta["frozen_layers"])
    assert not any(w["changed"] for w in weights if w["layer"] in frozen), name
    # Non-trainable weights that moved are the moving statistics of trained BatchNorm.
    for w in weights:
      if w["changed"] and not w["trainable"]:
        assert "moving_" in w["name"] and w["layer"] not in frozen, (name, w)
    if name == "keras_model":
      assert frozen == {"conv1", "bn1"} and meta["ema_averages"] is True
      assert {"dw", "bn2", "pw", "bn3", "head_hidden_0", "head_logits"} <= set(
          result["trainable_layers"])
      assert not any(w["changed"] for w in weights if w["layer"] == "value_range")
      assert any(w["layer"] == "bn1" and "moving_mean" in w["name"] for w in weights)
    else:
      assert meta["backbone_savedmodel"] == "backbone" and frozen == set()
      # The module's own kernels train through TFSMLayer (gradients exist in TF2).
      assert any(w["layer"] == "backbone" and "kernel" in w["name"] and w["changed"]
                 for w in weights)


def test_tf_keras_2_15_loads_the_same_file_and_metadata_names_the_input(exports):
  case = exports["cases"]["keras_model"]
  meta = keras_export.read_metadata(case["keras"])
  assert meta["class_names"] == list(conftest.CLASS_NAMES)
  assert meta["image_size"] == conftest.IMAGE_SIZE and meta["input"]["value_range"] == [0, 1]
  assert "caffe" in meta["preprocessing"]["inside_the_model"]
  model = tf.keras.models.load_model(os.path.join(case["keras"], meta["model"]))
  decoded = np.stack([
      tf.clip_by_value(tf.image.resize(tf.image.convert_image_dtype(
          tf.io.decode_image(data, channels=3, expand_animations=False), tf.float32),
          [meta["image_size"]] * 2, antialias=True), 0.0, 1.0).numpy()
      for data in exports["images"]])
  expected = _served_probabilities(case["saved_model"], exports["images"])
  assert np.abs(model.predict(decoded, verbose=0) - expected).max() <= TOLERANCE
  assert not model.get_layer("conv1").trainable and model.get_layer("dw").trainable


def test_tf1_hub_module_is_refused_in_one_sentence(tf1_module):  # noqa: F811
  resolved = backbones.resolve(config_lib.BackboneConfig(handle=tf1_module["path"]))
  with pytest.raises(ConfigError, match=r"TF1 Hub format .* Keras 3 cannot load") as e:
    keras_export.check_exportable(resolved)
  assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_et_export_format_keras_writes_a_version_and_refuses_check(exports, tmp_path):
  model_dir = exports["cases"]["keras_model"]["experiment"].config.run.model_dir
  out = tmp_path / "keras_cli"
  result = conftest.run_cli("et-export", f"--model_dir={model_dir}", f"--export_dir={out}",
                            "--format=keras")
  assert result.returncode == 0, result.stderr[-2000:]
  (version,) = os.listdir(out)
  assert sorted(os.listdir(out / version)) == ["keras_export.json", "model.keras"]
  assert f"wrote {out / version}" in result.stdout
  refused = conftest.run_cli("et-export", f"--model_dir={model_dir}",
                             f"--export_dir={tmp_path / 'other'}", "--format=keras", "--check")
  assert refused.returncode == 1 and "drop --check" in refused.stderr
  assert "Traceback" not in refused.stderr and not os.path.exists(tmp_path / "other")
