"""Evaluators: what the training loop calls to evaluate a checkpoint.

An evaluator is any callable `evaluator(step, checkpoint_path)` returning the
scalar metrics (a dict with "global_step"), or None when the evaluation was
cut short (a SIGTERM, a checkpoint deleted under it); the loop then hands the
metrics to its after-evaluation callbacks (loop state, best exporter, the
cluster record). `CheckpointEvaluator` builds a new graph and session per
call, as `Estimator.evaluate` does (the cluster's evaluator task and a
master use it); `in_process_eval.InProcessEvaluator` keeps its graph alive
and reads the live weights (a local run's evaluations while training).
"""
import logging
from typing import Callable, Dict, Optional

import tensorflow as tf

from estimator_transfer.evaluation import report as evaluation
from estimator_transfer.training import hooks as hooks_lib

log = logging.getLogger("estimator_transfer")

Evaluator = Callable[[int, str], Optional[Dict[str, float]]]


class CheckpointEvaluator:
  """Evaluates a checkpoint with the experiment's Estimator on --eval_data.

  Every evaluation writes the full report (eval_results.json, per-class
  metrics) into model_dir and Estimator's eval summaries into model_dir/eval.
  """

  def __init__(self, experiment, preemption: Optional[hooks_lib.PreemptionHandler] = None):
    """Creates the evaluator.

    Args:
      experiment: the `Experiment` whose estimator, config and data are used.
      preemption: a SIGTERM during an evaluation stops it (the call returns
        None); None: evaluations are not interrupted.
    """
    self._experiment = experiment
    self._preemption = preemption
    self._input_fn = experiment.input_fn(experiment.config.input.eval_data, training=False)

  def __call__(self, step: int, checkpoint: str) -> Optional[Dict[str, float]]:
    cfg = self._experiment.config
    hooks = [hooks_lib.StopOnSignalHook(self._preemption)] if self._preemption else []
    try:
      result = self._experiment.estimator.evaluate(
          self._input_fn, steps=cfg.run.eval_steps or None, checkpoint_path=checkpoint,
          hooks=hooks)
    except tf.errors.NotFoundError as e:
      # keep_checkpoint_max removed it between listing and reading.
      log.warning("%s is gone (%s): not evaluated", checkpoint, e.message.splitlines()[0])
      return None
    if self._preemption is not None and self._preemption.requested:
      return None
    return finish_evaluation(cfg, result, step, checkpoint)


def finish_evaluation(config, result, step: int, checkpoint: str) -> Dict[str, float]:
  """What every evaluator does with a result: the report files, a log line.

  Args:
    config: the run's `ExperimentConfig`.
    result: the raw eval result (`Estimator.evaluate`'s dict).
    step: the evaluated global step.
    checkpoint: the evaluated checkpoint, recorded in the report.

  Returns:
    The scalar metrics (with "global_step").
  """
  evaluation.write_report(evaluation.full_report(
      result, config.head.class_names, checkpoint, config.input.eval_data),
      config.run.model_dir)
  metrics = evaluation.scalar_metrics(result)
  log.info("step %d eval: %s", step, ", ".join(
      f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k != "global_step"))
  return metrics


class CallbackExporter(tf.estimator.Exporter):
  """An EvalSpec exporter that exports nothing: it hands each evaluation on.

  Exporters are Estimator's only per-evaluation callback (a master's
  in-process evaluations): this one forwards the scalars to the loop.
  """

  def __init__(self, callback: Callable[[Dict[str, float], str], None]):
    self._callback = callback

  @property
  def name(self) -> str:
    return "after_evaluation"

  def export(self, estimator, export_path, checkpoint_path, eval_result,
             is_the_final_export):
    del estimator, export_path, is_the_final_export
    self._callback(evaluation.scalar_metrics(eval_result), checkpoint_path)
    return None
