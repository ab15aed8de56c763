"""Image folder (one sub-folder per class) -> sharded TFRecords, in parallel.

    <output_dir>/labels.txt                      class i on line i
    <output_dir>/{train,validation,test}/        <split>-0000i-of-0000n.tfrecord
                                                 + labels.txt
    <output_dir>/prepare_report.json             counts, bad and ignored files
    <output_dir>/.prepare_state.json             what each finished shard holds

Decisions worth knowing:

* Split: a stable hash of the path relative to `image_dir` puts each image in
  train, validation or test, so adding images never moves old ones between
  splits (changing the percentages does). The shard within a split is another
  hash of the path, so a new image changes only the shard it lands in.
* Idempotent and resumable: each shard is written to a temp name and renamed
  when complete, and its fingerprint (options + path, size, mtime and label of
  every image in it) is stored in the state file. A re-run skips shards whose
  fingerprint is unchanged and rewrites the others; an interrupted run loses
  at most the shard in progress.
* Image policy: JPEGs and 8-bit RGB/grayscale PNGs that need no change are
  copied byte for byte (what TF Serving will decode is exactly what trained).
  Everything else that Pillow reads (CMYK/YCCK JPEG, 16-bit, RGBA/LA,
  palette, GIF, BMP, TIFF, WebP, ...) becomes 8-bit RGB: alpha is dropped
  like TensorFlow's own decoder drops it, 16-bit values are scaled to 8 bits.
  It is re-encoded as JPEG (`jpeg_quality`) when the source was a JPEG and as
  PNG (lossless) otherwise. EXIF orientation is ignored, as at serving time.
* Bad files (empty, unreadable, truncated, not an image, more pixels than
  `max_image_pixels`) are skipped and listed with the reason; more than
  `max_bad_fraction` of them is an error. Hidden files (`.DS_Store`,
  `._*`) and files without an image extension are ignored and listed.

This module imports TensorFlow only in the parent process (lazily), so the
worker processes (spawned) start fast and never touch TF.
"""
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

from estimator_transfer.errors import ConfigError

SPLITS = ("train", "validation", "test")
REPORT_FILENAME = "prepare_report.json"
STATE_FILENAME = ".prepare_state.json"
LABELS_FILENAME = "labels.txt"
CANDIDATE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff",
                        ".webp", ".ppm", ".pgm", ".pbm")
_STATE_VERSION = 1
_HASH_BUCKETS = 10000


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """Options of et-prepare-data (see the module docstring).

  Attributes:
    image_dir: the folder with one sub-folder per class (nested folders
      inside a class folder belong to that class).
    output_dir: where the splits, labels.txt and the report go.
    num_shards: shards for the whole dataset; each split gets its share of
      them (at least one).
    validation_percent: share of images in the validation split.
    test_percent: share of images in the test split.
    label_map: a file with one class name per line (line i = id i); every
      class folder must be in it. Empty: sorted folder names.
    max_bad_fraction: fail when more than this share of the images is bad.
    num_workers: conversion processes; 0: one per CPU.
    jpeg_quality: quality of re-encoded JPEGs.
    max_image_side: downscale images whose longer side is larger; 0: keep.
    max_image_pixels: images with more pixels are bad (decompression bombs).
  """
  image_dir: str = ""
  output_dir: str = ""
  num_shards: int = 8
  validation_percent: float = 10.0
  test_percent: float = 0.0
  label_map: str = ""
  max_bad_fraction: float = 0.05
  num_workers: int = 0
  jpeg_quality: int = 95
  max_image_side: int = 0
  max_image_pixels: int = 89_478_485  # Pillow's own warning limit

  def validate(self) -> "PrepareConfig":
    """Checks the options; returns self.

    Raises:
      ConfigError: one sentence naming the flag and the fix.
    """
    checks = [
        (bool(self.image_dir), "--image_dir is required: a folder with one "
         "sub-folder of images per class."),
        (bool(self.output_dir), "--output_dir is required: where the TFRecord "
         "shards go."),
        (not self.image_dir or os.path.isdir(self.image_dir),
         f"--image_dir={self.image_dir} is not a directory."),
        (self.num_shards >= 1, f"--num_shards must be at least 1, got {self.num_shards}."),
        (0 <= self.validation_percent < 100 and 0 <= self.test_percent < 100 and
         self.validation_percent + self.test_percent < 100,
         f"--validation_percent={self.validation_percent} and --test_percent="
         f"{self.test_percent} must be >= 0 and leave some images for training "
         "(sum below 100)."),
        (0.0 <= self.max_bad_fraction <= 1.0,
         f"--max_bad_fraction={self.max_bad_fraction} must be in [0, 1]."),
        (self.num_workers >= 0, "--num_workers must not be negative (0: one per CPU)."),
        (1 <= self.jpeg_quality <= 100,
         f"--jpeg_quality={self.jpeg_quality} must be in [1, 100]."),
        (self.max_image_side >= 0, "--max_image_side must not be negative (0: keep "
         "the size)."),
        (self.max_image_pixels > 0, "--max_image_pixels must be positive."),
    ]
    for ok, message in checks:
      if not ok:
        raise ConfigError(message)
    if os.path.realpath(self.image_dir) == os.path.realpath(self.output_dir):
      raise ConfigError("--output_dir must differ from --image_dir.")
    return self


