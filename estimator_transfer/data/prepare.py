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
* Image policy (`images.py`): plain JPEGs and PNGs are copied byte for byte,
  everything else Pillow reads becomes 8-bit RGB.
* Bad files (empty, unreadable, truncated, not an image, more pixels than
  `max_image_pixels`) are skipped and listed with the reason; more than
  `max_bad_fraction` of them is an error. Hidden files (`.DS_Store`,
  `._*`) and files without an image extension are ignored and listed.

The conversion runs in spawned worker processes that import only
`images.py`, which never imports TensorFlow, so they start fast.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
import types
from typing import Callable, Dict, List, Sequence, Tuple

import tensorflow as tf

from estimator_transfer import files
from estimator_transfer.data import images
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import tfrecords
from estimator_transfer.errors import ConfigError

SPLITS = ("train", "validation", "test")
REPORT_FILENAME = "prepare_report.json"
STATE_FILENAME = ".prepare_state.json"
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
  max_image_pixels: int = images.DEFAULT_MAX_PIXELS

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
    images.check_output_dir(self.output_dir, self.image_dir)
    return self


# --- listing and splitting ----------------------------------------------------


def list_images(config: PrepareConfig
                ) -> Tuple[List[str], List[images.ImageItem], List[dict]]:
  """Walks the class folders.

  Returns:
    (class names, candidate images, ignored files as {path, reason}).

  Raises:
    ConfigError: no class folders, a bad --label_map, or a folder missing
      from it.
  """
  folders, ignored = images.list_class_folders(config.image_dir, config.output_dir)
  if config.label_map:
    names = labels_lib.read_label_map(config.label_map)
    images.check_folders_in_label_map(folders, names, config.label_map)
  else:
    names = folders
  items, inside = images.list_folder_images(config.image_dir, config.output_dir,
                                            folders, names)
  return names, items, ignored + inside


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


def shards_per_split(config: PrepareConfig) -> Dict[str, int]:
  """Each split's share of --num_shards (at least 1; 0 for an empty split)."""
  percents = {"validation": config.validation_percent, "test": config.test_percent}
  percents["train"] = 100.0 - percents["validation"] - percents["test"]
  return {split: (max(1, math.ceil(config.num_shards * p / 100.0 - 1e-9)) if p > 0 else 0)
          for split, p in percents.items()}


def _plan(items: Sequence[images.ImageItem], config: PrepareConfig,
          shard_counts: Dict[str, int]) -> Dict[Tuple[str, int], List[images.ImageItem]]:
  """(split, shard) -> its images, in a stable, class-mixed order."""
  plan = {}
  for item in items:
    split = split_of(item.relpath, config.validation_percent, config.test_percent)
    shard = _stable_bucket(item.relpath, "shard:") % shard_counts[split]
    plan.setdefault((split, shard), []).append(item)
  for key in plan:
    plan[key].sort(key=lambda it: (_stable_bucket(it.relpath, "order:"), it.relpath))
  return plan


def _fingerprint(config: PrepareConfig, names, items: Sequence[images.ImageItem]) -> str:
  h = hashlib.sha1()
  h.update(json.dumps([_STATE_VERSION, config.jpeg_quality, config.max_image_side,
                       config.max_image_pixels, list(names)]).encode())
  for item in items:
    h.update(f"{item.relpath}\0{item.size}\0{item.mtime_ns}\0{item.label}\n".encode())
  return h.hexdigest()


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


@contextlib.contextmanager
def _plain_main():
  """Hides the __main__ module while worker processes are spawned.

  A spawned worker re-imports the parent's __main__ (the console script, which
  imports TensorFlow: seconds per worker); the workers need only images.py.
  """
  main = sys.modules.get("__main__")
  sys.modules["__main__"] = types.ModuleType("__main__")
  try:
    yield
  finally:
    sys.modules["__main__"] = main


def _add(into: Dict[str, int], counts: Dict[str, int]) -> None:
  for k, v in counts.items():
    into[k] = into.get(k, 0) + v


