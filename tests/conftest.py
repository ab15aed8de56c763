"""Shared fixtures: tiny learnable image data and tiny pretrained backbones.

Everything is built locally (no network): 16x16 PNG images in 3 classes whose
colour says the class, a 2-conv/BatchNorm Keras CNN saved as a Keras .h5 model,
a weights-only .h5 and a TF2 SavedModel (a local TF-Hub handle).
"""
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# `make test` runs two workers on two cores, and each starts TensorFlow
# processes of its own: one intra-op thread each (set for every child process
# too) instead of several per process competing for the same two cores.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from estimator_transfer import config as config_lib  # noqa: E402
from estimator_transfer.data import labels as labels_lib  # noqa: E402
from estimator_transfer.data import tfrecords  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 16
CLASS_NAMES = ("red", "green", "blue")


def make_image(label: int, rng, size: int = IMAGE_SIZE) -> np.ndarray:
  """uint8 [size, size, 3]: noise with the class's colour channel raised."""
  image = rng.uniform(0, 90, (size, size, 3))
  image[..., label] += 150
  return image.astype(np.uint8)


def encode(image: np.ndarray, fmt: str = "png") -> bytes:
  if fmt == "png":
    return tf.io.encode_png(image).numpy()
  return tf.io.encode_jpeg(image).numpy()


def write_tfrecord_split(out_dir: str, count: int, seed: int, shards: int = 2):
  rng = np.random.RandomState(seed)
  examples = []
  for i in range(count):
    label = i % len(CLASS_NAMES)
    examples.append(tfrecords.make_example(encode(make_image(label, rng)), label,
                                           CLASS_NAMES[label]))
  tfrecords.write_shards(examples, out_dir, os.path.basename(out_dir), shards)
  labels_lib.write_labels_file(os.path.join(out_dir, "labels.txt"), CLASS_NAMES)
  return out_dir


def build_tiny_cnn(size: int = IMAGE_SIZE, seed: int = 0) -> tf.keras.Model:
  """conv-BN-ReLU x2, global average pool -> 8 features (4 weighted layers)."""
  tf.keras.utils.set_random_seed(seed)
  inputs = tf.keras.Input((size, size, 3), name="images")
  x = tf.keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)
  x = tf.keras.layers.BatchNormalization(momentum=0.5, name="bn1")(x)
  x = tf.keras.layers.ReLU(name="relu1")(x)
  x = tf.keras.layers.Conv2D(8, 3, padding="same", name="conv2")(x)
  x = tf.keras.layers.BatchNormalization(momentum=0.5, name="bn2")(x)
  x = tf.keras.layers.ReLU(name="relu2")(x)
  x = tf.keras.layers.GlobalAveragePooling2D(name="features")(x)
  return tf.keras.Model(inputs, x, name="tiny_cnn")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
  """{'train': dir, 'eval': dir, 'images': image-folder dir} with 3 classes."""
  root = tmp_path_factory.mktemp("tiny_data")
  train = write_tfrecord_split(str(root / "train"), 48, seed=1)
  evaluation = write_tfrecord_split(str(root / "eval"), 24, seed=2)
  images = root / "images"
  rng = np.random.RandomState(3)
  for i in range(18):
    label = i % 3
    folder = images / CLASS_NAMES[label]
    folder.mkdir(parents=True, exist_ok=True)
    fmt = "jpg" if i % 2 else "png"
    (folder / f"img_{i}.{fmt}").write_bytes(encode(make_image(label, rng), fmt))
  return {"train": train, "eval": evaluation, "images": str(images)}


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
  """The tiny CNN with non-trivial BN statistics, saved three ways."""
  root = tmp_path_factory.mktemp("tiny_backbone")
  model = build_tiny_cnn()
  # Give BatchNorm non-default moving statistics and gamma/beta, so "stayed
  # equal to the pretrained values" cannot pass by accident.
  for layer in model.layers:
    if isinstance(layer, tf.keras.layers.BatchNormalization):
      n = layer.moving_mean.shape[0]
      layer.set_weights([np.linspace(0.5, 1.5, n), np.linspace(-0.2, 0.2, n),
                         np.linspace(0.1, 0.3, n), np.linspace(1.0, 2.0, n)])
  h5 = str(root / "tiny.h5")
  weights = str(root / "tiny_weights.h5")
  saved_model = str(root / "tiny_saved_model")
  model.save(h5)
  model.save_weights(weights)
  tf.saved_model.save(model, saved_model)
  values = {w.name.split(":")[0]: w.numpy() for w in model.weights}
  return {"h5": h5, "weights": weights, "saved_model": saved_model, "values": values}


