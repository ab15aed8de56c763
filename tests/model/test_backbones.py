"""Backbone sources: Keras applications, own Keras models, TF2 and TF1 Hub modules."""
import shutil

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.model import backbone_types
from estimator_transfer.model import backbones
from estimator_transfer.model import hub_backbone
from estimator_transfer import config as config_lib
from estimator_transfer.errors import ConfigError

from conftest import IMAGE_SIZE
from transfer_helpers import (TF1_BN_STATS, TF1_REG_SCALE, hub_name, regularized_saved_model,  # noqa: F401
                              tf1_module, train)

# name -> (tf.keras.applications module with its preprocess_input, ctor, kwargs
# that keep it tiny at 32 px)
APPS = {
    "mobilenet_v2": (tf.keras.applications.mobilenet_v2, "MobileNetV2", {"alpha": 0.35}),
    "mobilenet_v3_small": (tf.keras.applications.mobilenet_v3, "MobileNetV3Small",
                           {"alpha": 0.75, "minimalistic": True}),
    "efficientnet_b0": (tf.keras.applications.efficientnet, "EfficientNetB0", {}),
    "resnet50": (tf.keras.applications.resnet50, "ResNet50", {}),
}


def _handle(name):
  kwargs = APPS[name][2]
  args = ",".join(f"{k}={v}" for k, v in kwargs.items())
  return f"{name}({args})" if args else name


@pytest.mark.parametrize("name", sorted(APPS))
def test_application_value_range_matches_its_own_preprocess_input(name):
  # The pipeline yields RGB in [0, 1]; each application's preprocess_input
  # takes [0, 255]. Ours must produce exactly what the application expects.
  module = APPS[name][0]
  images = np.random.RandomState(0).uniform(0, 1, (2, 4, 4, 3)).astype(np.float32)
  resolved = backbones.resolve(config_lib.BackboneConfig(handle=_handle(name),
                                                         weights="none", image_size=32))
  ours = backbone_types.to_value_range(tf.constant(images), resolved.value_range).numpy()
  np.testing.assert_allclose(ours, module.preprocess_input(images * 255.0), atol=1e-4)
  assert resolved.keras_weights is None  # none: random initialisation
  assert resolved.image_size == 32


def _app_weights_file(tmp_path, name, size=32):
  """Builds the application eagerly with a seed and saves its weights (.h5)."""
  _, ctor, kwargs = APPS[name]
  tf.keras.utils.set_random_seed(11)
  model = getattr(tf.keras.applications, ctor)(include_top=False, weights=None,
                                               input_shape=(size, size, 3),
                                               pooling="avg", **kwargs)
  path = str(tmp_path / f"{name}.h5")
  model.save_weights(path)
  return path, {w.name[:-2]: w.numpy() for w in model.weights}


def _check_app_weights_load_and_stay_frozen(make_config, tmp_path, name):
  path, expected = _app_weights_file(tmp_path, name)
  cfg = make_config(backbone__handle=_handle(name), backbone__weights=path,
                    backbone__image_size=32, freeze__spec="all", run__max_steps=1,
                    input__batch_size=4)
  values = train(cfg)
  assert values["global_step"] == 1
  # Every weight of the file was loaded (not a random init) and, frozen,
  # never moved; BatchNorm moving statistics included.
  mismatched = [n for n in expected if not np.array_equal(values[n], expected[n])]
  assert not mismatched, mismatched[:5]
  assert len(expected) > 50


def test_mobilenet_v2_weights_file_loads_and_stays_frozen(make_config, tmp_path):
  _check_app_weights_load_and_stay_frozen(make_config, tmp_path, "mobilenet_v2")


# Always run (no opt-in): at 32 px and one step each stays under ~25 s on 2 cores.
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "resnet50"])
def test_large_application_weights_file_loads_and_stays_frozen(make_config, tmp_path, name):
  _check_app_weights_load_and_stay_frozen(make_config, tmp_path, name)


def test_weights_file_of_another_architecture_is_clear_error(tiny_backbone):
  with pytest.raises(ConfigError, match="does not fit mobilenet_v2"):
    backbones.resolve(config_lib.BackboneConfig(
        handle="mobilenet_v2(alpha=0.35)", weights=tiny_backbone["weights"], image_size=32))


def test_value_range_can_be_overridden():
  resolved = backbones.resolve(config_lib.BackboneConfig(
      handle="mobilenet_v2", weights="none", value_range="zero_one"))
  assert resolved.value_range == "zero_one" and resolved.image_size == 224


