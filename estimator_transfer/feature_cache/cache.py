"""Feature-cache mode: a frozen backbone runs once, the head trains on its features.

With `--freeze=all` and no augmentation every epoch of ordinary training
recomputes the same backbone features. With `--cache_features=DIR` they are
computed once, in batches, in a standalone graph and session (extractor.py),
and written as TFRecords (store.py) under a key that names the backbone and
units that name the input (key.py). The head then trains in the ordinary
Estimator/model_fn machinery (checkpoints, schedules, EMA, early stopping,
hooks, cluster jobs) from features {"backbone_features": float32 [batch, D]}
(input_fn.py); evaluation reads the cache too. Exports still take images
(see "Export" below).

A unit is used only when its marker names the current snapshot, so features
of different backbone values are never mixed; a changed input file
recomputes only its unit, a changed backbone gives another key. Concurrent
writers (two jobs, cluster workers) compute the missing units in random
order and re-check each one just before computing it, so at worst a unit is
computed twice, with the same result. A killed run leaves units without
markers, which the next run recomputes, and temporary files, which are
removed after an hour.

The snapshot also pins random initial weights (`--backbone_weights=none`, a
Keras application without weights): the cache keeps the values it drew.

Export: training pins the snapshot into `model_dir/feature_cache/backbone/`
(a run whose cache was rebuilt with other values is refused), and
`FeatureCache.full_checkpoint` composes it with a head checkpoint (head, EMA
averages, optimizer state, global step) into an ordinary checkpoint of the
full model in `model_dir/feature_cache/full/`, which the exporters serve like
any other: the exported model takes image bytes exactly like an uncached one.

Augmented copies (`--cache_features_with_augmentation=K`): each training
image is cached K times, each copy with its own fixed random augmentation
(stateless seeds from the unit and copy number, so a recomputed unit is
identical); evaluation data is never augmented. The trade-off: K times the
extraction time and disk, and the head sees only K variants of each image
however many epochs it trains (uncached training draws fresh ones every
epoch), so a large number of epochs over few copies overfits to them; an
"epoch" (epoch boundaries, --train_size) still counts the original images.
Mixup mixes images before the backbone and cannot be cached.

Partial cache (a partial freeze: --freeze=last:N, until:LAYER, or an unfreeze
schedule whose lower part stays frozen): the features are the output of the
cut layer below everything any stage trains (model/split.py), keyed by the
cut too; training builds only the layers above the cut and the head, with the
variable names of the full network, so a checkpoint holds the trained top and
head, and `full_checkpoint` composes it with the snapshot (whose values below
the cut the features were computed with) into the full model. The snapshot
holds the whole backbone; only its values below the cut must agree with a
checkpoint trained without the cache.
"""
import logging
import os
import random
import time
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from estimator_transfer.config import ExperimentConfig
from estimator_transfer.errors import ConfigError
from estimator_transfer.feature_cache import key as key_lib
from estimator_transfer.feature_cache import store
from estimator_transfer.feature_cache.extractor import Extractor
from estimator_transfer.feature_cache.input_fn import CachedData, build_cached_input_fn
from estimator_transfer.model import backbone_types
from estimator_transfer.model import backbones
from estimator_transfer.model import split as split_lib

log = logging.getLogger("estimator_transfer")


