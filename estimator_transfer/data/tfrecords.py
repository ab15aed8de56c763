"""Writing and inspecting tf.Example records in the layout the input_fns read."""
import os
import struct
from typing import Dict, Iterable, Iterator, List

import tensorflow as tf

IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
TEXT_KEY = "image/class/text"
FORMAT_KEY = "image/format"
FILENAME_KEY = "image/filename"
HEIGHT_KEY = "image/height"
WIDTH_KEY = "image/width"


def _bytes(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64(value: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def make_example(encoded: bytes, label: int, text: str = "",
                 image_format: str = "png", filename: str = "", height: int = 0,
                 width: int = 0) -> tf.train.Example:
  """A tf.Example with the conventional image/* keys (optional ones when given)."""
  feature = {
      IMAGE_KEY: _bytes(encoded),
      LABEL_KEY: _int64(label),
      FORMAT_KEY: _bytes(image_format.encode()),
  }
  if text:
    feature[TEXT_KEY] = _bytes(text.encode())
  if filename:
    feature[FILENAME_KEY] = _bytes(filename.encode())
  if height and width:
    feature[HEIGHT_KEY] = _int64(height)
    feature[WIDTH_KEY] = _int64(width)
  return tf.train.Example(features=tf.train.Features(feature=feature))


def shard_name(prefix: str, index: int, num_shards: int) -> str:
  """`prefix-0000i-of-0000n.tfrecord`, the shard naming the input_fns expect."""
  return f"{prefix}-{index:05d}-of-{num_shards:05d}.tfrecord"


def write_shards(examples: Iterable[tf.train.Example], output_dir: str,
                 prefix: str, num_shards: int) -> List[str]:
  """Writes examples round-robin into `prefix-0000i-of-0000n.tfrecord` files.

  Each shard is written under a temporary name and renamed when complete.
  """
  tf.io.gfile.makedirs(output_dir)
  paths = [os.path.join(output_dir, shard_name(prefix, i, num_shards))
           for i in range(num_shards)]
  writers = [tf.io.TFRecordWriter(p + ".tmp") for p in paths]
  for i, example in enumerate(examples):
    writers[i % num_shards].write(example.SerializeToString())
  for writer, path in zip(writers, paths):
    writer.close()
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
  return paths


def read_records(path: str, limit: int) -> Iterator[bytes]:
  """Yields up to `limit` raw records of an uncompressed TFRecord file.

  Plain Python (no graph, no session), so it works in any TF mode; CRCs are
  not checked and a truncated record ends the iteration.
  """
  with tf.io.gfile.GFile(path, "rb") as f:
    for _ in range(limit):
      header = f.read(12)  # uint64 length + uint32 masked CRC of the length
      if len(header) < 12:
        return
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        return
      yield data


def feature_kinds(example: tf.train.Example) -> Dict[str, str]:
  """Feature key -> `bytes`, `int64` or `float` (the list type that is set)."""
  return {key: feature.WhichOneof("kind").replace("_list", "")
          for key, feature in example.features.feature.items()
          if feature.WhichOneof("kind")}