@pytest.fixture
def make_config(tiny_data, tiny_backbone, tmp_path):
  """Factory: a small valid ExperimentConfig; keyword overrides `section__field`."""

  def factory(**overrides):
    cfg = config_lib.ExperimentConfig(
        backbone=config_lib.BackboneConfig(handle=tiny_backbone["h5"]),
        head=config_lib.HeadConfig(num_classes=3, class_names=CLASS_NAMES),
        freeze=config_lib.FreezeConfig("none"),
        schedule=config_lib.ScheduleConfig(values=(0.05,)),
        input=config_lib.InputConfig(train_data=tiny_data["train"],
                                     eval_data=tiny_data["eval"], batch_size=8,
                                     shuffle_buffer=64),
        run=config_lib.RunConfig(model_dir=str(tmp_path / "model"), max_steps=6,
                                 save_checkpoints_steps=3, log_every_steps=3, seed=7),
        export=config_lib.ExportConfig(export_dir=str(tmp_path / "export")))
    return cfg.replace(**overrides) if overrides else cfg

  return factory


def run_cli(tool: str, *args, cwd=ROOT, env=None, timeout=300):
  """Runs a console script's module in a subprocess; returns CompletedProcess."""
  full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  full_env.update(env or {})
  module = {"et-train": "train", "et-evaluate": "evaluate", "et-export": "export"}.get(tool)
  cmd = [sys.executable, "-m", f"estimator_transfer.cli.{module}"] if module else [tool]
  return subprocess.run(cmd + list(args), cwd=cwd, env=full_env, capture_output=True,
                        text=True, timeout=timeout)


def checkpoint_values(model_dir: str) -> dict:
  """name -> value for every variable in the latest checkpoint."""
  path = tf.train.latest_checkpoint(model_dir)
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def initial_checkpoint_values(model_dir: str) -> dict:
  """name -> value in model.ckpt-0: what training started from.

  Estimator saves it before the first step, after pretrained weights were
  loaded, so "it trained" and "it stayed frozen" compare with real starting
  values (a Glorot kernel is never close to 0).
  """
  prefix = os.path.join(model_dir, "model.ckpt-0")
  assert tf.io.gfile.exists(prefix + ".index"), f"no step-0 checkpoint in {model_dir}"
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def assert_moved(trained: dict, initial: dict, name: str, min_change: float = 1e-3):
  """`name` changed from its initial value by more than `min_change` (max abs)."""
  change = float(np.abs(trained[name] - initial[name]).max())
  assert change > min_change, \
      f"{name} moved by at most {change:g} from its initial value (> {min_change:g} expected)"
  return change


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
  """The real digits demo data and demo backbone, built by the demo scripts.

  Small settings (16 px images, 1 pretraining epoch) keep it quick; the
  scripts and file layout are exactly those `make demo` uses.
  """
  root = tmp_path_factory.mktemp("demo")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  data = subprocess.run([sys.executable, "scripts/make_demo_data.py",
                         f"--output_dir={root / 'demo_data'}", "--image_size=16"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert data.returncode == 0, data.stderr[-2000:]
  backbone = subprocess.run([sys.executable, "scripts/make_demo_backbone.py",
                             f"--data_dir={root / 'demo_data'}",
                             f"--output_dir={root / 'demo_backbone'}", "--epochs=1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert backbone.returncode == 0, backbone.stderr[-2000:]
  return {"root": root, "data": str(root / "demo_data"),
          "backbone": str(root / "demo_backbone"), "stdout": data.stdout + backbone.stdout}


@pytest.fixture
def cache_config(make_config, tmp_path):
  """Factory: make_config with a frozen backbone and --cache_features."""

  def factory(**overrides):
    overrides.setdefault("freeze__spec", "all")
    overrides.setdefault("input__cache_features", str(tmp_path / "cache"))
    return make_config(**overrides)

  return factory
