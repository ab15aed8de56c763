"""Continued training: class lists merged by name, labels remapped, old data replayed,
and the persistent state of et-train's interleaved train/evaluate loop.

Class ids are positions in a label map, so two label maps only agree by name.
A model keeps its class order once trained (ids in its exports stay stable);
new classes are appended; every dataset's own label map (labels.txt or class
folders) is mapped onto the model's classes by name as it is read. That is
what lets a model trained on digits 0-4 continue on shards of digits 5-9
(whose ids are 0-4 in their own labels.txt) while replaying the old shards.
"""
import dataclasses
import json
import logging
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from estimator_transfer.errors import ConfigError

from estimator_transfer.config import ExperimentConfig, GuardConfig
from estimator_transfer.data import labels as labels_lib
from estimator_transfer import specs

log = logging.getLogger("estimator_transfer")

STATE_FILENAME = "train_state.json"
BEST_DIRNAME = "best"
_HISTORY_KEEP = 500


# --- class lists --------------------------------------------------------------


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


def model_class_names(cfg: ExperimentConfig,
                      data_names: Optional[Sequence[str]]) -> Optional[List[str]]:
  """The class list of the model a config trains.

  Args:
    cfg: the config; `head.class_names` is the list of the model already in
      model_dir (from its saved config) or empty for a new one.
    data_names: the training data's class names (its label map), or None.

  Returns:
    An existing model's classes followed by any new ones; for a new model the
    warm-start source's classes (when `continual.keep_old_classes`), then the
    replay data's, then the training data's, merged by name. None when no
    names are known (ids are then used as they are).

  Raises:
    ConfigError: replay data and training data disagree on having names.
  """
  c = cfg.continual
  replay = labels_lib.class_names_for(c.replay_data) if c.replay_data else None
  if c.replay_data and bool(replay) != bool(data_names):
    which = "--replay_data" if not replay else "--train_data"
    raise ConfigError(f"{which} has no label map while the other one has; put a "
                      "labels.txt next to both, so their classes can be matched by name.")
  existing = list(cfg.head.class_names)
  if existing:
    return merge_class_names(existing, replay, data_names)
  old = None
  if c.warm_start_from and c.keep_old_classes:
    from estimator_transfer.training import warm_start  # pylint: disable=g-import-not-at-top
    old = warm_start.resolve_source(c.warm_start_from).class_names
  merged = merge_class_names(old, replay, data_names)
  return merged or None


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
  from tensorflow_estimator.python.estimator import util  # pylint: disable=g-import-not-at-top
  args = util.fn_args(input_fn)
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

  def mixed_input_fn(params=None, config=None, input_context=None):
    new = _call(new_fn, params, config, input_context).unbatch()
    old = _call(replay_fn, params, config, input_context).unbatch()
    ds = tf.data.Dataset.sample_from_datasets(
        [new, old], weights=[1.0 - replay_ratio, replay_ratio], seed=seed)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

  return mixed_input_fn


# --- interleaved train/evaluate loop state ---------------------------------


@dataclasses.dataclass
class LoopState:
  """What the train/evaluate loop must remember across restarts.

  Saved as `model_dir/train_state.json` (temp file + rename) after every
  evaluation, so a killed run resumes with the same best value, patience
  count and learning-rate scale, and never re-decides an evaluated step.
  """
  metric: str = ""
  mode: str = "max"
  best_value: Optional[float] = None
  best_step: int = -1
  best_checkpoint: str = ""  # relative to model_dir
  last_eval_step: int = -1
  evals_without_improvement: int = 0
  lr_scale: float = 1.0
  pending_restore_at_step: int = -1  # restore best into the run resumed at this step
  restores: List[dict] = dataclasses.field(default_factory=list)
  history: List[dict] = dataclasses.field(default_factory=list)
  stopped: str = ""  # why training stopped early, once it did

  @classmethod
  def load(cls, model_dir: str) -> "LoopState":
    path = os.path.join(model_dir, STATE_FILENAME)
    if not tf.io.gfile.exists(path):
      return cls()
    try:
      with tf.io.gfile.GFile(path) as f:
        data = json.loads(f.read())
      known = {f.name for f in dataclasses.fields(cls)}
      return cls(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError) as e:
      raise ConfigError(f"{path} is unreadable ({e}); restore it, or delete it to "
                        "restart early-stopping and best-model tracking.") from e

  def save(self, model_dir: str) -> None:
    self.history = self.history[-_HISTORY_KEEP:]
    path = os.path.join(model_dir, STATE_FILENAME)
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
      f.write(json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True))
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)

  def best_path(self, model_dir: str) -> Optional[str]:
    return os.path.join(model_dir, self.best_checkpoint) if self.best_checkpoint else None


IMPROVED, NO_IMPROVEMENT, REGRESSED, EARLY_STOP = (
    "improved", "no_improvement", "regressed", "early_stop")


def record_evaluation(state: LoopState, step: int, metrics: Dict[str, float],
                      guards: GuardConfig) -> str:
  """Updates `state` with one evaluation and says what the loop must do.

  Args:
    state: the loop state (mutated).
    step: the global step evaluated.
    metrics: the evaluation results.
    guards: the metric, patience, tolerance and learning-rate factor.

  Returns:
    IMPROVED (new best: keep this checkpoint), NO_IMPROVEMENT, REGRESSED
    (worse than the best by more than the tolerance: restore the best) or
    EARLY_STOP (patience used up).

  Raises:
    ConfigError: the metric is not among the eval metrics.
  """
  metric = guards.early_stopping_metric
  if metric not in metrics:
    raise ConfigError(f"--early_stopping_metric={metric} is not an eval metric; "
                      f"choose one of {', '.join(sorted(metrics))}.")
  mode = specs.metric_mode(metric, guards.metric_mode)
  if state.metric != metric or state.mode != mode:
    if state.metric:
      log.warning("the watched metric changed (%s %s -> %s %s): best-model tracking "
                  "restarts", state.metric, state.mode, metric, mode)
    state.metric, state.mode = metric, mode
    state.best_value, state.best_step, state.best_checkpoint = None, -1, ""
    state.evals_without_improvement = 0
  value = float(metrics[metric])
  state.last_eval_step = step
  state.history.append({"step": step, **{k: float(v) for k, v in metrics.items()
                                         if k != "global_step"}})
  # Oriented so that larger is better; NaN counts as the worst value.
  sign = 1.0 if mode == "max" else -1.0
  score = sign * value if math.isfinite(value) else -math.inf
  best = sign * state.best_value if state.best_value is not None else None
  if best is None or score > best + guards.min_delta:
    state.best_value, state.best_step = value, step
    state.evals_without_improvement = 0
    return IMPROVED
  state.evals_without_improvement += 1
  if guards.patience and state.evals_without_improvement >= guards.patience:
    state.stopped = (f"early stopping at step {step}: {metric} did not improve on "
                     f"{state.best_value:.6g} (step {state.best_step}) for "
                     f"{state.evals_without_improvement} evaluations")
    return EARLY_STOP
  tolerance = guards.regression_tolerance
  if tolerance is not None and state.best_checkpoint and best - score > tolerance:
    state.lr_scale *= guards.regression_lr_factor
    state.pending_restore_at_step = step
    state.restores.append({"step": step, "value": value, "best_step": state.best_step,
                           "best_value": state.best_value, "lr_scale": state.lr_scale})
    return REGRESSED
  return NO_IMPROVEMENT
