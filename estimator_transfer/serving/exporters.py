"""Exporters that run after an evaluation: the latest model, and the best one.

`BestExporter` publishes a checkpoint only when its `metric` beats every model
it published before into the same directory. Unlike `tf.estimator.BestExporter`
(which exports unconditionally the first time in each process, so a restarted
job can publish a worse model, and compares the loss unless told otherwise),
the best value so far is read from disk on every call:

1. the ledger `<export_dir>/.et_best_exports.json`, one entry with the full
   eval result per published version, written atomically after each export;
2. without a ledger, but with versions already in the directory (published by
   something that kept no ledger), the past eval results in the model_dir's
   event files (`<model_dir>/eval/events.*`), as `tf.estimator.BestExporter`
   reads them.

With neither, nothing has been published, and the first result is exported.
Ties do not export. Both classes are `tf.estimator.Exporter`s, usable in
`EvalSpec(exporters=...)`; the training loop calls them through
`build_best_model_callback` (after each in-loop evaluation) and
`export_after_evaluation` (the run's final export, `Experiment.export_final`),
locally and on a cluster's chief alike.
"""
import dataclasses
import logging
import math
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import tensorflow as tf

from estimator_transfer import files
from estimator_transfer import specs
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.errors import ConfigError
from estimator_transfer.serving import warmup as warmup_lib
from estimator_transfer.serving import saved_model
from estimator_transfer.serving import signatures as signatures_lib
from estimator_transfer.serving import versions as versions_lib
from estimator_transfer.training import early_stopping

log = logging.getLogger("estimator_transfer")

LEDGER_FILENAME = ".et_best_exports.json"  # hidden: TF Serving only looks at <n>/
LATEST_SUBDIR = os.path.join("export", "latest")  # under model_dir, as Estimator does


def read_ledger(export_dir: str) -> List[dict]:
  """The best exporter's ledger entries, oldest first; [] when there is none.

  Raises:
    ConfigError: the ledger exists but is not readable JSON.
  """
  path = os.path.join(export_dir, LEDGER_FILENAME)
  try:
    data = files.read_json(path)
    return [] if data is None else list(data["exports"])
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{path} is corrupt ({e}); restore it, or delete it to let "
                      "the next export compare against past eval results.") from e


def _write_ledger(export_dir: str, entries: List[dict]) -> None:
  files.write_json(os.path.join(export_dir, LEDGER_FILENAME), {"exports": entries},
                   indent=1, sort_keys=True)



def _clean_result(eval_result: Mapping) -> dict:
  out = {}
  for key, value in eval_result.items():
    try:
      out[key] = int(value) if key == "global_step" else float(value)
    except (TypeError, ValueError):
      continue  # non-scalar metrics are not compared
  return out


class LatestExporter(tf.estimator.Exporter):
  """Exports every evaluated checkpoint (keeping the newest `exports_to_keep`)."""

  def __init__(self, options: signatures_lib.ExportOptions, export_dir: Optional[str] = None,
               name: str = "latest"):
    """Creates the exporter.

    Args:
      options: what to export.
      export_dir: the TF Serving base path; None takes the `export_path`
        Estimator passes (model_dir/export/<name>).
      name: the exporter's name.
    """
    self._options = options
    self._export_dir = export_dir
    self._name = name
    self.last_decision = ""  # one line saying what the last call did

  @property
  def name(self) -> str:
    return self._name

  def export(self, estimator, export_path, checkpoint_path, eval_result,
             is_the_final_export):
    """Exports unless the newest version already holds this checkpoint.

    Returns:
      The new version dir, or None when it would duplicate the newest one
      (a re-run of a finished job evaluates the same checkpoint again).
    """
    del is_the_final_export
    export_dir = self._export_dir or export_path
    versions = versions_lib.list_versions(export_dir)
    if versions and saved_model.read_metadata(versions[-1]).get("checkpoint") == checkpoint_path:
      self.last_decision = f"{versions[-1]} already holds {checkpoint_path}"
      return None
    options = _with_eval_metadata(self._options, eval_result)
    path = saved_model.export_saved_model(estimator, export_dir, options, checkpoint_path)
    self.last_decision = f"exported {path}"
    return path