def _inside(parent: str, child: str) -> bool:
  parent, child = os.path.realpath(parent), os.path.realpath(child)
  return child == parent or child.startswith(parent + os.sep)


# --- listing and splitting ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Item:
  relpath: str  # relative to image_dir, '/'-separated: the stable identity
  path: str
  label: int
  class_name: str
  size: int
  mtime_ns: int


def _stable_bucket(text: str, salt: str = "") -> int:
  digest = hashlib.sha1((salt + text).encode("utf-8")).hexdigest()
  return int(digest[:12], 16) % _HASH_BUCKETS


def split_of(relpath: str, validation_percent: float, test_percent: float) -> str:
  """The split of an image, from a stable hash of its relative path."""
  percent = _stable_bucket(relpath) * 100.0 / _HASH_BUCKETS
  if percent < validation_percent:
    return "validation"
  if percent < validation_percent + test_percent:
    return "test"
  return "train"


def _read_label_map(path: str) -> List[str]:
  if not os.path.isfile(path):
    raise ConfigError(f"--label_map={path} does not exist; give a text file with "
                      "one class name per line.")
  with open(path, encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip()]
  if len(set(names)) != len(names) or not names:
    raise ConfigError(f"--label_map={path} is empty or lists a class twice; give "
                      "one distinct class name per line.")
  return names


def list_images(config: PrepareConfig) -> Tuple[List[str], List[_Item], List[dict]]:
  """Walks the class folders.

  Returns:
    (class names, candidate images, ignored files as {path, reason}).

  Raises:
    ConfigError: no class folders, or a folder missing from the label map.
  """
  root = config.image_dir
  ignored = []
  folders = []
  for entry in sorted(os.listdir(root)):
    full = os.path.join(root, entry)
    if entry.startswith("."):
      ignored.append({"path": entry, "reason": "hidden file or folder"})
    elif os.path.isdir(full):
      if not _inside(full, config.output_dir):
        folders.append(entry)
    else:
      ignored.append({"path": entry, "reason": "not in a class folder"})
  if not folders:
    raise ConfigError(f"{root} has no class sub-folders; put the images of each "
                      "class in their own folder (e.g. images/cats/*.jpg).")
  if config.label_map:
    names = _read_label_map(config.label_map)
    missing = [f for f in folders if f not in names]
    if missing:
      raise ConfigError(f"class folder '{missing[0]}' is not in --label_map="
                        f"{config.label_map}; add it there or move the folder out.")
  else:
    names = folders
  ids = {n: i for i, n in enumerate(names)}
  items = []
  for folder in folders:
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
      rel_dir = os.path.relpath(dirpath, root)
      kept = []
      for d in sorted(dirnames):
        if d.startswith("."):
          ignored.append({"path": _rel(rel_dir, d), "reason": "hidden file or folder"})
        elif not _inside(os.path.join(dirpath, d), config.output_dir):
          kept.append(d)
      dirnames[:] = kept
      for filename in sorted(filenames):
        relpath = _rel(rel_dir, filename)
        path = os.path.join(dirpath, filename)
        if filename.startswith("."):
          ignored.append({"path": relpath, "reason": "hidden file"})
          continue
        if not filename.lower().endswith(CANDIDATE_EXTENSIONS):
          ignored.append({"path": relpath, "reason": "not an image file extension"})
          continue
        try:
          stat = os.stat(path)
        except OSError as e:
          stat = None
          ignored.append({"path": relpath, "reason": f"cannot stat: {e.strerror}"})
        if stat is not None:
          items.append(_Item(relpath, path, ids[folder], folder, stat.st_size,
                             stat.st_mtime_ns))
  return names, items, ignored