# ---------------------------------------------------------------------------
# The team's own Keras model, cut at a layer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["h5", "keras_saved_model"])
def test_own_model_cut_at_named_layer_is_the_backbone(make_config, tiny_backbone, tmp_path,
                                                      source):
  handle = tiny_backbone["h5"]
  if source == "keras_saved_model":
    handle = str(tmp_path / "own_saved_model")
    tf.keras.models.load_model(tiny_backbone["h5"], compile=False).save(handle,
                                                                         save_format="tf")
    handle = "keras:" + handle
  cfg = make_config(backbone__handle=handle, backbone__output_layer="relu1",
                    freeze__spec="all", run__max_steps=2)
  values = train(cfg)
  # Features are relu1's 4 channels, pooled: the head sees 4 inputs.
  assert values["head_logits/kernel"].shape == (4, 3)
  for name in ("conv1/kernel", "bn1/moving_mean", "bn1/gamma"):
    np.testing.assert_array_equal(values[name], tiny_backbone["values"][name])
  assert "conv2/kernel" not in values  # the layers after the cut are not built


def test_unknown_output_layer_lists_the_layers(tiny_backbone):
  with pytest.raises(ConfigError, match="is not a layer of .*relu2"):
    backbones.resolve(config_lib.BackboneConfig(handle=tiny_backbone["h5"],
                                                output_layer="nope"))


@pytest.mark.parametrize("source, message", [
    ("h5", "does not match the 16x16 input"),
    ("saved_model", "does not match the 16x16 input"),
])
def test_image_size_mismatch_is_clear_error(tiny_backbone, source, message):
  with pytest.raises(ConfigError, match=message):
    backbones.resolve(config_lib.BackboneConfig(handle=tiny_backbone[source],
                                                image_size=32))


def test_size_and_range_come_from_the_backbone(tiny_backbone, tf1_module):
  for handle in (tiny_backbone["h5"], tiny_backbone["saved_model"], tf1_module["path"]):
    resolved = backbones.resolve(config_lib.BackboneConfig(handle=handle))
    assert resolved.image_size == IMAGE_SIZE, handle
    assert resolved.value_range == "zero_one"


# ---------------------------------------------------------------------------
# TF-Hub: handles, cache, formats
# ---------------------------------------------------------------------------


def test_hub_url_is_served_from_a_preseeded_cache(tiny_backbone, tmp_path, monkeypatch):
  monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
  url = "https://example.invalid/models/tiny/1"
  cached = hub_backbone.hub_cache_path(url)
  assert cached.startswith(str(tmp_path / "cache"))
  shutil.copytree(tiny_backbone["saved_model"], cached)
  resolved = backbones.resolve(config_lib.BackboneConfig(handle=url))
  assert resolved.kind == "hub_tf2" and resolved.hub_path == cached


def test_unreachable_hub_url_says_how_to_preseed_the_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
  url = "http://127.0.0.1:9/models/tiny.tar.gz"  # the discard port: refused at once
  with pytest.raises(ConfigError) as error:
    backbones.resolve(config_lib.BackboneConfig(handle=url))
  message = str(error.value)
  assert "pre-seed the cache" in message
  assert hub_backbone.hub_cache_path(url) in message


def test_hub_format_is_detected_from_the_module(tiny_backbone, tf1_module):
  tf2 = backbones.resolve(config_lib.BackboneConfig(handle="hub:" + tiny_backbone["saved_model"]))
  tf1 = backbones.resolve(config_lib.BackboneConfig(handle=tf1_module["path"]))
  assert (tf2.kind, tf1.kind) == ("hub_tf2", "hub_tf1")
  assert tf1.hub_train_tag
  # Forward (creation) order, so first:N / last:N / until: mean what they say.
  assert [g for g, _ in tf1.hub_groups] == ["conv1", "bn1", "conv2", "bn2"]