class _Run:
  """One run: writes or keeps every shard and tallies what goes into the report."""

  def __init__(self, config: PrepareConfig, names: Sequence[str], total: int,
               log: Callable[[str], None]):
    self.config = config
    self.names = list(names)
    self.total = total
    self.out = config.output_dir
    self.state = _load_state(self.out)
    self.allowed_bad = math.floor(config.max_bad_fraction * total + 1e-9)
    self.progress = _Progress(total, log)
    self.bad_files: List[dict] = []
    self.conversions: Dict[str, int] = {}
    self.split_counts = {split: 0 for split in SPLITS}
    self.written = self.unchanged = 0
    self.workers = config.num_workers or os.cpu_count() or 1
    self._pool = None

  def write_all(self, shard_counts: Dict[str, int], plan) -> None:
    """Writes (or keeps) every split's shards and removes stale ones.

    Raises:
      ConfigError: too many bad images.
    """
    for split in SPLITS:
      if shard_counts[split]:
        self._write_split(split, shard_counts[split], plan)
    for split in SPLITS:  # a split switched off since the last run
      if not shard_counts[split] and tf.io.gfile.isdir(os.path.join(self.out, split)):
        _remove_stale_shards(os.path.join(self.out, split), split, 0, self.state)
    _save_state(self.out, self.state)

  def close(self) -> None:
    if self._pool is not None:
      self._pool.terminate()
      self._pool.join()

  def report(self, ignored: List[dict]) -> dict:
    return {
        "status": "ok",
        "image_dir": self.config.image_dir,
        "output_dir": self.config.output_dir,
        "classes": self.names,
        "images": self.total,
        "examples": self.split_counts,
        "bad": len(self.bad_files),
        "bad_files": sorted(self.bad_files, key=lambda e: e["path"]),
        "ignored": len(ignored),
        "ignored_files": ignored,
        "conversions": self.conversions,
        "shards_written": self.written,
        "shards_unchanged": self.unchanged,
        "options": dataclasses.asdict(self.config),
    }

  def _write_split(self, split: str, num: int, plan) -> None:
    split_dir = os.path.join(self.out, split)
    tf.io.gfile.makedirs(split_dir)
    labels_lib.write_labels_file(os.path.join(split_dir, labels_lib.LABELS_FILENAME),
                                 self.names)
    for shard in range(num):
      items = plan.get((split, shard), [])
      name = tfrecords.shard_name(split, shard, num)
      key = f"{split}/{name}"
      fingerprint = _fingerprint(self.config, self.names, items)
      previous = self.state["shards"].get(key)
      path = os.path.join(split_dir, name)
      if previous and previous["fingerprint"] == fingerprint and tf.io.gfile.exists(path):
        self._keep(split, previous, len(items))
        continue
      record = self._write_shard(path, items)
      self.state["shards"][key] = dict(record, fingerprint=fingerprint)
      _save_state(self.out, self.state)
      _add(self.conversions, record["conversions"])
      self.split_counts[split] += record["examples"]
      self.written += 1
    _remove_stale_shards(split_dir, split, num, self.state)

  def _keep(self, split: str, previous: dict, count: int) -> None:
    """Counts an unchanged shard as the state file describes it."""
    self.bad_files.extend(previous["bad"])
    _add(self.conversions, previous.get("conversions", {}))
    self.split_counts[split] += previous["examples"]
    self.unchanged += 1
    self.progress.update(done=count, bad=len(previous["bad"]), skipped=count)
    self._check_bad()

  def _check_bad(self) -> None:
    if len(self.bad_files) > self.allowed_bad:
      raise ConfigError(
          f"more than --max_bad_fraction={self.config.max_bad_fraction} of the "
          f"{self.total} images are bad ({len(self.bad_files)} so far); see "
          f"{os.path.join(self.out, REPORT_FILENAME)}, fix or remove them, or raise "
          "--max_bad_fraction.")

  def _results(self, items: Sequence[images.ImageItem]):
    """(relpath, ok, payload) per image, converted by the worker processes."""
    if not items:
      return []
    if self._pool is None:
      with _plain_main():
        self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
    c = self.config
    jobs = [(it.relpath, it.path, c.jpeg_quality, c.max_image_side, c.max_image_pixels)
            for it in items]
    return self._pool.imap(images.convert_job, jobs, chunksize=4)

  def _write_shard(self, path: str, items: Sequence[images.ImageItem]) -> dict:
    """Converts and writes one shard (temp name, renamed when complete)."""
    # A TFRecordWriter streams to its file: files.write_atomically cannot take it.
    tmp = files.temp_path(path)
    by_rel = {item.relpath: item for item in items}
    bad, conversions, examples = [], {}, 0
    try:
      with tf.io.TFRecordWriter(tmp) as writer:
        for relpath, ok, payload in self._results(items):
          item = by_rel[relpath]
          if ok:
            encoded, fmt, height, width, note = payload
            writer.write(tfrecords.make_example(
                encoded, item.label, item.class_name, fmt, filename=relpath,
                height=height, width=width).SerializeToString())
            examples += 1
            conversions[note] = conversions.get(note, 0) + 1
            self.progress.update(done=1)
          else:
            entry = {"path": relpath, "reason": payload}
            bad.append(entry)
            self.bad_files.append(entry)
            self.progress.update(done=1, bad=1)
            self._check_bad()
    except BaseException:
      if tf.io.gfile.exists(tmp):
        tf.io.gfile.remove(tmp)
      raise
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return {"examples": examples, "bad": bad, "conversions": conversions}


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
  config.validate()
  names, items, ignored = list_images(config)
  if not items:
    example = f" (e.g. {ignored[0]['path']}: {ignored[0]['reason']})" if ignored else ""
    raise ConfigError(f"no images in the class folders of {config.image_dir}; "
                      f"{len(ignored)} files were ignored{example}: add .jpg/.png "
                      "images to the class folders.")
  out = config.output_dir
  try:
    return _prepare(config, names, items, ignored, log)
  except (OSError, tf.errors.OpError) as e:
    storage = files.storage_error(e, out)
    if storage is None:
      raise
    raise storage from None


