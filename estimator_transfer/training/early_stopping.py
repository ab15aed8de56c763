"""Early stopping, best-model tracking and restore-best: one decision for every run.

`record_evaluation` is the decision: given one evaluation it updates the
`LoopState` (best value and step, patience count, learning-rate scale) and
says whether the result improved (by more than `--min_delta`), did not,
regressed beyond `--regression_tolerance` (restore the best) or used up
`--patience` (stop). The local loop applies it after each of its evaluations
and keeps the state in `model_dir/train_state.json`, so a restart decides
nothing twice. A cluster's trainers apply the very same function to the
evaluator's results, replayed from its event files (`stop_decision`), through
Estimator's in-graph stop flag, so every worker stops with the chief.
"""
import dataclasses
import logging
import math
import os
from typing import Dict, List, Optional

import tensorflow as tf

from estimator_transfer import files
from estimator_transfer import specs
from estimator_transfer.config import ExperimentConfig, GuardConfig
from estimator_transfer.errors import ConfigError

log = logging.getLogger("estimator_transfer")

STATE_FILENAME = "train_state.json"
BEST_DIRNAME = "best"
_HISTORY_KEEP = 500
# tf.estimator.experimental's stop flag: a global variable of the training graph.
STOP_VARIABLE = "signal_early_stopping/STOP"

IMPROVED, NO_IMPROVEMENT, REGRESSED, EARLY_STOP = (
    "improved", "no_improvement", "regressed", "early_stop")


@dataclasses.dataclass
class LoopState:
  """What the train/evaluate loop must remember across restarts.

  Saved as `model_dir/train_state.json` (atomically) after every evaluation,
  so a killed run resumes with the same best value, patience count and
  learning-rate scale, and never re-decides an evaluated step.
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
    """The state saved in `model_dir` (a fresh one when there is none).

    Raises:
      ConfigError: the state file exists but is unreadable.
    """
    path = os.path.join(model_dir, STATE_FILENAME)
    try:
      data = files.read_json(path)
      if data is None:
        return cls()
      known = {f.name for f in dataclasses.fields(cls)}
      return cls(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError, AttributeError) as e:
      raise ConfigError(f"{path} is unreadable ({e}); restore it, or delete it to "
                        "restart early-stopping and best-model tracking.") from e

  def save(self, model_dir: str) -> None:
    self.history = self.history[-_HISTORY_KEEP:]
    files.write_json(os.path.join(model_dir, STATE_FILENAME), dataclasses.asdict(self),
                     indent=1, sort_keys=True)

  def best_path(self, model_dir: str) -> Optional[str]:
    return os.path.join(model_dir, self.best_checkpoint) if self.best_checkpoint else None

  def add_history(self, step: int, metrics: Dict[str, float]) -> None:
    self.history.append({"step": step, **{k: float(v) for k, v in metrics.items()
                                          if k != "global_step"}})


def _watch(state: LoopState, metric: str, mode: str) -> None:
  """Points `state` at `metric`; a changed metric restarts best-model tracking."""
  if state.metric == metric and state.mode == mode:
    return
  if state.metric:
    log.warning("the watched metric changed (%s %s -> %s %s): best-model tracking "
                "restarts", state.metric, state.mode, metric, mode)
  state.metric, state.mode = metric, mode
  state.best_value, state.best_step, state.best_checkpoint = None, -1, ""
  state.evals_without_improvement = 0


def record_evaluation(state: LoopState, step: int, metrics: Dict[str, float],
                      guards: GuardConfig) -> str:
  """Updates `state` with one evaluation and says what the loop must do.

  Args:
    state: the loop state (mutated).
    step: the global step evaluated.
    metrics: the evaluation results.
    guards: the metric, patience, min_delta, tolerance and learning-rate factor.

  Returns:
    IMPROVED (new best by more than min_delta: keep this checkpoint),
    NO_IMPROVEMENT, REGRESSED (worse than the best by more than the
    tolerance: restore the best) or EARLY_STOP (patience used up).

  Raises:
    ConfigError: the metric is not among the eval metrics.
  """
  metric = guards.early_stopping_metric
  if metric not in metrics:
    raise ConfigError(f"--early_stopping_metric={metric} is not an eval metric; "
                      f"choose one of {', '.join(sorted(metrics))}.")
  _watch(state, metric, specs.metric_mode(metric, guards.metric_mode))
  value = float(metrics[metric])
  state.last_eval_step = step
  state.add_history(step, metrics)
  # Oriented so that larger is better; NaN counts as the worst value.
  sign = 1.0 if state.mode == "max" else -1.0
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


def eval_history(model_dir: str, metric: str) -> Dict[int, float]:
  """global step -> `metric` from the eval event files under `model_dir/eval`."""
  history = {}
  pattern = os.path.join(model_dir, "eval", "events.out.tfevents.*")
  for path in sorted(tf.io.gfile.glob(pattern)):
    try:
      for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
          if value.tag == metric:
            history[int(event.step)] = float(
                value.simple_value if value.HasField("simple_value")
                else tf.make_ndarray(value.tensor))
    except tf.errors.DataLossError:
      continue  # a file cut short by a kill: keep what was read
  return history


def stop_decision(model_dir: str, guards: GuardConfig) -> str:
  """Why training must stop (empty: go on), replaying model_dir's eval results.

  `record_evaluation` applied, in step order, to every evaluation of
  `guards.early_stopping_metric` in `model_dir/eval` (what a cluster's
  evaluator writes): the same decision as the local loop's, min_delta and
  patience included, and the same on every task that reads those files.
  """
  if not (guards.early_stopping_metric and guards.patience):
    return ""
  state = LoopState()
  watch = dataclasses.replace(guards, regression_tolerance=None)
  for step, value in sorted(eval_history(model_dir, guards.early_stopping_metric).items()):
    if record_evaluation(state, step, {guards.early_stopping_metric: value},
                         watch) == EARLY_STOP:
      return state.stopped
  return ""


def build_cluster_stop_hook(estimator, config: ExperimentConfig):
  """The trainers' early stopping in a cluster job, or None when not asked for.

  The chief checks `stop_decision` every eval interval of steps and sets
  Estimator's in-graph stop flag; the workers read the flag and stop with it.
  `run_every_secs=None`: the default 60-second timer is the known trap with
  distribution strategies (the check then does not run as expected).
  """
  g, model_dir = config.guards, config.run.model_dir
  if not (g.early_stopping_metric and g.patience):
    return None
  latest = tf.train.latest_checkpoint(model_dir)
  if latest and STOP_VARIABLE not in \
      tf.train.load_checkpoint(latest).get_variable_to_shape_map():
    # The stop flag is a global variable: a checkpoint written without it
    # cannot be restored into a graph with it.
    log.warning("--patience is ignored: %s was started without early stopping, "
                "and its stop flag must be in the checkpoint from the start; use a "
                "new --model_dir (--warm_start_from=%s) to stop early",
                model_dir, model_dir)
    return None

  def should_stop() -> bool:
    reason = stop_decision(model_dir, g)
    if reason:
      log.warning("%s", reason)
    return bool(reason)

  every = g.eval_every_steps or config.run.save_checkpoints_steps
  return tf.estimator.experimental.make_early_stopping_hook(
      estimator, should_stop, run_every_secs=None, run_every_steps=every)
