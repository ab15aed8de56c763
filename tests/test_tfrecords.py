"""read_records on files that are, and are not, TFRecords; crc32c against TF."""
import gzip
import io
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from estimator_transfer.data import tfrecords
from estimator_transfer.errors import ConfigError
from faults import fault_tools

tmpfs_dir = fault_tools.tmpfs_dir  # a fixture, used by name

FIX = "pass a folder of class sub-folders or TFRecord shards made by et-prepare-data."


def _records(count=4):
  rng = np.random.RandomState(0)
  return [rng.bytes(int(n)) for n in rng.randint(1, 3000, count)]


def _write_tfrecord(path, records):
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
  return path


def _image_bytes(fmt):
  image = Image.fromarray(np.random.RandomState(1).randint(0, 255, (16, 16, 3), np.uint8))
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


def _write(path, data):
  with open(path, "wb") as f:
    f.write(data)
  return path


def test_crc32c_matches_the_standard_check_value_and_tensorflow(tmp_path):
  # 0xE3069283 is the published CRC-32C of b"123456789" (RFC 3720, B.4).
  assert tfrecords.crc32c(b"123456789") == 0xE3069283
  assert tfrecords.crc32c(b"") == 0
  path = _write_tfrecord(str(tmp_path / "one.tfrecord"), [b"hello tfrecord"])
  raw = open(path, "rb").read()
  length = raw[:8]
  assert struct.unpack("<I", raw[8:12])[0] == tfrecords.masked_crc32c(length)
  assert struct.unpack("<I", raw[-4:])[0] == tfrecords.masked_crc32c(b"hello tfrecord")


def test_a_good_file_yields_its_records_up_to_the_limit(tmp_path):
  records = _records(5) + [b""]
  path = _write_tfrecord(str(tmp_path / "good.tfrecord"), records)
  assert list(tfrecords.read_records(path, 100)) == records
  assert list(tfrecords.read_records(path, 2)) == records[:2]
  assert list(tfrecords.read_records(path, 0)) == []


def test_written_shards_read_back(tmp_path):
  examples = [tfrecords.make_example(b"img%d" % i, i) for i in range(5)]
  paths = tfrecords.write_shards(examples, str(tmp_path), "train", 2)
  got = [tf.train.Example.FromString(r) for p in paths for r in tfrecords.read_records(p, 9)]
  assert sorted(e.features.feature[tfrecords.LABEL_KEY].int64_list.value[0] for e in got) == \
      list(range(5))


def test_a_failing_example_stream_leaves_no_shard_and_no_temp(tmp_path):
  def examples():
    yield tfrecords.make_example(b"img", 0)
    raise RuntimeError("the source broke")

  with pytest.raises(RuntimeError, match="the source broke"):
    tfrecords.write_shards(examples(), str(tmp_path), "train", 2)
  assert os.listdir(tmp_path) == []


def test_a_full_disk_leaves_no_shard_and_no_temp(tmpfs_dir):
  big = tfrecords.make_example(np.random.RandomState(0).bytes(1 << 20), 0)
  with pytest.raises(Exception) as info:  # a tf.errors.OpError or OSError
    tfrecords.write_shards([big] * 6, tmpfs_dir, "train", 2)  # 6 MB into 4 MB
  assert "No space left on device" in str(info.value)
  assert os.listdir(tmpfs_dir) == []


def test_an_empty_file_has_no_records(tmp_path):
  assert list(tfrecords.read_records(_write(str(tmp_path / "empty.tfrecord"), b""), 5)) == []


@pytest.mark.parametrize("cut", [3, 12, 20, -1])
def test_a_truncated_file_yields_the_complete_records_before_the_cut(tmp_path, cut):
  # The input pipeline skips and counts the rest of a truncated shard, so the
  # reader stops quietly at the cut (cut 3: inside the first header).
  records = _records(3)
  raw = open(_write_tfrecord(str(tmp_path / "full.tfrecord"), records), "rb").read()
  first = 12 + len(records[0]) + 4
  end = {3: 3, 12: 12, 20: first + 20, -1: len(raw) - 1}[cut]
  path = _write(str(tmp_path / "cut.tfrecord"), raw[:end])
  if cut == 3:  # too short for a header: not recognisable as a TFRecord
    with pytest.raises(ConfigError, match="cut.tfrecord is not a TFRecord file"):
      list(tfrecords.read_records(path, 9))
    return
  expected = {12: [], 20: records[:1], -1: records[:2]}[cut]
  assert list(tfrecords.read_records(path, 9)) == expected


