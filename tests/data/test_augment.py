"""Augmentation: training only, seeded, in range; eval/export pixels untouched; mixup."""
import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.training import experiment as runner
from estimator_transfer.errors import ConfigError
from estimator_transfer.config import BackboneConfig, ExperimentConfig, InputConfig
from estimator_transfer.data import augment
from estimator_transfer.data import pipeline

from conftest import assert_moved, checkpoint_values, initial_checkpoint_values

SIZE = 16


def _image(seed=0):
  rng = np.random.RandomState(seed)
  return tf.constant(rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32))


def _apply(config, image, seed):
  fn = augment.build_augment_fn(config, SIZE)
  return fn(image, tf.constant([7, seed], tf.int64)).numpy()


@pytest.mark.parametrize("overrides", [
    dict(random_flip="horizontal"), dict(random_flip="vertical"), dict(random_flip="both"),
    dict(random_crop=True, crop_min_area=0.2), dict(rotation_degrees=30.0),
    dict(brightness=0.3), dict(contrast=0.5), dict(saturation=0.5),
    dict(random_flip="horizontal", random_crop=True, rotation_degrees=10.0, brightness=0.1,
         contrast=0.2, saturation=0.2),
])
def test_each_augmentation_changes_pixels_stays_in_range_and_is_seeded(overrides):
  config = InputConfig(**overrides)
  image = _image()
  outputs = [_apply(config, image, seed) for seed in range(8)]
  for out in outputs:
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
  assert any(not np.allclose(out, image.numpy()) for out in outputs)
  np.testing.assert_array_equal(_apply(config, image, 3), outputs[3])  # same seed
  assert len({out.tobytes() for out in outputs}) > 1  # seeds differ


def test_flip_is_an_exact_mirror_or_nothing():
  image = _image()
  outputs = [_apply(InputConfig(random_flip="horizontal"), image, s) for s in range(12)]
  mirrored = image.numpy()[:, ::-1]
  assert all(np.array_equal(o, image.numpy()) or np.array_equal(o, mirrored) for o in outputs)
  assert any(np.array_equal(o, mirrored) for o in outputs)


def test_nothing_enabled_means_no_augment_fn():
  assert augment.build_augment_fn(InputConfig(), SIZE) is None


@pytest.mark.parametrize("overrides, flag", [
    (dict(random_flip="sideways"), "--random_flip"), (dict(crop_min_area=0.0), "--crop_min_area"),
    (dict(rotation_degrees=200.0), "--rotation_degrees"), (dict(brightness=-0.1), "--brightness"),
    (dict(contrast=1.0), "--contrast"), (dict(saturation=2.0), "--saturation"),
    (dict(mixup_alpha=-1.0), "--mixup_alpha"),
])
def test_invalid_settings_name_the_flag(overrides, flag):
  with pytest.raises(ConfigError, match=flag):
    ExperimentConfig(backbone=BackboneConfig(handle="mobilenet_v2"),
                     input=InputConfig(**overrides)).validate()


def test_mixup_blends_images_and_labels_with_the_same_weights():
  rng = np.random.RandomState(0)
  images = tf.constant(rng.uniform(0, 1, (4, SIZE, SIZE, 3)).astype(np.float32))
  labels = tf.constant([0, 1, 2, 1])
  mixed, soft = augment.mixup(images, labels, 3, 0.4, tf.constant([1, 2], tf.int64))
  mixed, soft, images = mixed.numpy(), soft.numpy(), images.numpy()
  np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
  for i, j in [(0, 3), (1, 2)]:  # partner = mirror in the batch, distinct classes
    lam = soft[i, int(labels[i])]
    np.testing.assert_allclose(mixed[i], lam * images[i] + (1 - lam) * images[j], atol=1e-6)
  with pytest.raises(ConfigError, match="--mixup_alpha needs the number of classes"):
    augment.mixup(images, labels, 0, 0.4, tf.constant([1, 2], tf.int64))


def test_augmentation_is_training_only(tiny_data):
  config = InputConfig(batch_size=64, random_flip="both", random_crop=True, brightness=0.3,
                       mixup_alpha=0.3)
  plain = InputConfig(batch_size=64)
  evaluation = next(iter(pipeline.build_input_fn(
     config, tiny_data["eval"], SIZE, training=False, num_classes=3)()))
  reference = next(iter(pipeline.build_input_fn(
     plain, tiny_data["eval"], SIZE, training=False)()))
  np.testing.assert_array_equal(evaluation[0]["image"], reference[0]["image"])
  assert evaluation[1].dtype == tf.int32
  # Training without augmentation: the same pixels, only reordered.
  train_plain = next(iter(pipeline.build_input_fn(
     plain, tiny_data["eval"], SIZE, training=True, seed=1, num_epochs=1)()))
  assert sorted(x.tobytes() for x in train_plain[0]["image"].numpy()) == \
      sorted(x.tobytes() for x in reference[0]["image"].numpy())
  # With augmentation and mixup: changed pixels, soft labels.
  features, labels = next(iter(pipeline.build_input_fn(
     config, tiny_data["eval"], SIZE, training=True, seed=1, num_classes=3)()))
  assert labels.shape == (64, 3) and labels.dtype == tf.float32
  np.testing.assert_allclose(labels.numpy().sum(axis=1), 1.0, rtol=1e-5)
  assert not any(np.array_equal(a, b) for a in features["image"].numpy()
                 for b in reference[0]["image"].numpy()[:4])


def test_estimator_trains_with_mixup_soft_labels(make_config):
  cfg = make_config(input__mixup_alpha=0.4, input__random_flip="horizontal",
                    input__rotation_degrees=10.0, run__max_steps=3)
  experiment = runner.Experiment(cfg)
  assert experiment.train() == 3
  values = checkpoint_values(cfg.run.model_dir)
  assert np.all(np.isfinite(values["head_logits/kernel"]))
  assert_moved(values, initial_checkpoint_values(cfg.run.model_dir), "head_logits/kernel")
  assert 0.0 <= experiment.evaluate()["accuracy"] <= 1.0
