"""Training-only augmentation on decoded images, and mixup on batches.

Every op here runs after `preprocessing.decode_and_resize` on the float32
[size, size, 3] image in [0, 1] that evaluation and the export see, so turning
augmentation off gives exactly the serving pixels. All randomness is
stateless and seeded per example (`seed` = [base seed, example index]), so a
run with `--seed` repeats its augmentations exactly, whatever the
parallelism of the pipeline.

The random resized crop works on the already-resized image (a crop of it is
scaled back to `size`): it keeps one code path for cached and uncached data
and keeps eval/export preprocessing untouched, at the price of some
sharpness for small crop areas compared with cropping the full-resolution
original.
"""
import math
from typing import Callable, Optional

import tensorflow as tf

from estimator_transfer.errors import ConfigError

from estimator_transfer.config import InputConfig

# Aspect ratios of the random resized crop (as in Inception/ResNet training).
CROP_ASPECT_RATIOS = (3.0 / 4.0, 4.0 / 3.0)
_NUM_OPS = 6  # independent seeds split from each example's seed


def build_augment_fn(config: InputConfig, image_size: int
                     ) -> Optional[Callable[[tf.Tensor, tf.Tensor], tf.Tensor]]:
  """Returns augment(image, seed) -> image, or None when nothing is enabled.

  Args:
    config: the input config with the augmentation fields.
    image_size: the height/width of the images (they keep this size).

  Returns:
    A function of a float32 [size, size, 3] image in [0, 1] and an int64 [2]
    seed; its output is in [0, 1] with the same shape.
  """
  if not config.augments():
    return None

  def augment(image, seed):
    seeds = tf.unstack(tf.random.experimental.stateless_split(
        tf.cast(seed, tf.int64), num=_NUM_OPS))
    if config.random_crop:
      image = _random_resized_crop(image, image_size, config.crop_min_area, seeds[0])
    if config.random_flip in ("horizontal", "both"):
      image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    if config.random_flip in ("vertical", "both"):
      image = tf.image.stateless_random_flip_up_down(image, seeds[2])
    if config.rotation_degrees > 0:
      image = _random_rotation(image, config.rotation_degrees, seeds[3])
    if config.brightness > 0 or config.contrast > 0 or config.saturation > 0:
      image = _color_jitter(image, config, seeds[4])
    image = tf.clip_by_value(image, 0.0, 1.0)
    image.set_shape([image_size, image_size, 3])
    return image

  return augment


def _random_resized_crop(image, size, min_area, seed):
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed, min_object_covered=0.0, aspect_ratio_range=CROP_ASPECT_RATIOS,
      area_range=(min_area, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  # crop_and_resize takes the box as normalized [y1, x1, y2, x2]; the "- 1"
  # makes the last pixel centre the box edge, as tf.slice would.
  denom = tf.cast(size - 1, tf.float32)
  y1, x1 = tf.cast(begin[0], tf.float32), tf.cast(begin[1], tf.float32)
  y2 = y1 + tf.cast(crop_size[0], tf.float32) - 1.0
  x2 = x1 + tf.cast(crop_size[1], tf.float32) - 1.0
  box = tf.stack([y1, x1, y2, x2]) / denom
  return tf.image.crop_and_resize(image[None], box[None], [0], [size, size])[0]


def _random_rotation(image, max_degrees, seed):
  angle = tf.random.stateless_uniform([], seed, -max_degrees, max_degrees)
  angle = angle * (math.pi / 180.0)
  size = tf.cast(tf.shape(image)[0], tf.float32)
  cos, sin = tf.cos(angle), tf.sin(angle)
  # Maps output pixel (x, y) to the input pixel it samples, rotating about the
  # centre (the same matrix as tf.keras.layers.RandomRotation).
  x_offset = ((size - 1) - (cos * (size - 1) - sin * (size - 1))) / 2.0
  y_offset = ((size - 1) - (sin * (size - 1) + cos * (size - 1))) / 2.0
  transform = tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None],
      output_shape=tf.shape(image)[:2], fill_value=0.0, interpolation="BILINEAR",
      fill_mode="REFLECT")
  return out[0]


def _color_jitter(image, config, seed):
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
  if config.brightness > 0:
    image = tf.image.stateless_random_brightness(image, config.brightness, seeds[0])
  if config.contrast > 0:
    image = tf.image.stateless_random_contrast(
        image, 1.0 - config.contrast, 1.0 + config.contrast, seeds[1])
  if config.saturation > 0:
    image = tf.image.stateless_random_saturation(
        tf.clip_by_value(image, 0.0, 1.0), 1.0 - config.saturation,
        1.0 + config.saturation, seeds[2])
  return image


def mixup(images, labels, num_classes: int, alpha: float, seed):
  """Mixes each example with its mirror in the batch (mixup, Zhang et al. 2018).

  Example i is blended with example n-1-i with a weight lambda_i drawn from
  Beta(alpha, alpha) per example; the labels become the same blend of one-hot
  vectors (float32 [n, num_classes] soft targets).

  Args:
    images: float32 [n, size, size, 3].
    labels: int [n] class ids.
    num_classes: the number of classes.
    alpha: the Beta distribution's parameter (> 0).
    seed: int64 [2] stateless seed for this batch.

  Returns:
    (mixed images, float32 [n, num_classes] soft labels).

  Raises:
    ConfigError: `num_classes` is unknown.
  """
  if num_classes < 2:
    raise ConfigError("--mixup_alpha needs the number of classes; set --num_classes "
                      "or give a label map.")
  seeds = tf.unstack(tf.random.experimental.stateless_split(
      tf.cast(seed, tf.int64), num=2))
  n = tf.shape(images)[0]
  a = tf.random.stateless_gamma([n], seeds[0], alpha)
  b = tf.random.stateless_gamma([n], seeds[1], alpha)
  lam = a / tf.maximum(a + b, 1e-12)
  onehot = tf.one_hot(tf.cast(labels, tf.int32), num_classes)
  mixed_images = (lam[:, None, None, None] * images +
                  (1.0 - lam[:, None, None, None]) * tf.reverse(images, [0]))
  mixed_labels = lam[:, None] * onehot + (1.0 - lam[:, None]) * tf.reverse(onehot, [0])
  return mixed_images, mixed_labels
