"""The tf.data input_fn over TFRecords of tf.Example, image folders and CSV files.

Image sources yield ({"image": float32 [batch, size, size, 3] in [0, 1]},
int32 labels) through the same `preprocessing.decode_and_resize` the export
uses; training may add augmentation after it (`augment.py`) and, with mixup,
float32 [batch, num_classes] soft labels. CSV files yield
({"features": float32 [batch, n]}, int32 labels).

How the pipeline is laid out (and why):

* The data is split into units (a TFRecord or CSV file, or a chunk of 64
  image files). When training, the units (and a folder's files) are permuted
  per epoch and records are permuted within windows of each unit, with
  stateless seeds, so `--seed` fixes the order whatever the parallelism;
  under TF_CONFIG each worker takes every n-th file (or, with fewer files
  than workers, every n-th record). A parallel interleave reads the units
  (`units.UnitReader`).
* Per element only integers travel along; once per batch
  (`units.BatchSettler`) the skipped records are counted, reported and the
  labels checked.
* Decoded examples are cached after the first pass when `--cache` says so
  (`memory_cache.decide`: by default when the decoded training set fits the
  memory budget); the cached epochs are shuffled with --shuffle_buffer, and
  augmentation and mixup follow the cache.
"""
import hashlib
import logging
import os
import random
import sys
from typing import Optional, Sequence, Tuple

import tensorflow as tf
from tensorflow.python.autograph.core import ag_ctx

from estimator_transfer.config import InputConfig
from estimator_transfer.data import augment as augment_lib
from estimator_transfer.data import bad_records
from estimator_transfer.data import memory_cache
from estimator_transfer.data import sources
from estimator_transfer.data import units as units_lib
from estimator_transfer.errors import ConfigError

IMAGE_FEATURE = "image"
NUMERIC_FEATURE = "features"
FOLDER_CHUNK = 64  # image files per interleaved unit
log = logging.getLogger("estimator_transfer")


def shard_spec(run_config, input_context) -> Tuple[int, int]:
  """(number of input pipelines, this one's index) for disjoint worker data.

  Args:
    run_config: the Estimator's RunConfig (gives the worker under TF_CONFIG),
      or None.
    input_context: a tf.distribute.InputContext, or None.
  """
  if input_context is not None and input_context.num_input_pipelines > 1:
    return input_context.num_input_pipelines, input_context.input_pipeline_id
  if run_config is not None:
    workers = getattr(run_config, "num_worker_replicas", 1) or 1
    index = getattr(run_config, "global_id_in_cluster", None)
    if workers > 1 and index is not None and index < workers:
      return workers, index
  return 1, 0


def prefetch(ds: tf.data.Dataset, batches: int) -> tf.data.Dataset:
  """`--prefetch`: batches prepared ahead of the step (-1: AUTOTUNE, 0: none)."""
  if batches == 0:
    return ds
  return ds.prefetch(tf.data.AUTOTUNE if batches < 0 else batches)


