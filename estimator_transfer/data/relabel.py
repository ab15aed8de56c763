"""Class lists merged by name, labels remapped onto a model's ids, old data replayed.

Class ids are positions in a label map, so two label maps only agree by name.
A model keeps its class order once trained (ids in its exports stay stable);
new classes are appended; every dataset's own label map (labels.txt or class
folders) is mapped onto the model's classes by name as it is read. That is
what lets a model trained on digits 0-4 continue on shards of digits 5-9
(whose ids are 0-4 in their own labels.txt) while replaying the old shards.
"""
import random
from typing import List, Optional, Sequence

import numpy as np
import tensorflow as tf

from tensorflow_estimator.python.estimator import util as estimator_util

from estimator_transfer.errors import ConfigError


def merge_class_names(*lists: Optional[Sequence[str]]) -> List[str]:
  """Ordered union by name: first occurrence wins, so earlier lists keep their ids.

  >>> merge_class_names(["0", "1"], ["5", "1"])
  ['0', '1', '5']
  """
  out, seen = [], set()
  for names in lists:
    for name in names or ():
      if name not in seen:
        seen.add(name)
        out.append(name)
  return out


def label_mapping(data_names: Optional[Sequence[str]], model_names: Sequence[str],
                  data: str = "the data") -> Optional[List[int]]:
  """data class id -> model class id by name; None when no remapping is needed.

  Raises:
    ConfigError: the data has a class the model does not know.
  """
  if not data_names or not model_names or list(data_names) == list(model_names):
    return None
  where = {name: i for i, name in enumerate(model_names)}
  missing = [n for n in data_names if n not in where]
  if missing:
    raise ConfigError(
        f"class {missing[0]!r} of {data} is not one of the model's "
        f"{len(model_names)} classes; train with it (--train_data or "
        "--replay_data in a new --model_dir) or use data of the model's classes.")
  return [where[n] for n in data_names]


def _call(input_fn, params=None, config=None, input_context=None):
  """Calls an input_fn with the arguments it takes, as Estimator does.

  Forwarding `config` and `input_context` keeps the wrapped input_fn's
  per-worker sharding in distributed runs.
  """
  args = estimator_util.fn_args(input_fn)
  given = {"params": params, "config": config, "input_context": input_context}
  return input_fn(**{k: v for k, v in given.items() if k in args})


def remap_labels(input_fn, mapping: Sequence[int], num_classes: int):
  """Wraps an input_fn so its labels use the model's class ids.

  Integer labels are looked up; multi-hot labels have their columns moved.
  """

  def remapped_input_fn(params=None, config=None, input_context=None):
    ds = _call(input_fn, params, config, input_context)

    def remap(features, labels):
      if labels.dtype.is_integer:
        return features, tf.gather(tf.constant(list(mapping), labels.dtype), labels)
      move = np.zeros((len(mapping), num_classes), np.float32)
      move[np.arange(len(mapping)), list(mapping)] = 1.0
      moved = tf.matmul(tf.cast(labels, tf.float32), tf.constant(move))
      return features, tf.cast(moved, labels.dtype)

    return ds.map(remap)

  return remapped_input_fn


def mix_input_fns(new_fn, replay_fn, replay_ratio: float, batch_size: int,
                  seed: Optional[int] = None):
  """An input_fn whose examples come from `replay_fn` with probability `replay_ratio`.

  Both input_fns must yield batched, repeating datasets in the model's class
  ids; they are mixed example by example (not batch by batch, which would
  give BatchNorm and each gradient one source at a time) and re-batched.
  """

  # An explicit op seed even without --seed (then a fresh one per process):
  # with op determinism on (a seeded run earlier in this process) an op
  # that leans on a graph seed it may not have would raise.
  op_seed = seed if seed is not None else random.SystemRandom().randrange(1, 2**31)

  def mixed_input_fn(params=None, config=None, input_context=None):
    new = _call(new_fn, params, config, input_context).unbatch()
    old = _call(replay_fn, params, config, input_context).unbatch()
    ds = tf.data.Dataset.sample_from_datasets(
        [new, old], weights=[1.0 - replay_ratio, replay_ratio], seed=op_seed)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

  return mixed_input_fn
