"""What identifies cached features: the backbone's key and the input's units.

A key names one backbone: a hash of its content (the weights / model /
module files), architecture, image size, value range, output layer
(--backbone_output_layer), freeze point (all, or for a partial cache the cut
layer's name, position and output shape), dtype policy and a hash of the
preprocessing code (decoding, resizing, value range). Files are hashed by
content, so a moved file keeps its key and a changed one (same name) gets a
new one.

A unit is one cached piece of an input: one TFRecord file, or up to
FOLDER_UNIT images of one class folder. Its key hashes the input files
(path, size, mtime), the label keys (and the label map, which turns text
labels and class folders into ids) and, for augmented copies, the
augmentation settings and copy number: a changed input file recomputes only
its unit.

Every hash here is part of the on-disk format: changing what goes into one
invalidates every existing cache (tests/feature_cache/test_key.py pins them).
"""
import ast
import dataclasses
import hashlib
import inspect
import json
import os
import textwrap
from concurrent import futures
from typing import List, Optional, Sequence, Tuple

import tensorflow as tf

from estimator_transfer import files
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.data import preprocessing
from estimator_transfer.data import sources
from estimator_transfer.errors import ConfigError
from estimator_transfer.model import backbone_types
from estimator_transfer.model import split as split_lib

FORMAT_VERSION = 1
FOLDER_UNIT = 256  # image files per unit of an image folder
# Preprocessing versions by the hash of their code without docstrings. Caches
# written before (up to commit b3a58bd) were keyed by the sha1 of the raw
# source; mapping that code's new hash to its old version keeps them valid
# after docstring-only edits. (The syntax tree dump may change with the
# Python version: then caches are recomputed once, never wrongly reused.)
_KNOWN_PREPROCESSING = {"a996176f2cfacca897794b6ff426ebfc0ed939a9": "fb79506afdb1"}
_AUGMENTATION_FIELDS = ("random_flip", "random_crop", "crop_min_area", "rotation_degrees",
                        "brightness", "contrast", "saturation")


# --- the backbone's key ---------------------------------------------------------


def absolute(path: str) -> str:
  """`path` made absolute, unless it is a URL (gs://...), which already is."""
  return path if files.is_remote(path) else os.path.abspath(path)


def content_hash(paths: Sequence[str]) -> str:
  """sha256 of the files (directories: every file, by relative name)."""
  digest = hashlib.sha256()
  for path in paths:
    names = []
    if tf.io.gfile.isdir(path):
      for root, dirs, leaves in tf.io.gfile.walk(path):
        dirs.sort()
        names += [os.path.join(root, n) for n in sorted(leaves)]
    else:
      names = [path]
    for name in names:
      digest.update(os.path.relpath(name, path).encode() + b"\0")
      with tf.io.gfile.GFile(name, "rb") as f:
        while True:
          chunk = f.read(1 << 22)
          if not chunk:
            break
          digest.update(chunk)
  return digest.hexdigest()


def _weights_files(path: str) -> List[str]:
  """A Keras weights file, or a TF-format prefix's index and data files."""
  if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
    return [path]
  return sorted([path + ".index"] + tf.io.gfile.glob(path + ".data-*"))


def policy(config: ExperimentConfig) -> str:
  """The dtype policy (--mixed_precision) the backbone computes features in."""
  return getattr(config.run, "mixed_precision", "float32") or "float32"


def _code(fn) -> str:
  """`fn`'s code as a syntax tree dump: no comments, docstrings, layout or decorators.

  The decorators are tracing hints (autograph's `do_not_convert`); they do
  not change a pixel.
  """
  tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      node.decorator_list = []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
      first = node.body[0]
      if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and
          isinstance(first.value.value, str)):
        node.body = node.body[1:] or [ast.Pass()]
  return ast.dump(tree)


def preprocessing_version() -> str:
  """A hash of the code between image bytes and the backbone's input.

  Any edit of the decoding/resizing or of the value-range mapping gives new
  keys, so features of other pixels are never reused; comments and
  docstrings do not count.
  """
  code = "\n".join(_code(fn) for fn in (preprocessing.decode_and_resize,
                                        backbone_types.to_value_range))
  digest = hashlib.sha1(code.encode()).hexdigest()
  return _KNOWN_PREPROCESSING.get(digest, digest[:12])


def fingerprint(config: ExperimentConfig, resolved: backbone_types.ResolvedBackbone,
                cut: Optional[split_lib.Split] = None) -> Tuple[str, dict]:
  """The cache key of a backbone (or of its frozen part below `cut`).

  Args:
    config: the experiment (its backbone section and dtype policy count).
    resolved: the resolved backbone.
    cut: where a partial cache cuts the backbone; None: the whole backbone.

  Returns:
    (16 hex digits, the details they hash; written as the key's key.json).
  """
  b = config.backbone
  details = {"format": FORMAT_VERSION, "preprocessing": preprocessing_version(),
             "kind": resolved.kind, "image_size": resolved.image_size,
             "value_range": resolved.value_range, "output_layer": b.output_layer,
             "freeze": "all"}
  if cut is not None:
    # The features of the frozen part: the output of the cut layer.
    details["freeze"] = "below cut"
    details["cut"] = {"layer": cut.cut, "index": cut.index, "shape": list(cut.shape)}
  description = resolved.description
  if resolved.kind in ("hub_tf1", "hub_tf2"):
    details["module"] = content_hash([resolved.hub_path])
  elif description.startswith("keras application "):
    details["architecture"] = b.handle.strip()
  else:
    details["model"] = content_hash([description[len("Keras model "):]])
  if policy(config) != "float32":
    details["policy"] = policy(config)
  weights = b.weights.strip()
  if weights.lower() == "none" or (not weights and "architecture" in details):
    details["weights"] = "random (pinned by the snapshot)"
  elif weights:
    details["weights"] = content_hash(_weights_files(weights))
  return json_sha1(details)[:16], details


