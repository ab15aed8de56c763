"""Training values derived from the config and, when needed, the training data.

Epoch boundaries (learning rate, unfreeze schedule) need the epoch size, and
`balanced` class weights the class counts: `TrainingSetup` counts the training
data once, only when one of them needs it, and only for training, so
et-evaluate and et-export never read it.
"""
import logging
from typing import List, Optional, Tuple

import tensorflow as tf

from estimator_transfer import specs
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.data import sources
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.errors import ConfigError
from estimator_transfer.model import heads

log = logging.getLogger("estimator_transfer")


class TrainingSetup:
  """Derived training values, computed once, when the train graph is built."""

  def __init__(self, config: ExperimentConfig):
    self._config = config
    self._counts = None

  def _data_counts(self) -> Tuple[int, List[int]]:
    if self._counts is None:
      self._counts = count_training_data(self._config)
    return self._counts

  def steps_per_epoch(self) -> Optional[float]:
    """Steps per epoch, or None when no setting counts in epochs."""
    c = self._config
    size = c.schedule.train_size
    if not size and (specs.needs_epoch_size(c.schedule.boundaries) or any(
        isinstance(s.start, str) for s in specs.parse_schedule(
            c.freeze.unfreeze_schedule, c.freeze.spec))):
      size = self._data_counts()[0]
    return specs.steps_per_epoch(size, c.input.batch_size) if size else None

  def lr_boundaries(self) -> List[int]:
    """The learning-rate boundaries in global steps."""
    return specs.resolve_boundaries(self._config.schedule.boundaries,
                                    self.steps_per_epoch())

  def freeze_plan(self) -> List[specs.Stage]:
    """The unfreeze stages with their starts in global steps."""
    c = self._config.freeze
    stages = specs.parse_schedule(c.unfreeze_schedule, c.spec)
    return specs.resolve_plan_steps(stages, self.steps_per_epoch())

  def class_weights(self) -> Optional[List[float]]:
    """Per-class loss weights (`balanced` counted from the data), or None."""
    h = self._config.head
    weights = specs.parse_class_weights(h.class_weights, h.num_classes)
    if weights == specs.BALANCED:
      weights = heads.balanced_class_weights(self._data_counts()[1])
      log.info("class weights (balanced): %s", ", ".join(f"{w:.4g}" for w in weights))
    return weights


def count_training_data(config: ExperimentConfig) -> Tuple[int, List[int]]:
  """Counts `input.train_data`: (examples, per-class label counts).

  TFRecords are read record by record in Python (no graph needed), parsing
  only the label; multi-label lists count once per listed class.

  Args:
    config: the experiment config (train_data, label_key, num_classes).

  Returns:
    (number of examples, per class the number of labels).

  Raises:
    ConfigError: no training data to count.
  """
  data = config.input.train_data
  if not data:
    raise ConfigError("the epoch size or class counts are needed but there is no "
                      "--train_data to count; set --train_size or explicit "
                      "--class_weights.")
  num_classes = max(config.head.num_classes, 1)
  counts = [0] * num_classes
  if labels_lib.is_image_folder(data):
    _, ids, _ = sources.list_image_folder(data)
    for i in ids:
      if 0 <= i < num_classes:
        counts[i] += 1
    total = len(ids)
  else:
    total = 0
    key = config.input.label_key
    for path in sources.list_tfrecord_files(data):
      for record in tf.compat.v1.io.tf_record_iterator(path):
        total += 1
        feature = tf.train.Example.FromString(record).features.feature.get(key)
        for raw in (feature.int64_list.value if feature is not None else ()):
          i = raw - config.input.label_offset  # slim's 1-based ids (--label_offset)
          if 0 <= i < num_classes:
            counts[i] += 1
  log.info("counted %d training examples in %s (per class: %s); --train_size "
           "skips the count.", total, data, counts)
  return total, counts