class BestExporter(tf.estimator.Exporter):
  """Exports a checkpoint only when `metric` beats everything published before.

  The comparison state lives on disk (module docstring), so a new process
  (restart, preemption, a second et-train) never publishes a worse model.
  """

  def __init__(self, options: signatures_lib.ExportOptions, metric: str = "accuracy",
               mode: str = "auto", export_dir: Optional[str] = None, name: str = "best"):
    """Creates the exporter.

    Args:
      options: what to export.
      metric: the eval metric to compare (a key of the eval result).
      mode: max, min or auto (see `metric_mode`).
      export_dir: the TF Serving base path; None takes the `export_path`
        Estimator passes (model_dir/export/<name>).
      name: the exporter's name.
    """
    self._options = options
    self._metric = metric
    self._mode = specs.metric_mode(metric, mode)
    self._export_dir = export_dir
    self._name = name
    self.last_decision = ""  # one line saying what the last call did and why

  @property
  def name(self) -> str:
    return self._name

  def best_so_far(self, export_dir: str, model_dir: str,
                  current_step: Optional[int] = None) -> Optional[float]:
    """The value a new export must beat (None: nothing published yet)."""
    values = [e["metrics"][self._metric] for e in read_ledger(export_dir)
              if self._metric in e.get("metrics", {})]
    if not values and versions_lib.list_versions(export_dir):
      values = [v for step, v in early_stopping.eval_history(model_dir, self._metric).items()
                if step != current_step]
    values = [v for v in values if not math.isnan(v)]
    if not values:
      return None
    return max(values) if self._mode == "max" else min(values)

  def export(self, estimator, export_path, checkpoint_path, eval_result,
             is_the_final_export):
    """Exports when better; returns the version dir, or None when not.

    Raises:
      ConfigError: `metric` is not in the eval result.
    """
    del is_the_final_export
    result = _clean_result(eval_result)
    if self._metric not in result:
      raise ConfigError(f"--best_metric={self._metric} is not an eval metric; "
                        f"choose one of {', '.join(sorted(k for k in result if k != 'global_step'))}.")
    export_dir = self._export_dir or export_path
    value = result[self._metric]
    best = self.best_so_far(export_dir, estimator.model_dir, result.get("global_step"))
    if not specs.is_better(value, best, self._mode):
      self.last_decision = (f"kept the published model: {self._metric} {value:.4g} "
                            f"does not beat {best:.4g}" if best is not None else
                            f"nothing exported: {self._metric} is {value}")
      log.info("best exporter: %s", self.last_decision)
      return None
    options = _with_eval_metadata(self._options, eval_result)
    path = saved_model.export_saved_model(estimator, export_dir, options, checkpoint_path)
    entries = read_ledger(export_dir)
    entries.append({"version": int(os.path.basename(path)), "metric": self._metric,
                    "mode": self._mode, "value": value, "metrics": result,
                    "checkpoint": checkpoint_path,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _write_ledger(export_dir, entries)
    self.last_decision = (f"exported {path}: {self._metric} {value:.4g}" +
                          (f" beats {best:.4g}" if best is not None else
                           " (first export here)"))
    log.info("best exporter: %s", self.last_decision)
    return path


def _with_eval_metadata(options: signatures_lib.ExportOptions, eval_result):
  if not eval_result:
    return options
  metadata = dict(options.metadata, eval_metrics=_clean_result(eval_result))
  return dataclasses.replace(options, metadata=metadata)


def serving_inputs(config: ExperimentConfig) -> Tuple[str, ...]:
  """--serving_inputs, or (empty) every receiver the head can serve."""
  if config.export.serving_inputs:
    return tuple(config.export.serving_inputs)
  head = config.head
  examples = head.kind != "regression" or head.num_outputs == 1
  return ("image_bytes",) + (("tf_example",) if examples else ()) + ("image_tensor",)


def export_options(config: ExperimentConfig, image_size: int,
                   with_warmup: bool = True) -> signatures_lib.ExportOptions:
  """ExportOptions for an experiment config (the warmup images are read here).

  Raises:
    ConfigError: warmup is asked for but cannot be built, or the model reads
      numeric features (the serving signatures take images).
  """
  if config.backbone.handle.strip() == "identity":
    raise ConfigError("exports take images, but --backbone=identity models read numeric "
                      "features; serve such a model from its checkpoint (et-predict "
                      "--model_dir) or train it without --export_dir.")
  e = config.export
  warmup = ()
  if with_warmup and e.serving_warmup:
    warmup_lib.require_serving_api()
    warmup = warmup_lib.read_warmup_images(config.input.eval_data, config.input.image_key,
                                           e.serving_warmup, image_size)
  head = config.head
  metadata = {"backbone": config.backbone.handle, "class_names": list(head.class_names),
              "num_classes": head.num_classes}
  return signatures_lib.ExportOptions(
      image_size=image_size, serving_inputs=serving_inputs(config),
      image_key=config.input.image_key, exports_to_keep=e.exports_to_keep,
      use_ema=bool(config.optimizer.ema_decay), warmup_images=warmup, metadata=metadata)


def build_exporters(config: ExperimentConfig, image_size: int) -> list:
  """[BestExporter into --export_dir, LatestExporter into model_dir/export/latest].

  For `tf.estimator.EvalSpec(exporters=...)`. Without --export_dir the best
  exporter writes to model_dir/export/best (Estimator's `export_path`).
  """
  options = export_options(config, image_size)
  e = config.export
  return [BestExporter(options, e.best_metric, config.guards.metric_mode,
                       export_dir=e.export_dir or None),
          LatestExporter(options)]


def maybe_export_best(estimator, export_dir: str, eval_result: Mapping,
                      checkpoint_path: str, options: signatures_lib.ExportOptions,
                      metric: str = "accuracy", mode: str = "auto") -> Optional[str]:
  """Exports `checkpoint_path` into `export_dir` if `eval_result` is the best.

  The same decision as `BestExporter` (read from disk, so a fresh process is
  safe); returns the new version dir or None.
  """
  exporter = BestExporter(options, metric, mode, export_dir=export_dir)
  return exporter.export(estimator, export_dir, checkpoint_path, eval_result, False)


def export_after_evaluation(estimator, config: ExperimentConfig, image_size: int,
                            eval_result: Mapping, checkpoint_path: str) -> Dict[str, object]:
  """What et-train does after its final evaluation.

  The best model goes to --export_dir (what TF Serving serves); with
  --export_latest the checkpoint also goes to `<model_dir>/export/latest`.

  Returns:
    {"best": version dir or None, "best_decision": one line,
     "latest": version dir or None, "latest_decision": one line}.
  """
  options = export_options(config, image_size)
  e = config.export
  best = BestExporter(options, e.best_metric, config.guards.metric_mode, export_dir=e.export_dir)
  best_path = best.export(estimator, e.export_dir, checkpoint_path, eval_result, True)
  if not e.export_latest:
    return {"best": best_path, "best_decision": best.last_decision,
            "latest": None, "latest_decision": "not asked for (--export_latest)"}
  latest_dir = os.path.join(config.run.model_dir, LATEST_SUBDIR)
  latest = LatestExporter(options, latest_dir)
  latest_path = latest.export(estimator, latest_dir, checkpoint_path, eval_result, True)
  return {"best": best_path, "best_decision": best.last_decision,
          "latest": latest_path, "latest_decision": latest.last_decision}


def build_best_model_callback(experiment) -> Optional[Callable[[Dict[str, float], str], None]]:
  """The training loop's after-evaluation callback: publish the best model.

  Called as f(metrics, checkpoint) after each in-loop evaluation
  (--eval_every_steps, early stopping); None without --export_dir or
  --eval_data. With --export_latest it also exports every evaluated
  checkpoint to `<model_dir>/export/latest`. Building it checks the export settings (warmup data too),
  so a bad one fails before training starts, not after hours.

  Args:
    experiment: the `training.experiment.Experiment` being trained.
  """
  cfg = experiment.config
  if not cfg.export.export_dir:
    return None
  options = export_options(cfg, experiment.image_size)
  if not cfg.input.eval_data:
    return None
  best = BestExporter(options, cfg.export.best_metric, cfg.guards.metric_mode,
                      export_dir=cfg.export.export_dir)
  latest_dir = os.path.join(cfg.run.model_dir, LATEST_SUBDIR)
  latest = LatestExporter(options, latest_dir) if cfg.export.export_latest else None

  def after_evaluation(metrics, checkpoint_path):
    servable = experiment.servable_checkpoint(checkpoint_path)
    best.export(experiment.estimator, cfg.export.export_dir, servable, metrics, False)
    if latest is not None:
      latest.export(experiment.estimator, latest_dir, servable, metrics, False)

  return after_evaluation
