"""Partial feature cache: a partly frozen Keras backbone is cut below its first
trained layer; the cache holds the cut layer's output, training runs only the
top and the head on it, with the full network's variable names, and the
export (the full network on images) predicts what the top learned."""
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.data import preprocessing
from estimator_transfer.errors import ConfigError
from estimator_transfer.feature_cache import cache as feature_cache
from estimator_transfer.feature_cache import store
from estimator_transfer.model import backbones
from estimator_transfer.model import heads
from estimator_transfer.model import split
from estimator_transfer.training import experiment as runner

import conftest
from test_feature_cache import _predict_export, _read_cache, _records

_PRETRAINED_BN1 = "bn1/moving_mean"


def _top_on_features(cfg, cut, features, values):
  """Probabilities of the top + head built on cached features, with `values` by name."""
  resolved = backbones.resolve(cfg.backbone)
  with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    out = split.instantiate_top(resolved, cut, tf.constant(features), cfg.freeze.spec,
                                training=False)
    head = heads.build_head(cfg.head)
    probabilities = tf.nn.softmax(head(out.features, False))
    variables = tf.compat.v1.global_variables()
    for var in variables:
      var.load(values[var.op.name], sess)
    return sess.run(probabilities), sorted(v.op.name for v in variables)


def test_top_trains_on_cached_cut_and_export_predicts_it(cache_config, tiny_backbone,
                                                         tiny_data):
  cfg = cache_config(freeze__spec="last:2")
  cache = feature_cache.FeatureCache(cfg)
  # conv2/bn2 train: everything flows through relu1 below them.
  assert (cache.cut.cut, cache.cut.shape, cache.cut.frozen_in_top) == ("relu1", (16, 16, 4), ())
  assert cache.details["cut"] == {"layer": "relu1", "index": 3, "shape": [16, 16, 4]}
  cached = cache.prepare(cfg.input.train_data, True, conftest.CLASS_NAMES)
  assert cached.shape == (16, 16, 4) and cached.num_examples == 48
  # The cached features are the pretrained model's relu1 output on the images.
  model = tf.keras.models.load_model(tiny_backbone["h5"], compile=False)
  bottom = tf.keras.Model(model.input, model.get_layer("relu1").output)
  encoded, _ = _records(tiny_data["train"])
  images = tf.stack([preprocessing.decode_and_resize(tf.constant(b), 16) for b in encoded])
  features = _read_cache(cached.files)[0].reshape(-1, 16, 16, 4)
  np.testing.assert_allclose(features, bottom(images, training=False).numpy(), atol=1e-5)

  experiment = runner.Experiment(cfg)
  assert experiment.train() == 6
  trained = conftest.checkpoint_values(cfg.run.model_dir)
  model_vars = {n for n in trained if "Momentum" not in n and n != "global_step"}
  # Only the top and the head are in the checkpoint, named as in the full network.
  assert model_vars == {"conv2/kernel", "conv2/bias", "bn2/gamma", "bn2/beta",
                        "bn2/moving_mean", "bn2/moving_variance", "head_logits/kernel",
                        "head_logits/bias"}
  initial = tiny_backbone["values"]
  # BatchNorm of the trained top ran in training mode: its statistics moved.
  conftest.assert_moved(trained, initial, "bn2/moving_mean")
  conftest.assert_moved(trained, initial, "conv2/kernel", 1e-4)

  # The export: the full network on image bytes, from the composed checkpoint,
  # whose frozen part is the pretrained one (statistics untouched).
  full = store.read_checkpoint(experiment.servable_checkpoint())
  assert set(initial) <= set(full)
  np.testing.assert_array_equal(full[_PRETRAINED_BN1], initial[_PRETRAINED_BN1])
  served = _predict_export(experiment.export(), encoded)
  expected, graph_vars = _top_on_features(cfg, cache.cut, features, trained)
  assert set(graph_vars) == model_vars
  np.testing.assert_allclose(served, expected, atol=1e-5)
  # Evaluation reads the cache; the uncached full model agrees on the full checkpoint.
  metrics = experiment.evaluate()
  plain = runner.Experiment(cfg.replace(input__cache_features=""))
  uncached = plain.evaluate(checkpoint_path=experiment.servable_checkpoint())
  assert uncached["loss"] == pytest.approx(metrics["loss"], abs=1e-5)