def _rel(rel_dir: str, name: str) -> str:
  rel = name if rel_dir == "." else os.path.join(rel_dir, name)
  return rel.replace(os.sep, "/")


def shards_per_split(config: PrepareConfig) -> Dict[str, int]:
  """Each split's share of --num_shards (at least 1; 0 for an empty split)."""
  percents = {"validation": config.validation_percent, "test": config.test_percent}
  percents["train"] = 100.0 - percents["validation"] - percents["test"]
  return {split: (max(1, math.ceil(config.num_shards * p / 100.0 - 1e-9)) if p > 0 else 0)
          for split, p in percents.items()}


# --- converting one image (runs in the worker processes) ----------------------


class BadImage(Exception):
  """An image that cannot be used; the message is the reason."""


def _png_is_plain(data: bytes) -> bool:
  """8-bit grayscale or RGB PNG without transparency (TF decodes it as is)."""
  if len(data) < 33 or data[12:16] != b"IHDR":
    return False
  bit_depth, color_type = data[24], data[25]
  return bit_depth == 8 and color_type in (0, 2) and b"tRNS" not in data[:4096]


def convert_image(path: str, jpeg_quality: int = 95, max_image_side: int = 0,
                  max_image_pixels: int = 89_478_485) -> Tuple[bytes, str, int, int, str]:
  """Reads an image file and returns what goes into its tf.Example.

  Args:
    path: the image file.
    jpeg_quality: quality of re-encoded JPEGs.
    max_image_side: downscale when the longer side is larger (0: never).
    max_image_pixels: more pixels than this is a bad image.

  Returns:
    (encoded bytes, "jpeg" or "png", height, width, what was done) where the
    last is "kept" or "converted from <mode/format>" or "resized".

  Raises:
    BadImage: with the reason (empty, unreadable, truncated, not an image, too
      large).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  Image.MAX_IMAGE_PIXELS = None  # checked below with our own limit and message
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise BadImage(f"cannot read the file: {e.strerror or e}") from None
  if not data:
    raise BadImage("empty file (0 bytes)")
  try:
    image = Image.open(io.BytesIO(data))
  except UnidentifiedImageError:
    raise BadImage("not an image (unknown or unsupported format)") from None
  except Exception as e:  # pylint: disable=broad-except
    raise BadImage(f"truncated or corrupt image header ({e})") from None
  width, height = image.size
  if width < 1 or height < 1:
    raise BadImage(f"image has no pixels ({width}x{height})")
  if width * height > max_image_pixels:
    raise BadImage(f"image too large ({width}x{height} = {width * height} pixels "
                   f"> --max_image_pixels={max_image_pixels})")
  fmt, mode = image.format, image.mode
  resize = bool(max_image_side) and max(width, height) > max_image_side
  if resize and fmt == "JPEG":
    image.draft("RGB", (max_image_side, max_image_side))  # fast DCT downscale
  try:
    image.load()  # decodes everything: truncated or corrupt data fails here
  except Exception as e:  # pylint: disable=broad-except
    raise BadImage(f"truncated or corrupt image data ({e})") from None
  plain = (fmt == "JPEG" and mode in ("RGB", "L")) or (
      fmt == "PNG" and mode in ("RGB", "L") and _png_is_plain(data))
  if plain and not resize:
    return data, fmt.lower(), height, width, "kept"
  note = "resized" if plain else f"converted from {fmt} {mode}"
  rgb = _to_rgb8(image)
  if resize:
    rgb.thumbnail((max_image_side, max_image_side), Image.LANCZOS)
  out = io.BytesIO()
  if fmt == "JPEG":
    rgb.save(out, format="JPEG", quality=jpeg_quality)
    out_fmt = "jpeg"
  else:
    rgb.save(out, format="PNG")
    out_fmt = "png"
  return out.getvalue(), out_fmt, rgb.size[1], rgb.size[0], note


def _to_rgb8(image):
  """8-bit RGB from any Pillow mode (16-bit scaled, alpha dropped)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.mode.startswith("I;16") or image.mode in ("I", "F"):
    array = np.asarray(image).astype(np.float64)
    if image.mode == "F" and array.size and array.max() <= 1.0:
      array = array * 255.0
    elif image.mode != "F":
      array = array * (255.0 / 65535.0)  # 16-bit range to 8 bits
    gray = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")
    return gray.convert("RGB")
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  return image.convert("RGB")


