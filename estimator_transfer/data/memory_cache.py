"""--cache=auto: keep the decoded training set in memory when it fits a budget.

Decoding (JPEG/PNG, resize) is most of an input pipeline's work, and every
epoch repeats it. With `--cache=auto` (the default) the training pipeline
caches its decoded examples in memory after the first pass when they fit
`--cache_budget_mb` (0: a quarter of this machine's memory); later epochs
read them back and only shuffle, augment (after the cache, fresh random
values every epoch) and batch. The decision is an estimate made before
anything is read in full:

* examples: an image folder's file count; for TFRecords the total file size
  divided by the mean size of the first file's first records;
* bytes: examples x size x size x 3 x 4 (float32 pixels, as decoded).

Not cached by `auto` in the pipeline: evaluation data (each evaluation reads
it once; evaluations while training keep their decoded batches instead, under
the same budget: `training.eval_batches`), CSV data (cheap to parse), a
single-epoch pipeline, and a set over the budget.
`--cache=memory` caches regardless, `--cache=PATH` into files, `--cache=off`
never.
"""
import dataclasses
import os
from typing import Optional, Sequence

import tensorflow as tf

from estimator_transfer.config import InputConfig
from estimator_transfer.data import sources

AUTO = "auto"
MEMORY = "memory"
OFF_VALUES = ("", "off", "none")
_SAMPLE_RECORDS = 64
_PER_EXAMPLE_OVERHEAD = 64  # label, status and tensor bookkeeping


@dataclasses.dataclass(frozen=True)
class Decision:
  """What the training pipeline caches, and why (for the start banner)."""
  mode: str  # "" (off), "memory", or a file path prefix
  reason: str


def budget_bytes(config: InputConfig) -> int:
  """--cache_budget_mb in bytes; 0 gives a quarter of the machine's memory."""
  mb = getattr(config, "cache_budget_mb", 0)
  if mb > 0:
    return int(mb) << 20
  try:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    total = 8 << 30  # not on a POSIX system: assume 8 GiB
  return int(total) // 4


def estimate_examples(source: sources.Source) -> int:
  """The number of examples of an image source, estimated without reading it all."""
  if source.kind != "tfrecord":
    return len(source.files)
  total = sum(source.sizes) if source.sizes else 0
  for path, size in zip(source.files, source.sizes or [0] * len(source.files)):
    if not size:
      continue
    count, read = 0, 0
    try:
      for record in tf.compat.v1.io.tf_record_iterator(path):
        count += 1
        read += len(record) + 16  # the record's framing: length, two CRCs
        if count >= _SAMPLE_RECORDS:
          break
    except tf.errors.OpError:
      pass  # a truncated file: the records read so far give the mean
    if count:
      return max(count, int(round(total / (read / count))))
  return 0


def example_bytes(image_size: int) -> int:
  """Memory of one decoded example: float32 pixels plus bookkeeping."""
  return image_size * image_size * 3 * 4 + _PER_EXAMPLE_OVERHEAD


def decide(config: InputConfig, source: sources.Source, image_size: int, training: bool,
           num_epochs: Optional[int] = None) -> Decision:
  """Whether (and where) the pipeline caches decoded examples.

  Args:
    config: --cache and --cache_budget_mb.
    source: the resolved data.
    image_size: the decoded size.
    training: the training pipeline (`auto` caches nothing else).
    num_epochs: the pipeline's epochs (None: repeats forever).

  Returns:
    A Decision.
  """
  cache = (config.cache or "").strip()
  if cache.lower() in OFF_VALUES:
    return Decision("", "off (--cache=off)")
  if cache != AUTO:
    return Decision(cache, "in memory (--cache=memory)" if cache == MEMORY
                    else f"in files {cache}-* (--cache={cache})")
  if not training:
    return Decision("", "not cached: evaluation reads its data once")
  if source.kind == "csv":
    return Decision("", "not cached: CSV rows are cheap to parse")
  if num_epochs is not None and num_epochs <= 1:
    return Decision("", "not cached: the data is read once")
  count = estimate_examples(source)
  need = count * example_bytes(image_size)
  budget = budget_bytes(config)
  size = f"~{count} examples x {image_size}x{image_size}x3 float32 = {_mb(need)}"
  if need > budget:
    return Decision("", f"not cached: decoded training set {size} > budget {_mb(budget)} "
                    "(--cache_budget_mb)")
  return Decision(MEMORY, f"decoded training set in memory after the first pass ({size} "
                  f"of the {_mb(budget)} budget, --cache=auto)")


def describe(config: InputConfig, data: str, image_size: int,
             class_names: Sequence[str] = ()) -> str:
  """The banner line's text for the training data (never raises)."""
  try:
    source = sources.resolve_source(config, data, tuple(class_names))
  except Exception:  # pylint: disable=broad-except
    return "not cached: the training data could not be inspected"
  return decide(config, source, image_size, training=True).reason


def _mb(value: int) -> str:
  return f"{value / (1 << 20):.0f} MB" if value < (10 << 30) else f"{value / (1 << 30):.1f} GB"