def test_key_follows_the_cut_and_schedule_resume_warm_start_work(cache_config, tmp_path):
  keys = {feature_cache.FeatureCache(cache_config()).key}  # --freeze=all
  cuts = {}
  for spec in ("last:2", "until:bn1", "last:1"):
    cache = feature_cache.FeatureCache(cache_config(freeze__spec=spec))
    keys.add(cache.key)
    cuts[spec] = (cache.cut.cut, cache.cut.shape)
  # last:1 trains bn2 only: the cut moves up to conv2's output; until:bn1
  # freezes what last:2 does: the same cut, the same key.
  assert cuts == {"last:2": ("relu1", (16, 16, 4)), "until:bn1": ("relu1", (16, 16, 4)),
                  "last:1": ("conv2", (16, 16, 8))}
  assert len(keys) == 3

  # Head only for 3 steps, then conv2/bn2 too: the cut is below every stage.
  cfg = cache_config(freeze__spec="all", freeze__unfreeze_schedule="0:all,3:last:2")
  assert feature_cache.FeatureCache(cfg).cut.cut == "relu1"
  runner.Experiment(cfg.replace(run__max_steps=3)).train()
  first = conftest.checkpoint_values(cfg.run.model_dir)
  resumed = runner.Experiment(cfg)
  assert resumed.train() == 6
  assert resumed.feature_cache().prepare(cfg.input.train_data, True,
                                         conftest.CLASS_NAMES).computed == 0
  source = conftest.checkpoint_values(cfg.run.model_dir)
  conftest.assert_moved(source, first, "conv2/kernel", 1e-4)
  conftest.assert_moved(source, first, "bn2/moving_mean")
  warm = cfg.replace(run__model_dir=str(tmp_path / "warm"), run__max_steps=1,
                     continual__warm_start_from=cfg.run.model_dir)
  runner.Experiment(warm).train()
  started = conftest.initial_checkpoint_values(warm.run.model_dir)
  for name in ("conv2/kernel", "bn2/moving_variance", "head_logits/kernel"):
    np.testing.assert_allclose(started[name], source[name], atol=1e-6)


def _residual_model(path, crossing_input: bool):
  """conv1-relu1, then a block conv2-bn2 whose skip connection starts at relu1
  (or, with `crossing_input`, at the images themselves)."""
  inputs = tf.keras.Input((16, 16, 3), name="images")
  x = tf.keras.layers.Conv2D(3, 3, padding="same", name="conv1")(inputs)
  x = tf.keras.layers.ReLU(name="relu1")(x)
  y = tf.keras.layers.Conv2D(3, 3, padding="same", name="conv2")(x)
  y = tf.keras.layers.BatchNormalization(name="bn2")(y)
  x = tf.keras.layers.Add(name="add")([inputs if crossing_input else x, y])
  x = tf.keras.layers.GlobalAveragePooling2D(name="features")(x)
  tf.keras.Model(inputs, x).save(path)
  return path


def test_cut_inside_a_block_moves_below_it_or_is_refused(cache_config, tmp_path):
  handle = _residual_model(str(tmp_path / "res.h5"), crossing_input=False)
  cfg = cache_config(backbone__handle=handle, freeze__spec="last:1")
  cut = split.cut_point(cfg, backbones.resolve(cfg.backbone))
  # bn2 trains; conv2 (frozen) sits inside its block: it runs above the cut.
  assert cut.cut == "relu1" and cut.frozen_in_top == ("conv2",)
  assert "1 frozen layers above it run in every step" in cut.describe()
  handle = _residual_model(str(tmp_path / "res_in.h5"), crossing_input=True)
  cfg = cache_config(backbone__handle=handle, freeze__spec="last:2")
  with pytest.raises(ConfigError, match="crossed by a skip connection"):
    split.cut_point(cfg, backbones.resolve(cfg.backbone))


@pytest.mark.parametrize("overrides,message", [
    (dict(freeze__spec="last:1", backbone__handle="saved_model"), "one opaque call"),
    (dict(freeze__spec="last:4"), "trains the backbone's first layer"),
    (dict(freeze__spec="none"), "--freeze=none trains all of it"),
    (dict(freeze__spec="all", freeze__unfreeze_schedule="0:all,2:none"),
     "trains the backbone's first layer"),
])
def test_refusals_are_one_sentence(cache_config, tiny_backbone, overrides, message):
  if overrides.get("backbone__handle") == "saved_model":
    overrides["backbone__handle"] = tiny_backbone["saved_model"]
  cfg = cache_config(**overrides)
  with pytest.raises(ConfigError, match=message) as error:
    cfg.validate()
    feature_cache.FeatureCache(cfg)
  assert "\n" not in str(error.value) and str(error.value).endswith(".")
  assert not os.path.exists(cfg.run.model_dir)