def _convert_job(job):
  """Worker entry: (relpath, path, options) -> (relpath, ok, payload)."""
  relpath, path, quality, side, pixels = job
  try:
    return relpath, True, convert_image(path, quality, side, pixels)
  except BadImage as e:
    return relpath, False, str(e)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever else a broken file makes a decoder raise: still one bad file.
    return relpath, False, f"cannot decode ({type(e).__name__}: {e})"


# --- the whole run --------------------------------------------------------------


class _Progress:
  """Prints `done/total images (x%), bad, rate, eta` at most every `every` s."""

  def __init__(self, total: int, write: Callable[[str], None], every: float = 2.0):
    self.total, self.write, self.every = total, write, every
    self.done = self.bad = self.skipped = 0
    self.start = self.last = time.time()

  def update(self, done: int = 0, bad: int = 0, skipped: int = 0, force=False):
    self.done += done
    self.bad += bad
    self.skipped += skipped
    now = time.time()
    if not force and now - self.last < self.every:
      return
    self.last = now
    converted = self.done - self.skipped
    rate = converted / max(now - self.start, 1e-9)
    left = self.total - self.done
    eta = f"{left / rate:.0f}s" if rate > 0 else "?"
    percent = 100.0 * self.done / max(self.total, 1)
    self.write(f"{self.done}/{self.total} images ({percent:.0f}%), {self.bad} bad, "
               f"{rate:.0f} images/s, eta {eta}")


def _fingerprint(config: PrepareConfig, names, items: Sequence[_Item]) -> str:
  h = hashlib.sha1()
  h.update(json.dumps([_STATE_VERSION, config.jpeg_quality, config.max_image_side,
                       config.max_image_pixels, list(names)]).encode())
  for item in items:
    h.update(f"{item.relpath}\0{item.size}\0{item.mtime_ns}\0{item.label}\n".encode())
  return h.hexdigest()


