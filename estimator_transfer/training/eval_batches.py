"""The decoded evaluation batches, kept by the in-process evaluator between evaluations.

An evaluation while training reads the same --eval_data every time, and
decoding it (JPEG/PNG, resize) is most of a small model's evaluation pass.
`EvalBatches` fetches the input iterator's outputs along with the metric
updates during the first pass, and later passes feed those arrays in place
of the iterator's outputs (a fed tensor's op does not run: no file is read,
nothing is decoded). The same weights therefore give the same metrics.

What is kept is decided as `--cache` decides for the training set: `off`
keeps nothing; `auto` and `memory` keep the batches while their bytes stay
within `--cache_budget_mb` (0: a quarter of this machine's memory). A pass
over the budget is dropped and the evaluation reads the files again, each
time. The bad-record count of the first pass is restored on every fed pass
(those records stay skipped).
"""
import logging
from typing import List, Optional, Sequence

import numpy as np
import tensorflow as tf

from estimator_transfer.data import bad_records
from estimator_transfer.data import memory_cache

log = logging.getLogger("estimator_transfer")

_NOT_FETCHABLE = (tf.variant, tf.resource)


def iterator_outputs(graph: tf.Graph) -> Optional[List[tf.Tensor]]:
  """The outputs of the graph's one input iterator (`IteratorGetNext`), or None."""
  ops = [op for op in graph.get_operations() if op.type in ("IteratorGetNext",
                                                             "IteratorGetNextSync")]
  if len(ops) != 1:
    return None
  outputs = list(ops[0].outputs)
  if not outputs or any(t.dtype.base_dtype in _NOT_FETCHABLE for t in outputs):
    return None
  return outputs


class EvalBatches:
  """The evaluation pass's input batches, fetched once and fed afterwards.

  Built inside the evaluation graph (before it is finalized): `keeps` tells
  whether this graph's input can be kept at all.
  """

  def __init__(self, graph: tf.Graph, input_config, eval_data: str):
    self._outputs = iterator_outputs(graph)
    cache = (input_config.cache or "").strip().lower()
    self._budget = 0 if cache in memory_cache.OFF_VALUES else memory_cache.budget_bytes(
        input_config)
    self._eval_data = eval_data
    self._batches: Optional[List[Sequence[np.ndarray]]] = None
    self._bad_records = 0
    self._gave_up = False
    self._pass_bytes = 0
    counter = bad_records.get_counter()
    self._set_counter = self._counter_value = self._read_counter = None
    if counter is not None:
      self._counter_value = tf.compat.v1.placeholder(tf.int64, [])
      self._set_counter = counter.assign(self._counter_value, read_value=False)
      self._read_counter = counter.read_value()

  @property
  def keeps(self) -> bool:
    return self._outputs is not None and self._budget > 0 and not self._gave_up

  @property
  def ready(self) -> bool:
    """Whether a full pass is kept (later passes feed it)."""
    return self._batches is not None

  def fetches(self):
    """What to fetch with each update during a reading pass (None: nothing)."""
    return self._outputs if self.keeps and not self.ready else None

  def start_pass(self) -> List:
    """Begins a reading pass: returns the list its fetched batches go into."""
    self._pass_bytes = 0
    return [] if self.keeps and not self.ready else None

  def add(self, kept: Optional[List], values) -> Optional[List]:
    """Adds one fetched batch; drops the pass (returns None) once over the budget."""
    if kept is None or values is None:
      return kept
    batch = tuple(np.asarray(v) for v in values)
    kept.append(batch)
    self._pass_bytes += sum(a.nbytes for a in batch)
    if self._pass_bytes > self._budget:
      self._gave_up = True
      log.info("evaluation batches of %s exceed the memory budget (--cache_budget_mb): "
               "every evaluation reads them again", self._eval_data)
      return None
    return kept

  def finish_pass(self, kept: Optional[List], session, complete: bool) -> None:
    """Keeps a complete reading pass (and its bad-record count) for the next ones."""
    if kept is None or not complete:
      return
    self._batches = kept
    log.info("evaluation batches kept in memory (%d batches, %.1f MB): later evaluations "
             "decode nothing", len(kept), self._pass_bytes / (1 << 20))
    if self._read_counter is not None:
      self._bad_records = int(session.run(self._read_counter))

  def feeds(self, session, limit: Optional[int]):
    """The feed dicts of a kept pass (at most `limit` batches); restores the count."""
    if self._set_counter is not None:
      session.run(self._set_counter, feed_dict={self._counter_value: self._bad_records})
    batches = self._batches if limit is None else self._batches[:limit]
    for batch in batches:
      yield dict(zip(self._outputs, batch))