def test_tf2_module_input_size_is_read_from_the_proto_as_loading_finds_it(
    tiny_backbone, tmp_path):
  # saved_model.pb's object graph gives what loading the module gives, for a
  # static size and for a module that takes any size.
  assert hub_backbone._declared_tf2_size(tiny_backbone["saved_model"]) == (  # pylint: disable=protected-access
      hub_backbone._loaded_tf2_size(tiny_backbone["saved_model"])) == (IMAGE_SIZE, True)  # pylint: disable=protected-access
  module = tf.Module()
  module.scale = tf.Variable(2.0)
  module.__call__ = tf.function(lambda x: tf.reduce_mean(x, [1, 2]) * module.scale,
                                input_signature=[tf.TensorSpec([None, None, None, 3])])
  path = str(tmp_path / "any_size")
  tf.saved_model.save(module, path)
  assert hub_backbone._declared_tf2_size(path) == (  # pylint: disable=protected-access
      hub_backbone._loaded_tf2_size(path)) == (None, False)  # pylint: disable=protected-access


def test_tf2_module_regularization_losses_count_only_when_trainable(regularized_saved_model):
  resolved = backbones.resolve(config_lib.BackboneConfig(
      handle=regularized_saved_model["path"]))
  expected = 0.5 * np.sum(regularized_saved_model["kernel"] ** 2)
  for spec, count in (("none", 1), ("all", 0)):
    with tf.Graph().as_default():
      out = resolved.instantiate(tf.zeros([2, IMAGE_SIZE, IMAGE_SIZE, 3]), spec, True)
      assert len(out.losses) == count, spec
      if count:
        with tf.compat.v1.Session() as sess:
          sess.run(tf.compat.v1.global_variables_initializer())
          np.testing.assert_allclose(sess.run(out.losses[0]), expected, rtol=1e-5)


def test_tf1_module_fine_tunes_with_train_tag_updates_and_regularization(make_config,
                                                                        tf1_module):
  cfg = make_config(backbone__handle=tf1_module["path"], freeze__spec="none",
                    run__max_steps=3)
  values = train(cfg)
  exported = tf1_module["values"]
  for leaf in ("conv1/kernel", "conv2/kernel", "bn1/gamma"):
    assert not np.array_equal(values[hub_name(values, leaf)], exported[leaf]), leaf
  # The "train" variant ran: BatchNorm's UPDATE_OPS moved the statistics.
  for leaf in ("bn1/moving_mean", "bn2/moving_variance"):
    assert not np.array_equal(values[hub_name(values, leaf)], exported[leaf]), leaf


def test_tf1_module_regularization_loss_is_in_the_training_loss(tf1_module):
  resolved = backbones.resolve(config_lib.BackboneConfig(handle=tf1_module["path"]))
  with tf.Graph().as_default():
    out = resolved.instantiate(tf.zeros([2, IMAGE_SIZE, IMAGE_SIZE, 3]), "none", True)
    assert len(out.losses) == 1 and len(out.update_ops) == 4
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      kernel = tf1_module["values"]["conv1/kernel"]
      np.testing.assert_allclose(sess.run(out.losses[0]),
                                 TF1_REG_SCALE * np.sum(kernel ** 2), rtol=1e-5)
  with tf.Graph().as_default():
    frozen = resolved.instantiate(tf.zeros([2, IMAGE_SIZE, IMAGE_SIZE, 3]), "all", True)
    assert not frozen.losses and not frozen.update_ops and not frozen.trainable_variables


@pytest.mark.parametrize("spec, frozen_leaves, trained_leaves", [
    # Groups are the module's own variable-name prefixes (conv1, bn1, conv2,
    # bn2); regex: matches the module's variable names.
    ("until:bn1", ("conv1/kernel", "bn1/gamma", "bn1/beta"), ("conv2/kernel",
                                                                       "bn2/gamma")),
    ("regex:^bn", ("bn1/gamma", "bn2/beta"), ("conv1/kernel", "conv2/bias")),
])
def test_tf1_module_partial_freeze_keeps_frozen_and_statistics_bit_identical(
    make_config, tf1_module, spec, frozen_leaves, trained_leaves):
  cfg = make_config(backbone__handle=tf1_module["path"], freeze__spec=spec,
                    run__max_steps=3)
  values = train(cfg)
  exported = tf1_module["values"]
  # Partly frozen: the inference variant runs, no statistics move.
  for leaf in frozen_leaves + ("bn1/moving_mean", "bn1/moving_variance",
                               "bn2/moving_mean", "bn2/moving_variance"):
    np.testing.assert_array_equal(values[hub_name(values, leaf)], exported[leaf],
                                  err_msg=leaf)
  for leaf in trained_leaves:
    assert not np.array_equal(values[hub_name(values, leaf)], exported[leaf]), leaf