def test_a_huge_length_with_a_valid_crc_is_bounded_by_the_file_size(tmp_path):
  length = struct.pack("<Q", 1 << 60)
  header = length + struct.pack("<I", tfrecords.masked_crc32c(length))
  path = _write(str(tmp_path / "liar.tfrecord"), header + b"x" * 100)
  assert list(tfrecords.read_records(path, 3)) == []


def test_corruption_after_the_first_record_ends_the_iteration(tmp_path):
  records = _records(3)
  raw = bytearray(open(_write_tfrecord(str(tmp_path / "r.tfrecord"), records), "rb").read())
  second = 12 + len(records[0]) + 4
  damaged_data = bytearray(raw)
  damaged_data[second + 12 + 5] ^= 0xFF  # a byte of record 1's data: its CRC fails
  path = _write(str(tmp_path / "data.tfrecord"), bytes(damaged_data))
  assert list(tfrecords.read_records(path, 9)) == records[:1]
  damaged_header = bytearray(raw)
  damaged_header[second + 1] ^= 0xFF  # record 1's length: its CRC fails
  path = _write(str(tmp_path / "header.tfrecord"), bytes(damaged_header))
  assert list(tfrecords.read_records(path, 9)) == records[:1]


@pytest.mark.parametrize("name,data,message", [
    ("photo.jpg", _image_bytes("JPEG"), f"photo.jpg is a JPEG image, not a TFRecord file; {FIX}"),
    ("photo.png", _image_bytes("PNG"), f"photo.png is a PNG image, not a TFRecord file; {FIX}"),
    ("anim.gif", _image_bytes("GIF"), f"anim.gif is a GIF image, not a TFRecord file; {FIX}"),
    ("pic.bmp", _image_bytes("BMP"), f"pic.bmp is a BMP image, not a TFRecord file; {FIX}"),
    ("notes.txt", b"just some notes\nsecond line\n",
     f"notes.txt is a text file, not a TFRecord file; {FIX}"),
    ("table.data", b"path,label\na.png,1\n",
     "table.data is a CSV file, not a TFRecord file; give it a .csv name to read it as "
     "CSV, or pass TFRecord shards made by et-prepare-data."),
    ("shard.tfrecord.gz", gzip.compress(b"x" * 100, mtime=0),
     "shard.tfrecord.gz is a gzip-compressed file, not an uncompressed TFRecord file; "
     "decompress it (gunzip) or pass TFRecord shards made by et-prepare-data."),
    ("random.bin", np.random.RandomState(3).bytes(4096),
     "random.bin is not a TFRecord file (its first 12 bytes are not a valid record "
     f"header); {FIX}"),
])
def test_a_file_of_another_kind_is_one_clear_sentence(tmp_path, name, data, message):
  path = _write(str(tmp_path / name), data)
  with pytest.raises(ConfigError) as info:
    list(tfrecords.read_records(path, 5))
  assert str(info.value) == f"{tmp_path}/{message}"


def test_a_jpeg_does_not_kill_the_interpreter(tmp_path):
  # The old reader trusted the JPEG's first 8 bytes as a length and the
  # interpreter died with SIGSEGV (rc -11) asking for an exabyte.
  path = _write(str(tmp_path / "photo.jpg"), _image_bytes("JPEG"))
  script = textwrap.dedent(f"""
      from estimator_transfer.data import tfrecords
      from estimator_transfer.errors import ConfigError
      try:
        list(tfrecords.read_records({path!r}, 5))
      except ConfigError as e:
        print("CONFIG ERROR:", e)
      """)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=300, env=env, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"CONFIG ERROR: {path} is a JPEG image, not a TFRecord file" in done.stdout


@pytest.mark.parametrize("head,kind", [
    (b"\xff\xd8\xff\xe0", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n\0\0", "a PNG image"),
    (b"GIF89a..", "a GIF image"),
    (b"BM\x00\x00", "a BMP image"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "a WebP image"),
    (b"\x1f\x8b\x08\x00", "a gzip-compressed file"),
    (b"PK\x03\x04", "a ZIP archive"),
    ("a,naïve".encode("utf-8")[:5], "a CSV file"),  # cut mid-character
    (b"caf\xc3", "a text file"),
    (b"\x00\x01\x02\x03\xfe\xff", None),
    (b"", None),
])
def test_sniff_kind(head, kind):
  assert tfrecords.sniff_kind(head) == kind