class FeatureCache:
  """The feature cache of one config (its backbone's key under --cache_features)."""

  def __init__(self, config: ExperimentConfig,
               resolved: Optional[backbone_types.ResolvedBackbone] = None):
    """Resolves the key (hashes the backbone's files); computes nothing yet.

    Raises:
      ConfigError: no --cache_features, or a backbone that cannot be resolved.
    """
    if not config.input.cache_features:
      raise ConfigError("--cache_features=DIR is required for the feature cache.")
    self.config = config
    self.resolved = resolved or backbones.resolve(config.backbone)
    self._extractor = None
    if split_lib.is_partial(config) and split_lib.needs_layout(self.resolved):
      # The extraction graph builds the model anyway: the cut is read from it.
      self._extractor = Extractor(config, self.resolved,
                                  lambda: split_lib.cut_point(config, self.resolved))
    # A partial freeze caches the frozen part below this cut (None: all of it).
    self.cut = split_lib.cut_point(config, self.resolved)
    self.key, self.details = key_lib.fingerprint(config, self.resolved, self.cut)
    self.root = os.path.join(config.input.cache_features, self.key)
    model_dir = config.run.model_dir
    self.model_dir_root = os.path.join(model_dir, store.MODEL_DIR_SUBDIR) if model_dir else ""

  @property
  def snapshot_dir(self) -> str:
    return os.path.join(self.root, store.SNAPSHOT_DIRNAME)

  @property
  def pinned_snapshot_dir(self) -> str:
    return (os.path.join(self.model_dir_root, store.SNAPSHOT_DIRNAME)
            if self.model_dir_root else "")

  def _extractor_for(self) -> Extractor:
    if self._extractor is None:
      self._extractor = Extractor(self.config, self.resolved, self.cut)
    return self._extractor

  def close(self) -> None:
    """Frees the extraction graph and session (rebuilt when needed again)."""
    if self._extractor is not None:
      self._extractor.close()
      self._extractor = None

  # --- snapshot --------------------------------------------------------------

  def snapshot(self, pin: bool = False) -> store.Snapshot:
    """The snapshot the cache computes with: found, restored from the pin, or made.

    Args:
      pin: also pin it into model_dir (training does).

    Raises:
      ConfigError: model_dir pins another snapshot than the cache holds.
    """
    tf.io.gfile.makedirs(self.root)
    store.remove_stale_temps(self.root)
    store.write_key(self.root, self.details)
    pinned = store.read_snapshot(self.pinned_snapshot_dir) if self.model_dir_root else None
    cached = store.read_snapshot(self.snapshot_dir) or self._publish_snapshot(pinned)
    if pinned is not None and pinned.id != cached.id:
      raise ConfigError(
          f"{self.config.run.model_dir} was trained on features of backbone snapshot "
          f"{pinned.id} but the feature cache {self.root} now holds {cached.id} (it "
          "was rebuilt with other backbone values, e.g. new random weights); start a "
          f"new --model_dir, or delete {self.snapshot_dir} to rebuild the cache from "
          "the model's snapshot.")
    if pinned is None and self.model_dir_root:
      self._check_checkpoint_agrees(cached)
      if pin:
        self._pin(cached)
    return cached

  def _publish_snapshot(self, pinned: Optional[store.Snapshot]) -> store.Snapshot:
    """Writes the cache's snapshot: the model's pinned one, or the backbone's values."""
    tmp = store.temp_dir(self.snapshot_dir)
    if pinned is not None:
      # The cache was deleted: rebuild it from the values the head knows.
      store.copy_dir(pinned.directory, tmp)
    else:
      log.info("feature cache: writing the backbone snapshot of %s into %s",
               self.resolved.description, self.snapshot_dir)
      self._extractor_for().new_snapshot(tmp, self.details)
    store.publish_dir(tmp, self.snapshot_dir)  # or another writer's went first
    cached = store.read_snapshot(self.snapshot_dir)
    if cached is None:
      raise ConfigError(f"the backbone snapshot {self.snapshot_dir} is incomplete; "
                        "delete it to rebuild it.")
    return cached

  def _pin(self, cached: store.Snapshot) -> None:
    """Copies the snapshot into model_dir: what the head is trained on."""
    tmp = store.temp_dir(self.pinned_snapshot_dir)
    store.copy_dir(cached.directory, tmp)
    store.publish_dir(tmp, self.pinned_snapshot_dir)
    pinned = store.read_snapshot(self.pinned_snapshot_dir)
    if pinned is None or pinned.id != cached.id:
      raise ConfigError(f"{self.pinned_snapshot_dir} could not be written or "
                        "holds another snapshot; start a new --model_dir.")

  def _check_checkpoint_agrees(self, snapshot: store.Snapshot) -> None:
    """A model_dir trained without the cache must hold the snapshot's values.

    Otherwise (e.g. random backbone weights drawn twice) its head would train
    on, or be evaluated on, features of another backbone than its own.
    """
    latest = tf.train.latest_checkpoint(self.config.run.model_dir)
    if not latest:
      return
    try:
      reader = tf.train.load_checkpoint(latest)
    except (tf.errors.OpError, ValueError):
      return  # a broken checkpoint: the resume logic reports or skips it
    names = reader.get_variable_to_shape_map()
    snapshot_reader = tf.train.load_checkpoint(snapshot.prefix)
    # With a partial cache only the frozen part's values decide the features.
    frozen = set(self.cut.bottom_weights) if self.cut is not None else None
    for name in snapshot_reader.get_variable_to_shape_map():
      if name in names and (frozen is None or name in frozen) and not np.array_equal(reader.get_tensor(name),
                                              snapshot_reader.get_tensor(name)):
        raise ConfigError(
            f"the checkpoint {latest} holds other backbone values ({name}) than the "
            f"feature cache's snapshot {snapshot.directory}; start a new --model_dir "
            f"(--warm_start_from={self.config.run.model_dir} keeps the head) or train "
            "it without --cache_features.")

  # --- units -----------------------------------------------------------------

  def _compute(self, unit: key_lib.Unit, snapshot: store.Snapshot,
               class_names: Sequence[str], num_classes: int) -> dict:
    extractor = self._extractor_for()
    extractor.use(snapshot)
    features, labels = extractor.run(unit, class_names)
    bound = max(num_classes, len(class_names))
    wrong = (labels < 0) | ((labels >= bound) if bound else False)
    if wrong.any():
      detail = ("a class name that is not in the label map" if unit.label_is_text
                else f"label {labels[wrong][0]}, outside [0, {bound or 'num_classes'})")
      raise ConfigError(f"{unit.describe} has {detail}; fix the data, --label_map "
                        "or --num_classes.")
    total = (sum(store.count_records(f) for f in unit.files) if unit.kind == "tfrecord"
             else len(unit.files))
    skipped = max(0, total - len(labels))
    if skipped:
      log.warning("feature cache: skipped %d corrupt record(s) of %s "
                  "(--on_bad_record=skip)", skipped, unit.describe)
    return store.write_unit(self.root, unit, snapshot, features, labels, skipped)

  def prepare(self, data: str, training: bool, class_names: Sequence[str] = (),
              num_classes: int = 0) -> CachedData:
    """Computes what is missing of `data`'s features; returns where they are.

    Args:
      data: TFRecords (file, glob, dir) or an image folder.
      training: the training data (augmented copies with K > 0; pins the
        snapshot into model_dir).
      class_names: the label map (text labels, class folders; bounds labels).
      num_classes: bounds int labels without a label map (0: unchecked).

    Raises:
      ConfigError: the data cannot be read or has a wrong label or, with
        --on_bad_record=fail, a corrupt record; a snapshot mismatch.
    """
    units = key_lib.list_units(self.config, data, training, class_names)
    snapshot = self.snapshot(pin=training)
    units_dir = os.path.join(self.root, store.UNITS_DIRNAME)
    tf.io.gfile.makedirs(units_dir)
    store.remove_stale_temps(units_dir)
    markers = {u.key: store.done_marker(self.root, u.key, snapshot) for u in units}
    missing = [u for u in units if markers[u.key] is None]
    computed, compute_seconds = 0, 0.0
    if missing:
      log.info("feature cache %s: %d of %d units of %s to compute (%s)", self.root,
               len(missing), len(units), data, self.resolved.description)
      computed, compute_seconds = self._compute_missing(missing, markers, snapshot,
                                                        class_names, num_classes)
    counts = [int(markers[u.key]["count"]) for u in units]
    if not sum(counts):
      raise ConfigError(f"no example of {data} could be read for the feature cache; "
                        "check the data (and --image_key/--label_key).")
    return CachedData([store.unit_paths(self.root, u.key)[0] for u in units], counts,
                      snapshot.feature_dim, computed, units, compute_seconds,
                      self.cut.shape if self.cut is not None else ())

  def describe(self) -> str:
    """What the cache holds, for the start banner."""
    if self.cut is None:
      return f"features of the whole frozen backbone, in {self.root}"
    return (f"frozen part of the backbone: {self.cut.describe()}; the layers above it "
            f"and the head train on them; in {self.root}")

  def _compute_missing(self, missing, markers, snapshot, class_names, num_classes):
    """Computes the `missing` units another writer has not done; fills `markers`.

    Returns:
      (units computed, seconds spent computing them).
    """
    # Random order: concurrent writers mostly take different units.
    random.SystemRandom().shuffle(missing)
    computed, compute_seconds, examples = 0, 0.0, 0
    for n, unit in enumerate(missing):
      markers[unit.key] = store.done_marker(self.root, unit.key, snapshot)  # another's?
      if markers[unit.key] is None:
        self._extractor_for().use(snapshot)  # graph built before the clock starts
        unit_start = time.time()
        markers[unit.key] = self._compute(unit, snapshot, class_names, num_classes)
        compute_seconds += time.time() - unit_start
        computed += 1
        examples += markers[unit.key]["count"]
      log.info("feature cache: %d/%d units, %d examples, %.0f examples/s", n + 1,
               len(missing), examples, examples / max(compute_seconds, 1e-9))
    return computed, compute_seconds

  # --- export ------------------------------------------------------------------

  def full_checkpoint(self, head_checkpoint: str) -> str:
    """An ordinary checkpoint of the full model: pinned backbone + `head_checkpoint`.

    Every tensor of the head checkpoint (head, EMA averages, optimizer state,
    global step) is kept; the backbone's values are the snapshot the head
    was trained on. Written once per head checkpoint (under a temporary
    name, then renamed) into model_dir/feature_cache/full/; the newest
    keep_checkpoint_max are kept.

    Raises:
      ConfigError: model_dir pins no snapshot (not trained with the cache).
    """
    pinned = store.read_snapshot(self.pinned_snapshot_dir) if self.model_dir_root else None
    if pinned is None:
      raise ConfigError(
          f"{self.config.run.model_dir} holds no backbone snapshot "
          f"({store.MODEL_DIR_SUBDIR}/{store.SNAPSHOT_DIRNAME}/), so it was not trained "
          "with --cache_features; export it without --cache_features.")
    return store.compose_full_checkpoint(
        pinned, head_checkpoint, os.path.join(self.model_dir_root, store.FULL_DIRNAME),
        self.config.run.keep_checkpoint_max)