def without_autotune(ds: tf.data.Dataset) -> tf.data.Dataset:
  """`ds` without tf.data's autotuning thread (options on the root dataset).

  For a pipeline that leaves nothing to tune (examples held in memory, a
  short pass): the autotuning thread sleeps ever longer between its rounds,
  and closing the session that holds the iterator waits for it to wake
  (measured: 0-28 s at the end of training, 2.5-10 s at the end of a
  feature extraction). Parallel maps then run on as many threads as cores.
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


def autograph_off():
  """Builds the pipeline's functions as written, without autograph's conversion.

  Every function here is plain graph code (tf.cond, tf.where; Python `if`s
  test Python values only), and converting them (and everything they call)
  took ~1.3 s of each input_fn call: of every start, and of every evaluation
  in the train/evaluate loop (scripts/benchmark.py --only=startup). A Python
  `if` on a tensor now fails loudly at tracing time instead of being
  converted. (Nested functions traced inside inherit the status.)
  """
  return ag_ctx.ControlStatusCtx(status=ag_ctx.Status.DISABLED)


def random_base_seed() -> int:
  """A base seed for runs without --seed (nondeterministic by request)."""
  return random.SystemRandom().randrange(2**31)


class _Pipeline:
  """Builds the tf.data graph for one Source (see the module docstring)."""

  def __init__(self, source: sources.Source, config: InputConfig, image_size: int,
               training: bool, seed: Optional[int], num_epochs: Optional[int],
               num_classes: int, cache: str = ""):
    self.source = source
    self.cache = cache  # memory_cache.Decision.mode: "", "memory" or a path prefix
    self.config = config
    self.image_size = image_size
    self.training = training
    self.seed = seed
    self.num_epochs = num_epochs
    self.num_classes = max(num_classes, len(source.class_names))
    self.parallel = (tf.data.AUTOTUNE if config.num_parallel_calls < 0
                     else config.num_parallel_calls)
    self.deterministic = seed is not None or not training
    self.base_seed = seed if seed is not None else random_base_seed()
    # Ends a TFRecord file's stream; no real record equals 32 random bytes.
    self.nonce = os.urandom(32)
    if source.kind == "csv":
      self.feature_key = NUMERIC_FEATURE
      self.value_shape = [len(source.csv_columns) - 1]
    else:
      self.feature_key = IMAGE_FEATURE
      self.value_shape = [image_size, image_size, 3]
    self.counter = None
    self._units_python = []

  # --- units, epochs ---------------------------------------------------------

  def _cycle_length(self) -> int:
    count = len(self._units_python)
    if self.source.kind == "folder" and self.training:
      count = -(-len(self._units_python[0][0]) // FOLDER_CHUNK)
    return max(1, min(count, max(4, os.cpu_count() or 1)))

  def _python_units(self, num_shards: int, shard_index: int):
    """Units as Python lists: (names, labels, size, id) per unit, this worker's share."""
    s = self.source
    if s.kind == "folder":
      pairs = list(zip(s.files, s.labels))
      if self.training and num_shards > 1:
        pairs = pairs[shard_index::num_shards]
      if self.training and pairs:
        # Folder units are rebuilt per epoch from the shuffled list (see
        # _epoch_units); here: one unit with every file.
        return [([p for p, _ in pairs], [l for _, l in pairs], -1, 0)]
      return [([p for p, _ in pairs[i:i + FOLDER_CHUNK]],
               [l for _, l in pairs[i:i + FOLDER_CHUNK]], -1, i // FOLDER_CHUNK)
              for i in range(0, len(pairs), FOLDER_CHUNK)]
    sizes = s.sizes or (-1,) * len(s.files)
    # The unit id is the file's index in the source: messages name it by that.
    found = [([f], [-1], size, i) for i, (f, size) in enumerate(zip(s.files, sizes))]
    if self.training and num_shards > 1 and len(found) >= num_shards:
      found = found[shard_index::num_shards]
    return found

  def _epoch_units(self, epoch):
    """This epoch's units, shuffled when training, as (id, names, labels, size)."""
    if self.source.kind == "folder" and self.training:
      (paths, ids, _, _), = self._units_python
      files = tf.data.Dataset.from_tensor_slices(units_lib.permuted(
          (tf.constant(paths), tf.constant(ids, tf.int32)),
          units_lib.stateless_seed(self.base_seed, epoch, 0, 1)))
      chunks = files.batch(FOLDER_CHUNK)
      return chunks.enumerate().map(
          lambda i, c: (i, c[0], c[1], tf.constant(-1, tf.int64), epoch))
    found = self._units_python
    width = max(len(u[0]) for u in found)
    names = [u[0] + [""] * (width - len(u[0])) for u in found]
    labels = [u[1] + [-1] * (width - len(u[1])) for u in found]
    counts = [len(u[0]) for u in found]
    table = (tf.constant([u[3] for u in found], tf.int64), tf.constant(names),
             tf.constant(labels, tf.int32), tf.constant(counts, tf.int64),
             tf.constant([u[2] for u in found], tf.int64))
    if self.training:
      table = units_lib.permuted(table, units_lib.stateless_seed(self.base_seed, epoch, 0, 1))
    ds = tf.data.Dataset.from_tensor_slices(table)
    return ds.map(lambda i, n, l, c, size: (i, n[:c], l[:c], size, epoch))

  def _one_pass_or_epochs(self, epochs, shards):
    reader = units_lib.UnitReader(
        self.source, self.config, self.image_size, self.training, self.parallel,
        self._cycle_length(), self.base_seed, self.nonce, self.value_shape)
    return epochs.flat_map(self._epoch_units).interleave(
        lambda i, n, l, size, epoch: reader.read(i, n, l, size, epoch, shards),
        cycle_length=self._cycle_length(), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=self.deterministic)

  # --- the whole dataset -----------------------------------------------------

  def dataset(self, batch_size: int, shards: Tuple[int, int]) -> tf.data.Dataset:
    """The batched dataset of (features, labels)."""
    self.counter = bad_records.get_or_create_counter()
    num_shards, shard_index = shards
    self._units_python = self._python_units(num_shards, shard_index)
    if not self._units_python or not any(u[0] for u in self._units_python):
      raise ConfigError(f"worker {shard_index} of {num_shards} has no data to read; "
                        "give more files or shards than workers.")
    ds = self._examples(shards)
    if self.training:
      ds = self._augment(ds)
    ds = ds.batch(batch_size)
    exact = not (self.training and self.source.kind != "folder" and
                 self.config.shuffle_buffer > 0) and not units_lib.record_sharded(
                     self.source, num_shards)
    settle = units_lib.BatchSettler(self.source, self.counter,
                                    self.config.on_bad_record == "fail",
                                    self.num_classes, exact)
    ds = ds.map(settle, num_parallel_calls=self.parallel,
                deterministic=self.deterministic)
    # A batch of nothing but skipped records (rare) is dropped, not trained on.
    ds = ds.filter(lambda v, l: tf.shape(l)[0] > 0)
    ds = ds.map(lambda v, l: ({self.feature_key: v}, l))
    if self.training and self.config.mixup_alpha > 0 and self.feature_key == IMAGE_FEATURE:
      ds = self._mixup(ds)
    options = tf.data.Options()
    options.deterministic = self.deterministic
    # One thread per tf.data op: the pipeline's parallelism comes from its
    # parallel maps and interleave, and it must not spread single ops over
    # the cores the training step needs (the tf.data performance guide's
    # advice; measured by scripts/benchmark.py --only=input).
    options.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(options)
    if self.cache == memory_cache.MEMORY:
      # From the second epoch on the examples come from memory: nothing to tune.
      ds = without_autotune(ds)
    return prefetch(ds, self.config.prefetch)

  def _examples(self, shards):
    """Unbatched (value, label, status) for every epoch, cached if asked."""
    cache = self.cache
    repeat_outside = not self.training or bool(cache)
    if repeat_outside:
      epochs = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))
    else:
      count = -1 if self.num_epochs is None else self.num_epochs
      epochs = tf.data.Dataset.range(count) if count >= 0 else \
          tf.data.Dataset.range(sys.maxsize)
    ds = self._one_pass_or_epochs(epochs, shards)
    if cache:
      # Decoded once; the shuffle, the augmentation and mixup come after the
      # cache, so they still draw new values every epoch.
      ds = ds.cache("" if cache == memory_cache.MEMORY else self._cache_path(shards))
      if self.training:
        if self.config.shuffle_buffer > 0:
          ds = ds.shuffle(self.config.shuffle_buffer, seed=self.base_seed,
                          reshuffle_each_iteration=True)
        ds = ds.repeat(self.num_epochs)
    return ds

  def _augment(self, ds):
    fn = augment_lib.build_augment_fn(self.config, self.image_size)
    if fn is None or self.feature_key != IMAGE_FEATURE:
      return ds
    base = self.base_seed + 1
    return ds.enumerate().map(
        lambda i, example: (fn(example[0], tf.stack([tf.constant(base, tf.int64), i])),
                            example[1], example[2]),
        num_parallel_calls=self.parallel, deterministic=self.deterministic)

  def _mixup(self, ds):
    alpha, num_classes = self.config.mixup_alpha, self.num_classes
    base = self.base_seed + 2

    def mix(i, batch):
      features, labels = batch
      images, soft = augment_lib.mixup(features[IMAGE_FEATURE], labels, num_classes,
                                       alpha, tf.stack([tf.constant(base, tf.int64), i]))
      return {IMAGE_FEATURE: images}, soft

    return ds.enumerate().map(mix, num_parallel_calls=self.parallel,
                              deterministic=self.deterministic)

  def _cache_path(self, shards) -> str:
    key = "|".join([self.source.kind, *self.source.files, str(self.image_size),
                    str(shards), str(self.training)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    directory = os.path.dirname(self.cache)
    if directory:
      tf.io.gfile.makedirs(directory)
    return f"{self.cache}-{'train' if self.training else 'eval'}-{digest}"


def build_input_fn(config: InputConfig, data: str, image_size: int,
                   training: bool, seed: Optional[int] = None,
                   num_epochs: Optional[int] = None, *,
                   class_names: Sequence[str] = (), num_classes: int = 0):
  """Returns an Estimator input_fn for TFRecords, an image folder or CSV files.

  Args:
    config: the input config (batch size, feature keys, parallelism, bad-record
      policy, cache, augmentation).
    data: TFRecord file/glob/dir, an image folder with class sub-folders, or a
      CSV file/glob (`*.csv`).
    image_size: the backbone's input size.
    training: shuffle, augment, shard by worker and repeat (for `num_epochs`,
      or forever when None).
    seed: seed of the order and the augmentations; None: nondeterministic.
    num_epochs: epochs when training; ignored for evaluation (one pass).
    class_names: the label map (line i = class i): maps class folders and text
      labels to ids and bounds int labels.
    num_classes: bounds int labels when there is no label map (0: unchecked).

  Returns:
    input_fn(params=None, config=None, input_context=None) -> tf.data.Dataset;
    Estimator passes its RunConfig as `config`, which gives the worker shard
    under TF_CONFIG.

  Raises:
    ConfigError: the data cannot be found or does not fit the keys/labels.
  """
  source = sources.resolve_source(config, data, class_names)
  if training and config.mixup_alpha > 0 and max(num_classes,
                                                 len(source.class_names)) < 2:
    raise ConfigError("--mixup_alpha needs the number of classes; set --num_classes "
                      "or give a label map.")
  batch_size = config.batch_size if training else (config.eval_batch_size or
                                                   config.batch_size)
  decision = memory_cache.decide(config, source, image_size, training, num_epochs)
  if training and decision.mode:
    log.info("input pipeline %s: %s", data, decision.reason)

  def input_fn(params=None, config=None, input_context=None):  # pylint: disable=redefined-outer-name
    del params
    shards = shard_spec(config, input_context) if training else (1, 0)
    pipeline = _Pipeline(source, input_config, image_size, training, seed, num_epochs,
                         num_classes, decision.mode)
    with autograph_off():
      ds = pipeline.dataset(batch_size, shards)
    input_fn.bad_record_counter = pipeline.counter
    return ds

  input_config = config
  input_fn.source = source
  input_fn.cache_decision = decision
  return input_fn