def prepare(config: PrepareConfig,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
  """Converts `config.image_dir` into TFRecord splits; returns the report.

  Args:
    config: the options.
    log: where progress lines go.

  Returns:
    The report (also written to output_dir/prepare_report.json).

  Raises:
    ConfigError: bad options, no classes, or too many bad images (the
      report is written first; finished shards are kept for a re-run).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import tfrecords  # pylint: disable=g-import-not-at-top
  config.validate()
  names, items, ignored = list_images(config)
  out = config.output_dir
  tf.io.gfile.makedirs(out)
  state = _load_state(out)
  shard_counts = shards_per_split(config)
  plan = {}  # (split, shard) -> items
  for item in items:
    split = split_of(item.relpath, config.validation_percent, config.test_percent)
    shard = _stable_bucket(item.relpath, "shard:") % shard_counts[split]
    plan.setdefault((split, shard), []).append(item)
  for key in plan:  # a stable, class-mixed order inside each shard
    plan[key].sort(key=lambda it: (_stable_bucket(it.relpath, "order:"), it.relpath))

  total = len(items)
  allowed_bad = math.floor(config.max_bad_fraction * total + 1e-9)
  progress = _Progress(total, log)
  bad_files: List[dict] = []
  conversions: Dict[str, int] = {}
  split_counts = {split: 0 for split in SPLITS}
  written = skipped_shards = 0
  workers = config.num_workers or os.cpu_count() or 1
  log(f"{total} images in {len(names)} classes -> {out} "
      f"({', '.join(f'{s}: {n} shards' for s, n in shard_counts.items() if n)}), "
      f"{workers} processes")
  pool = None
  try:
    try:
      for split in SPLITS:
        num = shard_counts[split]
        if not num:
          continue
        split_dir = os.path.join(out, split)
        tf.io.gfile.makedirs(split_dir)
        _write_labels(os.path.join(split_dir, LABELS_FILENAME), names)
        for shard in range(num):
          shard_items = plan.get((split, shard), [])
          name = tfrecords.shard_name(split, shard, num)
          path = os.path.join(split_dir, name)
          key = f"{split}/{name}"
          fingerprint = _fingerprint(config, names, shard_items)
          previous = state["shards"].get(key)
          if previous and previous["fingerprint"] == fingerprint and tf.io.gfile.exists(path):
            bad_files.extend(previous["bad"])
            _add(conversions, previous.get("conversions", {}))
            split_counts[split] += previous["examples"]
            skipped_shards += 1
            progress.update(done=len(shard_items), bad=len(previous["bad"]),
                            skipped=len(shard_items))
            _check_bad(len(bad_files), allowed_bad, total, config, out)
            continue
          if pool is None and shard_items:
            pool = multiprocessing.get_context("spawn").Pool(workers)
          record = _write_shard(pool, path, shard_items, names, config, progress,
                                bad_files, allowed_bad, total)
          state["shards"][key] = dict(record, fingerprint=fingerprint)
          _save_state(out, state)
          _add(conversions, record["conversions"])
          split_counts[split] += record["examples"]
          written += 1
        _remove_stale_shards(split_dir, split, num, state)
      for split in SPLITS:  # a split switched off since the last run
        if not shard_counts[split] and tf.io.gfile.isdir(os.path.join(out, split)):
          _remove_stale_shards(os.path.join(out, split), split, 0, state)
      _save_state(out, state)
    except ConfigError:
      # Too many bad images: leave a report of what was found so far.
      _write_json(os.path.join(out, REPORT_FILENAME), dict(
          _report(config, names, split_counts, bad_files, ignored, conversions, written,
                  skipped_shards, total), status="failed: too many bad images"))
      raise
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
  progress.update(force=True)
  _write_labels(os.path.join(out, LABELS_FILENAME), names)
  report = _report(config, names, split_counts, bad_files, ignored, conversions,
                   written, skipped_shards, total)
  _write_json(os.path.join(out, REPORT_FILENAME), report)
  return report


def _add(into: Dict[str, int], counts: Dict[str, int]) -> None:
  for k, v in counts.items():
    into[k] = into.get(k, 0) + v


def _check_bad(bad: int, allowed: int, total: int, config: PrepareConfig, out: str):
  if bad > allowed:
    raise ConfigError(
        f"more than --max_bad_fraction={config.max_bad_fraction} of the {total} "
        f"images are bad ({bad} so far); see {os.path.join(out, REPORT_FILENAME)}, "
        "fix or remove them, or raise --max_bad_fraction.")


def _write_shard(pool, path: str, items: Sequence[_Item], names, config,
                 progress: _Progress, bad_files: List[dict], allowed_bad: int,
                 total: int) -> dict:
  """Converts and writes one shard (temp name + rename); returns its record."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import tfrecords  # pylint: disable=g-import-not-at-top
  tmp = path + ".tmp"
  by_rel = {item.relpath: item for item in items}
  jobs = [(it.relpath, it.path, config.jpeg_quality, config.max_image_side,
           config.max_image_pixels) for it in items]
  bad, conversions, examples = [], {}, 0
  try:
    with tf.io.TFRecordWriter(tmp) as writer:
      results = pool.imap(_convert_job, jobs, chunksize=4) if jobs else []
      for relpath, ok, payload in results:
        item = by_rel[relpath]
        if ok:
          encoded, fmt, height, width, note = payload
          writer.write(tfrecords.make_example(
              encoded, item.label, item.class_name, fmt, filename=relpath,
              height=height, width=width).SerializeToString())
          examples += 1
          conversions[note] = conversions.get(note, 0) + 1
          progress.update(done=1)
        else:
          entry = {"path": relpath, "reason": payload}
          bad.append(entry)
          bad_files.append(entry)
          progress.update(done=1, bad=1)
          _check_bad(len(bad_files), allowed_bad, total, config, config.output_dir)
  except BaseException:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.remove(tmp)
    raise
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return {"examples": examples, "bad": bad, "conversions": conversions}


def _remove_stale_shards(split_dir: str, split: str, num: int, state: dict) -> None:
  """Deletes this split's shards of an earlier --num_shards (and temp files)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import tfrecords  # pylint: disable=g-import-not-at-top
  current = {tfrecords.shard_name(split, i, num) for i in range(num)}
  for name in tf.io.gfile.listdir(split_dir):
    ours = name.startswith(f"{split}-") and "-of-" in name and (
        name.endswith(".tfrecord") or name.endswith(".tfrecord.tmp"))
    if ours and name not in current:
      tf.io.gfile.remove(os.path.join(split_dir, name))
      state["shards"].pop(f"{split}/{name}", None)


def _report(config, names, split_counts, bad_files, ignored, conversions, written,
            skipped_shards, total) -> dict:
  return {
      "status": "ok",
      "image_dir": config.image_dir,
      "output_dir": config.output_dir,
      "classes": list(names),
      "images": total,
      "examples": split_counts,
      "bad": len(bad_files),
      "bad_files": sorted(bad_files, key=lambda e: e["path"]),
      "ignored": len(ignored),
      "ignored_files": ignored,
      "conversions": conversions,
      "shards_written": written,
      "shards_unchanged": skipped_shards,
      "options": dataclasses.asdict(config),
  }


def _write_labels(path: str, names) -> None:
  _write_text(path, "".join(f"{n}\n" for n in names))


def _write_json(path: str, data) -> None:
  _write_text(path, json.dumps(data, indent=1, sort_keys=True))


def _write_text(path: str, text: str) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    f.write(text)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def _load_state(out: str) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = os.path.join(out, STATE_FILENAME)
  if tf.io.gfile.exists(path):
    try:
      with tf.io.gfile.GFile(path) as f:
        state = json.loads(f.read())
      if state.get("version") == _STATE_VERSION:
        return state
    except ValueError:
      pass  # unreadable: every shard is simply rewritten
  return {"version": _STATE_VERSION, "shards": {}}


def _save_state(out: str, state: dict) -> None:
  _write_json(os.path.join(out, STATE_FILENAME), state)


def summary_lines(report: dict, limit: int = 10) -> List[str]:
  """Human-readable lines for the end of a run."""
  counts = ", ".join(f"{split} {n}" for split, n in report["examples"].items() if n)
  lines = [f"{report['images']} images, {len(report['classes'])} classes -> {counts}; "
           f"{report['bad']} bad, {report['ignored']} ignored; shards: "
           f"{report['shards_written']} written, {report['shards_unchanged']} unchanged"]
  conversions = {k: v for k, v in report["conversions"].items() if k != "kept"}
  if conversions:
    lines.append("re-encoded: " + ", ".join(f"{v} {k}" for k, v in sorted(conversions.items())))
  for entry in report["bad_files"][:limit]:
    lines.append(f"  bad: {entry['path']}: {entry['reason']}")
  if report["bad"] > limit:
    lines.append(f"  ... and {report['bad'] - limit} more bad files")
  lines.append(f"report: {os.path.join(report['output_dir'], REPORT_FILENAME)}")
  return lines