def build_input_fn(cache: FeatureCache, data: str, training: bool,
                   seed: Optional[int] = None, num_epochs: Optional[int] = None, *,
                   class_names: Sequence[str] = (), num_classes: int = 0) -> Callable:
  """An Estimator input_fn over `data`'s cached features (computed now if missing).

  Yields ({"backbone_features": float32 [batch, D]}, int32 labels [batch]).
  Training shuffles (every cached example, when they fit in 1 GiB of memory;
  else the files and a --shuffle_buffer window), repeats and, under
  TF_CONFIG, takes this worker's files (or records, with fewer files than
  workers); evaluation reads everything once, in order.

  Args:
    cache: the FeatureCache.
    data: TFRecords (file, glob, dir) or an image folder.
    training: shuffle, repeat, shard by worker; augmented copies (K > 0).
    seed: shuffle seed; None: nondeterministic.
    num_epochs: epochs when training (None: forever).
    class_names: the data's label map.
    num_classes: bounds int labels without a label map.

  Returns:
    input_fn(params=None, config=None, input_context=None), with the
    attribute `cached` (the CachedData).

  Raises:
    ConfigError: see `FeatureCache.prepare`.
  """
  cached = cache.prepare(data, training, class_names, num_classes)
  return build_cached_input_fn(cached, cache.config.input, training, seed, num_epochs)