def _prepare(config: PrepareConfig, names, items, ignored, log) -> dict:
  out = config.output_dir
  tf.io.gfile.makedirs(out)
  shard_counts = shards_per_split(config)
  plan = _plan(items, config, shard_counts)
  run = _Run(config, names, len(items), log)
  log(f"{len(items)} images in {len(names)} classes -> {out} "
      f"({', '.join(f'{s}: {n} shards' for s, n in shard_counts.items() if n)}), "
      f"{run.workers} processes")
  try:
    run.write_all(shard_counts, plan)
  except ConfigError:
    # Too many bad images: leave a report of what was found so far.
    _write_json(os.path.join(out, REPORT_FILENAME),
                dict(run.report(ignored), status="failed: too many bad images"))
    raise
  finally:
    run.close()
  run.progress.update(force=True)
  labels_lib.write_labels_file(os.path.join(out, labels_lib.LABELS_FILENAME), names)
  report = run.report(ignored)
  _write_json(os.path.join(out, REPORT_FILENAME), report)
  return report


def _is_our_shard(name: str, split: str) -> bool:
  """A shard of `split`, finished or a temporary left by an interrupted run."""
  if not (name.startswith(f"{split}-") and "-of-" in name):
    return False
  # `.tfrecord.tmp`: the temporary name of earlier versions.
  return (name.endswith(".tfrecord") or name.endswith(".tfrecord.tmp") or
          f".tfrecord{files.TEMP_MARK}" in name)


def _remove_stale_shards(split_dir: str, split: str, num: int, state: dict) -> None:
  """Deletes this split's shards of an earlier --num_shards (and temp files)."""
  current = {tfrecords.shard_name(split, i, num) for i in range(num)}
  for name in tf.io.gfile.listdir(split_dir):
    if _is_our_shard(name, split) and name not in current:
      tf.io.gfile.remove(os.path.join(split_dir, name))
      state["shards"].pop(f"{split}/{name}", None)


def _write_json(path: str, data) -> None:
  # indent=1 and no trailing newline: the bytes earlier versions wrote.
  files.write_atomically(path, json.dumps(data, indent=1, sort_keys=True))


def _load_state(out: str) -> dict:
  try:
    state = files.read_json(os.path.join(out, STATE_FILENAME))
  except ValueError:
    state = None  # unreadable: every shard is simply rewritten
  if isinstance(state, dict) and state.get("version") == _STATE_VERSION:
    return state
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
