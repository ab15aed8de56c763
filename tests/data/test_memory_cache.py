"""--cache=auto: the decoded training set is cached in memory when it fits the
budget; later epochs read it back (the files are no longer needed) and still
augment anew."""
import os
import shutil

import numpy as np
import pytest

from estimator_transfer.config import InputConfig
from estimator_transfer.data import memory_cache
from estimator_transfer.data import pipeline
from estimator_transfer.data import sources

import conftest


@pytest.mark.parametrize("settings,size,training,epochs,mode,reason", [
    (dict(), 16, True, None, "memory", "decoded training set in memory after the first pass"),
    (dict(cache_budget_mb=100), 256, True, None, "memory", "of the 100 MB budget"),
    (dict(cache_budget_mb=1), 256, True, None, "", "> budget 1 MB (--cache_budget_mb)"),
    (dict(), 16, False, None, "", "evaluation reads its data once"),
    (dict(), 16, True, 1, "", "the data is read once"),
    (dict(cache="off"), 16, True, None, "", "off (--cache=off)"),
    (dict(cache="memory"), 16, False, None, "memory", "--cache=memory"),
])
def test_auto_decision(tiny_data, settings, size, training, epochs, mode, reason):
  config = InputConfig(**settings)
  assert InputConfig().cache == "auto"
  source = sources.resolve_source(config, tiny_data["train"], conftest.CLASS_NAMES)
  # 48 records in two shards, estimated from the first file's record sizes.
  assert abs(memory_cache.estimate_examples(source) - 48) <= 3
  decision = memory_cache.decide(config, source, size, training, epochs)
  assert decision.mode == mode and reason in decision.reason, decision


def _epochs(fn, count, between=None):
  """`count` epochs of (images, labels) from one iterator; `between()` after the first."""
  iterator = iter(fn())
  out = []
  for epoch in range(count):
    batches = [next(iterator) for _ in range(48 // 8)]
    out.append((np.concatenate([f["image"].numpy() for f, _ in batches]),
                np.concatenate([l.numpy() for _, l in batches])))
    if epoch == 0 and between is not None:
      between()
  return out


def test_later_epochs_read_memory_and_augment_anew(tiny_data, tmp_path):
  data = str(tmp_path / "train")
  shutil.copytree(tiny_data["train"], data)
  config = InputConfig(batch_size=8, shuffle_buffer=0, random_flip="horizontal")
  fn = pipeline.build_input_fn(config, data, 16, training=True, seed=3,
                               class_names=conftest.CLASS_NAMES)
  assert fn.cache_decision.mode == "memory"
  # After the first epoch the records are gone: later epochs come from memory.
  first, second = _epochs(fn, 2, between=lambda: shutil.rmtree(data))
  assert not os.path.exists(data)
  np.testing.assert_array_equal(first[1], second[1])  # no shuffle: the same order
  flipped = [np.array_equal(a, b[:, ::-1]) and not np.array_equal(a, b)
             for a, b in zip(first[0], second[0])]
  same = [np.array_equal(a, b) for a, b in zip(first[0], second[0])]
  # Each image is the same example, flipped anew in each epoch.
  assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)
