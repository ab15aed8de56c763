"""Image decoding and resizing shared by training, evaluation and export.

One function decodes every image the product sees, so the pixels a served
model gets are exactly the pixels it was trained on.
"""
import tensorflow as tf


# Straight-line TensorFlow: autograph (which tf.data and Keras apply to what
# they trace) has nothing to convert here, only parsing to pay for.
@tf.autograph.experimental.do_not_convert
def decode_and_resize(image_bytes, image_size: int):
  """Decodes JPEG/PNG/GIF/BMP bytes into float32 RGB [size, size, 3] in [0, 1].

  Grayscale and RGBA inputs become RGB; animated GIFs keep their first frame.
  """
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image = tf.image.convert_image_dtype(image, tf.float32)
  image = tf.image.resize(image, [image_size, image_size], method="bilinear",
                          antialias=True)
  image = tf.clip_by_value(image, 0.0, 1.0)
  image.set_shape([image_size, image_size, 3])
  return image
