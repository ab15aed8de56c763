"""Writing and inspecting tf.Example records in the layout the input_fns read."""
import functools
import os
import struct
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import tensorflow as tf

from estimator_transfer.errors import ConfigError

IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
TEXT_KEY = "image/class/text"
FORMAT_KEY = "image/format"
FILENAME_KEY = "image/filename"
HEIGHT_KEY = "image/height"
WIDTH_KEY = "image/width"

# TFRecord framing: uint64 length, uint32 masked CRC-32C of the length, the
# data, uint32 masked CRC-32C of the data.
_HEADER = 12
_FOOTER = 4
_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reversed
_CRC_MASK_DELTA = 0xA282EAD8
_DATA_CRC_LIMIT = 1 << 20  # pure-Python CRC runs at a few MB/s: bound its cost
_SNIFF_BYTES = 512


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

  Each shard is written as `<shard>.tmp` (a name every listing skips) and
  renamed when complete; when writing fails the temporaries are removed.
  A record stream cannot go through files.write_atomically (it holds the
  whole file in memory), hence the rename here.
  """
  tf.io.gfile.makedirs(output_dir)
  paths = [os.path.join(output_dir, shard_name(prefix, i, num_shards))
           for i in range(num_shards)]
  writers = []
  try:
    writers = [tf.io.TFRecordWriter(p + ".tmp") for p in paths]
    for i, example in enumerate(examples):
      writers[i % num_shards].write(example.SerializeToString())
    for writer in writers:
      writer.close()
  except BaseException:
    _discard(writers, [p + ".tmp" for p in paths])
    raise
  for path in paths:
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
  return paths


def _discard(writers, temps: Sequence[str]) -> None:
  """Best-effort cleanup after a failed write (the original error is raised)."""
  for writer in writers:
    try:
      writer.close()
    except Exception:  # pylint: disable=broad-except  # e.g. the disk is still full
      pass
  for temp in temps:
    try:
      tf.io.gfile.remove(temp)
    except Exception:  # pylint: disable=broad-except  # never created
      pass


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum TFRecord files carry; pure Python."""
  table = _crc32c_table()
  crc = 0xFFFFFFFF
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """`crc32c` masked as TFRecord stores it (rotated right by 15, plus a delta)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


@functools.lru_cache(maxsize=1)
def _crc32c_table() -> Tuple[int, ...]:
  table = []
  for index in range(256):
    crc = index
    for _ in range(8):
      crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


# (magic bytes at offset 0, what the file is). Only consulted once the first
# record header has failed its checksum, so a real TFRecord never matches.
_MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"\x1f\x8b", "a gzip-compressed file"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"%PDF", "a PDF document"),
)


def sniff_kind(head: bytes) -> Optional[str]:
  """What the first bytes of a file say it is ("a JPEG image", "a text file").

  Args:
    head: the file's first bytes (512 suffice).

  Returns:
    A phrase with its article, or None when nothing is recognised.
  """
  if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
    return "a WebP image"
  for magic, kind in _MAGIC:
    if head.startswith(magic):
      return kind
  if head[257:262] == b"ustar":
    return "a tar archive"
  try:
    text = head.decode("utf-8")
  except UnicodeDecodeError as e:  # a character cut at the end of `head` is fine
    if e.start < len(head) - 3:
      return None
    text = head[:e.start].decode("utf-8")
  if text and all(c.isprintable() or c in "\t\r\n" for c in text):
    first_line = text.splitlines()[0] if text.splitlines() else ""
    return "a CSV file" if "," in first_line else "a text file"
  return None


def _not_a_tfrecord(path: str, head: bytes) -> ConfigError:
  """The one-sentence error for a file whose first record header is invalid."""
  kind = sniff_kind(head)
  if kind == "a gzip-compressed file":
    return ConfigError(f"{path} is a gzip-compressed file, not an uncompressed "
                       "TFRecord file; decompress it (gunzip) or pass TFRecord "
                       "shards made by et-prepare-data.")
  if kind == "a CSV file":
    return ConfigError(f"{path} is a CSV file, not a TFRecord file; give it a .csv "
                       "name to read it as CSV, or pass TFRecord shards made by "
                       "et-prepare-data.")
  what = (f"is {kind}, not a TFRecord file" if kind else
          f"is not a TFRecord file (its first {min(len(head), _HEADER)} bytes are "
          "not a valid record header)")
  return ConfigError(f"{path} {what}; pass a folder of class sub-folders or "
                     "TFRecord shards made by et-prepare-data.")


def read_records(path: str, limit: int) -> Iterator[bytes]:
  """Yields up to `limit` raw records of an uncompressed TFRecord file.

  Plain Python (no graph, no session), so it works in any TF mode. Every
  length field is checked against its CRC and against the file size before
  anything is read, so no byte pattern can ask for a huge read; the data CRC
  is checked for records up to 1 MiB (larger ones are left to tf.data, which
  checks them in C++). Damage after the first record header (a truncated tail,
  a corrupt record) ends the iteration quietly, as the input pipeline skips
  and counts the rest of such a file. An empty file has no records.

  Args:
    path: a local or remote (tf.io.gfile) file.
    limit: the most records to yield.

  Yields:
    The serialized records, in file order.

  Raises:
    ConfigError: the file is not a TFRecord file at all (its first header is
      invalid): the message names the file and what it looks like.
  """
  size = tf.io.gfile.stat(path).length
  offset = 0
  with tf.io.gfile.GFile(path, "rb") as f:
    for _ in range(limit):
      header = f.read(_HEADER)  # uint64 length + uint32 masked CRC of the length
      valid = (len(header) == _HEADER and
               struct.unpack("<I", header[8:])[0] == masked_crc32c(header[:8]))
      if not valid:
        if offset == 0 and header:
          raise _not_a_tfrecord(path, header + f.read(_SNIFF_BYTES - len(header)))
        return
      (length,) = struct.unpack("<Q", header[:8])
      if length > size - offset - _HEADER - _FOOTER:
        return  # truncated: the file ends inside this record
      data, footer = f.read(length), f.read(_FOOTER)
      if len(data) < length or len(footer) < _FOOTER:
        return  # the file shrank while being read
      if (length <= _DATA_CRC_LIMIT and
          struct.unpack("<I", footer)[0] != masked_crc32c(data)):
        return
      offset += _HEADER + length + _FOOTER
      yield data


def feature_kinds(example: tf.train.Example) -> Dict[str, str]:
  """Feature key -> `bytes`, `int64` or `float` (the list type that is set)."""
  return {key: feature.WhichOneof("kind").replace("_list", "")
          for key, feature in example.features.feature.items()
          if feature.WhichOneof("kind")}