def json_sha1(value) -> str:
  """sha1 hex digest of `value` as JSON with sorted keys (the key hashes)."""
  return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()


# --- units --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
  """One cached piece of an input: a TFRecord file or a chunk of a class folder."""
  key: str
  kind: str  # tfrecord | folder
  files: Tuple[str, ...]
  labels: Tuple[int, ...]  # folder: label id per file
  label_is_text: bool
  copy: int  # augmented copy number; -1: not augmented
  seed: int  # base of the augmentation seeds
  describe: str


@dataclasses.dataclass(frozen=True)
class _Group:
  """Input files cached together, before copies are keyed."""
  files: Tuple[str, ...]
  labels: Tuple[int, ...]
  stats: Tuple[Tuple[int, int], ...]  # (size, mtime_nsec) per file
  describe: str


def _stats(paths: Sequence[str]) -> List[Tuple[int, int]]:
  def stat(path):
    s = tf.io.gfile.stat(path)
    return int(s.length), int(s.mtime_nsec)
  with futures.ThreadPoolExecutor(max_workers=16) as pool:
    return list(pool.map(stat, paths))


def augmentation_settings(config: ExperimentConfig) -> dict:
  """The augmentation flags an augmented copy's features depend on."""
  return {k: getattr(config.input, k) for k in _AUGMENTATION_FIELDS}


def _groups(source) -> List[_Group]:
  """A TFRecord file each, or runs of up to FOLDER_UNIT files of one class."""
  stats = _stats(source.files)
  if source.kind == "tfrecord":
    return [_Group((path,), (), (stat,), path) for path, stat in zip(source.files, stats)]
  groups, start = [], 0
  for end in range(1, len(source.files) + 1):
    if (end == len(source.files) or source.labels[end] != source.labels[start] or
        end - start == FOLDER_UNIT):
      chunk = source.files[start:end]
      groups.append(_Group(tuple(chunk), tuple(source.labels[start:end]),
                           tuple(stats[start:end]),
                           f"{len(chunk)} images in {os.path.dirname(chunk[0])} "
                           f"({os.path.basename(chunk[0])}...)"))
      start = end
  return groups


def unit_keys(base: dict, copy: int, augmentation: Optional[dict]) -> Tuple[str, int]:
  """(unit key, augmentation seed base) of one copy of a group.

  Args:
    base: what identifies the group's examples: kind, labels (label keys and
      map), label ids and [absolute path, size, mtime] per file.
    copy: the augmented copy number; -1: not augmented.
    augmentation: `augmentation_settings` for a copy >= 0, else None.
  """
  keyed = dict(base, copy=copy, augmentation=augmentation)
  return json_sha1(keyed)[:24], int(json_sha1(base)[:12], 16)


def list_units(config: ExperimentConfig, data: str, training: bool,
               class_names: Sequence[str] = ()) -> List[Unit]:
  """The units of a data spec (augmented copies for training with K > 0).

  Raises:
    ConfigError: the data cannot be read, or is not images (CSV).
  """
  source = sources.resolve_source(config.input, data, class_names)
  if source.kind == "csv":
    raise ConfigError(f"--cache_features caches backbone features of images, but "
                      f"{data} is CSV data without a backbone; drop --cache_features.")
  i = config.input
  # Int labels are cached minus --label_offset (the label map only bounds them); text
  # labels become ids through the label map; folder ids are in the key below.
  labels_part = {"image_key": i.image_key, "label_key": i.label_key,
                 "text": source.label_is_text,
                 "class_names": list(source.class_names) if source.label_is_text else []}
  if i.label_offset and source.kind == "tfrecord" and not source.label_is_text:
    labels_part["label_offset"] = i.label_offset  # cached ids are offset (0: keys as before)
  copies = [-1]
  if training and i.cache_features_with_augmentation:
    copies = list(range(i.cache_features_with_augmentation))
  units = []
  for group in _groups(source):
    base = {"kind": source.kind, "labels": labels_part, "label_ids": list(group.labels),
            "files": [[absolute(f), size, mtime]
                      for f, (size, mtime) in zip(group.files, group.stats)]}
    for copy in copies:
      key, seed = unit_keys(base, copy, augmentation_settings(config) if copy >= 0 else None)
      units.append(Unit(key, source.kind, group.files, group.labels, source.label_is_text,
                        copy, seed,
                        group.describe + (f" (augmented copy {copy})" if copy >= 0 else "")))
  return units
