"""Writing tf.Example records in the layout the input_fns read."""
import os
from typing import Iterable, List, Tuple

import tensorflow as tf

IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
TEXT_KEY = "image/class/text"


def make_example(encoded: bytes, label: int, text: str = "",
                 image_format: str = "png") -> tf.train.Example:
  """A tf.Example with the conventional image/* keys."""
  feature = {
      IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
      LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
      "image/format": tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[image_format.encode()])),
  }
  if text:
    feature[TEXT_KEY] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()]))
  return tf.train.Example(features=tf.train.Features(feature=feature))


def write_shards(examples: Iterable[tf.train.Example], output_dir: str,
                 prefix: str, num_shards: int) -> List[str]:
  """Writes examples round-robin into `prefix-0000i-of-0000n.tfrecord` files.

  Each shard is written under a temporary name and renamed when complete.
  """
  tf.io.gfile.makedirs(output_dir)
  paths = [os.path.join(output_dir, f"{prefix}-{i:05d}-of-{num_shards:05d}.tfrecord")
           for i in range(num_shards)]
  writers = [tf.io.TFRecordWriter(p + ".tmp") for p in paths]
  for i, example in enumerate(examples):
    writers[i % num_shards].write(example.SerializeToString())
  for writer, path in zip(writers, paths):
    writer.close()
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
  return paths
