"""Estimator construction and the train / evaluate / export entry points."""
import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import tensorflow as tf

from estimator_transfer.model import backbones
from estimator_transfer.training import checkpoints
from estimator_transfer.training import continual
from estimator_transfer.training import hooks as hooks_lib
from estimator_transfer.training import warm_start
from estimator_transfer import config as config_lib
from estimator_transfer.evaluation import report as evaluation
from estimator_transfer.serving import export as export_lib
from estimator_transfer.serving import exporters
from estimator_transfer.model import model_fn as model_fn_lib
from estimator_transfer.errors import ConfigError
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.data import input_fns
from estimator_transfer.data import labels as labels_lib
from estimator_transfer import specs

EVAL_RESULTS_FILENAME = "eval_results.json"

log = logging.getLogger("estimator_transfer")

# Settings a checkpoint's variables depend on: resuming with other values is
# refused unless allow_config_change (the restore would fail or, worse, fit).
_RESUME_SETTINGS = (("backbone", "handle"), ("backbone", "output_layer"),
                    ("backbone", "image_size"), ("head", "kind"),
                    ("head", "num_classes"), ("head", "class_names"),
                    ("head", "hidden_units"))


@dataclasses.dataclass
class TrainOutcome:
  """How the last `Experiment.train` call ended."""
  step: int = 0
  resumed_from: Optional[str] = None
  warm_started_from: Optional[str] = None
  preempted: bool = False  # SIGTERM: checkpoint saved, re-run to continue
  stopped_early: str = ""  # early stopping's reason, once it stopped the run
  best: Optional[dict] = None  # {"step", "value", "metric", "checkpoint"}
  last_eval: Optional[dict] = None


def make_run_config(config: ExperimentConfig) -> tf.estimator.RunConfig:
  r = config.run
  session_config = tf.compat.v1.ConfigProto(
      intra_op_parallelism_threads=r.intra_op_threads,
      inter_op_parallelism_threads=r.inter_op_threads,
      allow_soft_placement=True)
  return tf.estimator.RunConfig(
      model_dir=r.model_dir,
      tf_random_seed=r.seed,
      save_checkpoints_steps=r.save_checkpoints_steps,
      save_checkpoints_secs=None,
      keep_checkpoint_max=r.keep_checkpoint_max,
      log_step_count_steps=r.log_every_steps,
      save_summary_steps=r.log_every_steps,
      # No graph.pbtxt and no .meta file per checkpoint: text-serialising the
      # training graph cost about a second of every start (and of every
      # checkpoint); TensorBoard still gets the graph from the event file,
      # and restores, warm starts and exports read only index + data files.
      checkpoint_save_graph_def=False,
      session_config=session_config)


class Experiment:
  """One resolved config: backbone, Estimator and input_fns, built once."""

  def __init__(self, config: ExperimentConfig):
    config.validate()
    if not config.run.model_dir:
      raise ConfigError("--model_dir is required: the directory for checkpoints.")
    self.backbone = backbones.resolve(config.backbone)
    if config.backbone.image_size != self.backbone.image_size:
      config = config.replace(backbone__image_size=self.backbone.image_size)
    self.config = config
    self.estimator = tf.compat.v1.estimator.Estimator(
        model_fn=model_fn_lib.build_model_fn(config, self.backbone),
        config=make_run_config(config))

  @property
  def image_size(self) -> int:
    return self.backbone.image_size

  def input_fn(self, data: str, training: bool):
    """input_fn for `data`, its labels mapped onto the model's classes by name."""
    # The input_fn yields the data's own ids (its labels.txt or class folders;
    # the model's names when the data has none): _remapped maps them by name.
    data_names = labels_lib.class_names_for(data) if data else None
    head = self.config.head
    if self.config.input.cache_features:
      # Feature-cache mode: the frozen backbone's features, computed once.
      from estimator_transfer.feature_cache import cache as feature_cache  # pylint: disable=g-import-not-at-top
      fn = feature_cache.build_input_fn(
          self.feature_cache(), data, training, seed=self.config.run.seed,
          class_names=data_names or head.class_names,
          num_classes=0 if data_names else head.num_classes)
      return self._remapped(fn, data)
    fn = input_fns.build_input_fn(
        self.config.input, data, self.image_size, training=training,
        seed=self.config.run.seed, class_names=data_names or head.class_names,
        num_classes=0 if data_names else head.num_classes)
    return self._remapped(fn, data)

  def feature_cache(self):
    """The `feature_cache.FeatureCache` of --cache_features (None when off)."""
    if not self.config.input.cache_features:
      return None
    if getattr(self, "_feature_cache", None) is None:
      from estimator_transfer.feature_cache import cache as feature_cache  # pylint: disable=g-import-not-at-top
      self._feature_cache = feature_cache.FeatureCache(self.config, self.backbone)
    return self._feature_cache

  def servable_checkpoint(self, checkpoint_path: Optional[str] = None) -> Optional[str]:
    """The checkpoint to export or predict with for `checkpoint_path` (None: latest).

    Unchanged, except in feature-cache mode, where checkpoints hold only the
    head: then a full one (pinned backbone snapshot + head) is composed.
    """
    cache = self.feature_cache()
    if cache is None:
      return checkpoint_path
    checkpoint_path = checkpoint_path or tf.train.latest_checkpoint(self.config.run.model_dir)
    return cache.full_checkpoint(checkpoint_path) if checkpoint_path else None

  def _remapped(self, fn, data: str):
    names = self.config.head.class_names
    if names and data:
      mapping = continual.label_mapping(labels_lib.class_names_for(data), names, data)
      if mapping:
        fn = continual.remap_labels(fn, mapping, len(names))
    return fn

  def train_input_fn(self):
    """The training input_fn: --train_data, mixed with --replay_data if given."""
    cfg = self.config
    fn = self.input_fn(cfg.input.train_data, training=True)
    if cfg.continual.replay_data:
      replay = self.input_fn(cfg.continual.replay_data, training=True)
      fn = continual.mix_input_fns(fn, replay, cfg.continual.replay_ratio,
                                   cfg.input.batch_size, seed=cfg.run.seed)
    return fn

  def train(self, on_corrupt_checkpoint: str = "error", allow_config_change: bool = False,
            extra_files: Optional[Dict[str, str]] = None,
            after_evaluation: Optional[Callable[[Dict[str, float], str], None]] = None,
            hooks: Sequence[tf.compat.v1.train.SessionRunHook] = ()) -> int:
    """Trains to `run.max_steps`; re-running it after any interruption resumes.

    Resumes from model_dir's latest checkpoint (global step, optimizer slots,
    EMA; the learning rate and unfreeze stage follow the step), after checking
    it reads back; otherwise starts fresh, warm-started from
    `continual.warm_start_from` if set. With `guards.early_stopping_metric`
    (or `guards.eval_every_steps`) it trains in segments and evaluates after
    each: the best checkpoint is kept in model_dir/best/, patience stops the
    run, a regression restores the best weights; the loop's state lives in
    model_dir/train_state.json, so a restart decides nothing twice. SIGTERM
    saves a checkpoint and returns (`self.outcome.preempted`).

    Args:
      on_corrupt_checkpoint: "error", or "previous" to resume from the newest
        readable checkpoint when the latest is broken.
      allow_config_change: resume although backbone/head settings differ
        from the config saved in model_dir.
      extra_files: name -> text written atomically into model_dir once the
        run is accepted (e.g. the full flags).
      after_evaluation: called as f(metrics, checkpoint_path) after each
        evaluation of the loop (e.g. to export the best model).
      hooks: extra SessionRunHooks for every training segment.

    Returns:
      The global step reached; `self.outcome` tells how training ended.

    Raises:
      ConfigError: bad settings, an incompatible resume, or a broken
        checkpoint (`checkpoints.CheckpointError`, naming the file).
      hooks.DivergedError: the loss or the weights became NaN/Inf; nothing
        was saved from that state.
    """
    cfg = self.config
    model_dir = cfg.run.model_dir
    if not cfg.input.train_data:
      raise ConfigError("--train_data is required for training.")
    if self._evaluates_while_training() and not cfg.input.eval_data:
      raise ConfigError("--early_stopping_metric and --eval_every_steps evaluate while "
                        "training; give --eval_data.")
    train_input_fn = self.train_input_fn()  # validates the data
    resume = checkpoints.resolve_resume_checkpoint(model_dir, on_corrupt_checkpoint)
    if resume:
      self._check_resume_compatible(resume, allow_config_change)
    source = None
    if not resume and cfg.continual.warm_start_from:
      source = warm_start.resolve_source(cfg.continual.warm_start_from)
    config_lib.save(cfg, model_dir)
    for name, text in (extra_files or {}).items():
      _write_atomically(os.path.join(model_dir, name), text)
    self.outcome = TrainOutcome(resumed_from=resume,
                                warm_started_from=source.checkpoint if source else None)
    if resume:
      log.info("resuming from %s (global step %d)", resume, checkpoints.step_of(resume))
      if cfg.continual.warm_start_from:
        log.info("--warm_start_from is ignored: %s already holds a checkpoint", model_dir)
    self._user_hooks = list(hooks)
    with hooks_lib.PreemptionHandler() as preemption:
      if self._evaluates_while_training():
        self._train_evaluate_loop(train_input_fn, preemption, source, after_evaluation)
      else:
        self._train_segment(train_input_fn, cfg.run.max_steps, preemption, source)
      self.outcome.preempted = preemption.requested
    latest = tf.train.latest_checkpoint(model_dir)
    self.outcome.step = checkpoints.step_of(latest) if latest else 0
    if self.outcome.preempted:
      log.warning("stopped by %s at step %d with a checkpoint saved; re-run the same "
                  "command to resume", preemption.signal_name, self.outcome.step)
    return self.outcome.step

  def _evaluates_while_training(self) -> bool:
    g = self.config.guards
    return bool(g.early_stopping_metric or g.eval_every_steps)

  def _training_estimator(self, lr_scale: float = 1.0, source=None):
    """An Estimator for training: the loss exposed to the guards, warm start, lr scale."""
    cfg = self.config
    if lr_scale != 1.0:
      cfg = cfg.replace(schedule__values=tuple(v * lr_scale for v in cfg.schedule.values))
    model_fn = _guarded_model_fn(model_fn_lib.build_model_fn(cfg, self.backbone),
                                 cfg.run.model_dir)
    if source is not None and not tf.train.latest_checkpoint(cfg.run.model_dir):
      model_fn = warm_start.wrap_model_fn(model_fn, source, cfg.head.class_names,
                                          cfg.run.model_dir)
    return tf.compat.v1.estimator.Estimator(model_fn=model_fn, config=self.estimator.config,
                                            params=self.estimator.params)

  def _train_segment(self, input_fn, max_steps: int, preemption, source=None,
                     extra_hooks=(), lr_scale: float = 1.0) -> None:
    """estimator.train to `max_steps` with the NaN/Inf guards and SIGTERM handling."""
    model_dir = self.config.run.model_dir
    estimator = self._training_estimator(lr_scale, source)
    train_hooks = [hooks_lib.NonFiniteLossHook(model_dir),
                   hooks_lib.StopOnSignalHook(preemption)]
    train_hooks += list(extra_hooks) + list(getattr(self, "_user_hooks", []))
    try:
      estimator.train(input_fn, max_steps=max_steps, hooks=train_hooks,
                      saving_listeners=[hooks_lib.FiniteCheckpointListener(model_dir)])
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
      if "Restoring from checkpoint failed" not in (e.message or ""):
        raise
      detail = e.message.split("Original error:")[-1].strip().splitlines()[0][:200]
      raise ConfigError(
          f"the checkpoint in {model_dir} does not fit the model this config builds "
          f"({detail}); resume with the settings it was trained with, or start a new "
          f"--model_dir with --warm_start_from={model_dir}.") from e

  def _check_resume_compatible(self, resume: str, allow: bool) -> None:
    saved = config_lib.load(self.config.run.model_dir)
    if saved is None:
      return
    changes = []
    for section, field in _RESUME_SETTINGS:
      old = getattr(getattr(saved, section), field, None)
      new = getattr(getattr(self.config, section), field, None)
      if field == "image_size" and not (old and new):
        continue
      if old != new:
        changes.append(f"{section}.{field} {_short(old)} -> {_short(new)}")
    if not changes:
      return
    model_dir = self.config.run.model_dir
    if not allow:
      raise ConfigError(
          f"{model_dir} holds a model ({os.path.basename(resume)}) trained with other "
          f"settings ({'; '.join(changes)}); resume with its saved settings (drop those "
          f"flags), start a new --model_dir (--warm_start_from={model_dir} reuses its "
          "weights), or pass --allow_config_change.")
    log.warning("--allow_config_change: resuming %s with changed settings: %s",
                model_dir, "; ".join(changes))

  def _train_evaluate_loop(self, train_input_fn, preemption, source, after_evaluation):
    """Trains in segments to the next evaluation step, evaluates, decides; restartable."""
    cfg = self.config
    g, model_dir, max_steps = cfg.guards, cfg.run.model_dir, cfg.run.max_steps
    every = g.eval_every_steps or cfg.run.save_checkpoints_steps
    eval_input_fn = self.input_fn(cfg.input.eval_data, training=False)
    state = continual.LoopState.load(model_dir)
    while not preemption.requested:
      if state.stopped:
        log.info("%s; re-running does not train further (raise --patience, or delete "
                 "%s to go on)", state.stopped, continual.STATE_FILENAME)
        self.outcome.stopped_early = state.stopped
        break
      latest = tf.train.latest_checkpoint(model_dir)
      step = checkpoints.step_of(latest) if latest else 0
      if latest and step > state.last_eval_step and (step % every == 0 or step >= max_steps):
        metrics = self._evaluate_in_loop(eval_input_fn, latest, preemption)
        if metrics is None:
          break  # preempted while evaluating: the step is evaluated after the restart
        self._record(state, step, metrics, latest)
        self.outcome.last_eval = dict(metrics, step=step)
        if after_evaluation is not None:
          # Before the state is saved: a kill in between re-evaluates this step
          # and calls it again (at least once, never skipped).
          after_evaluation(metrics, latest)
        state.save(model_dir)
        continue
      if step >= max_steps:
        break
      target = min(max_steps, (step // every + 1) * every)
      extra = []
      if state.pending_restore_at_step >= 0:
        best = state.best_path(model_dir)
        if state.pending_restore_at_step == step and best:
          extra.append(hooks_lib.RestoreCheckpointHook(best))
        else:  # a checkpoint after the restore exists: it holds the restored weights
          state.pending_restore_at_step = -1
          state.save(model_dir)
      self._train_segment(train_input_fn, target, preemption, source, extra, state.lr_scale)
      after = tf.train.latest_checkpoint(model_dir)
      if not preemption.requested and (checkpoints.step_of(after) if after else 0) <= step:
        raise ConfigError(f"training made no progress from step {step}: "
                          f"{cfg.input.train_data} yielded no batch; check the data.")
      if extra:
        state.pending_restore_at_step = -1
        state.save(model_dir)
    if state.best_checkpoint:
      self.outcome.best = {"step": state.best_step, "value": state.best_value,
                           "metric": state.metric,
                           "checkpoint": state.best_path(model_dir)}

  def _evaluate_in_loop(self, eval_input_fn, checkpoint: str, preemption):
    result = self.estimator.evaluate(
        eval_input_fn, steps=self.config.run.eval_steps or None, checkpoint_path=checkpoint,
        hooks=[hooks_lib.StopOnSignalHook(preemption)])
    if preemption.requested:
      return None
    evaluation.write_report(evaluation.full_report(
        result, self.config.head.class_names, checkpoint, self.config.input.eval_data),
        self.config.run.model_dir)
    result = evaluation.scalar_metrics(result)
    log.info("step %d eval: %s", checkpoints.step_of(checkpoint), ", ".join(
        f"{k} {v:.4f}" for k, v in sorted(result.items()) if k != "global_step"))
    return result

  def _record(self, state: continual.LoopState, step: int, metrics, checkpoint: str):
    """Applies one evaluation to the loop state (best copy, restore, stop)."""
    g, model_dir = self.config.guards, self.config.run.model_dir
    if not g.early_stopping_metric:
      state.last_eval_step = step
      state.history.append({"step": step, **{k: v for k, v in metrics.items()
                                             if k != "global_step"}})
      return
    decision = continual.record_evaluation(state, step, metrics, g)
    metric = g.early_stopping_metric
    if decision == continual.IMPROVED:
      best = checkpoints.copy_checkpoint(checkpoint, os.path.join(model_dir,
                                                                  continual.BEST_DIRNAME))
      state.best_checkpoint = os.path.relpath(best, model_dir)
      log.info("new best %s %.4f at step %d (kept in %s)", metric, state.best_value,
               step, best)
    elif decision == continual.REGRESSED:
      log.warning("%s %.4f at step %d is worse than the best %.4f (step %d) by more "
                  "than --regression_tolerance=%g: continuing from the best "
                  "checkpoint's weights and optimizer state at learning rate x%g",
                  metric, metrics[metric], step, state.best_value, state.best_step,
                  g.regression_tolerance, state.lr_scale)
    elif decision == continual.EARLY_STOP:
      log.warning("%s", state.stopped)
      self.outcome.stopped_early = state.stopped
    else:
      log.info("%s %.4f at step %d: no improvement on %.4f (step %d) for %d "
               "evaluation(s)", metric, metrics[metric], step, state.best_value,
               state.best_step, state.evals_without_improvement)

  def describe(self) -> List[str]:
    """The start banner: backbone, head, data, schedule, loop and model_dir."""
    cfg = self.config
    b, h, s = cfg.backbone, cfg.head, cfg.schedule
    names = list(h.class_names)
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    head = (f"regression, {h.num_outputs} output(s)" if h.kind == "regression" else
            f"{h.num_classes} classes ({shown})" + (", multi-label" if h.multi_label else ""))
    parts = [f"{v:g}" + (f" until step {bound}" if i < len(s.boundaries) else "")
             for i, (v, bound) in enumerate(zip(s.values, list(s.boundaries) + [None]))]
    warmup = f", warmup {s.warmup_steps} steps" if s.warmup_steps else ""
    data = [f"{kind} {path} ({_describe_data(path)})"
            for kind, path in (("train", cfg.input.train_data), ("eval", cfg.input.eval_data),
                               ("replay", cfg.continual.replay_data)) if path]
    freeze = cfg.freeze.unfreeze_schedule or cfg.freeze.spec
    return [
        f"backbone  {b.handle} ({self.backbone.kind}, {self.image_size}px, "
        f"inputs {self.backbone.value_range})",
        f"head      {head}",
        f"data      {'; '.join(data) or 'none'}",
        f"training  freeze {freeze}; {cfg.optimizer.name} lr {', '.join(parts)}{warmup}; "
        f"batch {cfg.input.batch_size}; max_steps {cfg.run.max_steps}",
        f"model_dir {cfg.run.model_dir}",
    ]

  def evaluate(self, data: Optional[str] = None,
               checkpoint_path: Optional[str] = None,
               output_dir: Optional[str] = None) -> Dict[str, float]:
    """Evaluates a checkpoint (latest by default); returns the scalar metrics.

    The full report (scalars, per-class precision/recall/F1, confusion
    matrix) goes to `output_dir` (default model_dir) as eval_results.json and
    confusion_matrix.png, and stays in `self.last_report`.
    """
    data = data or self.config.input.eval_data
    if not data:
      raise ConfigError("--eval_data is required for evaluation.")
    self._require_checkpoint(checkpoint_path)
    steps = self.config.run.eval_steps or None
    metrics = self.estimator.evaluate(self.input_fn(data, training=False), steps=steps,
                                      checkpoint_path=checkpoint_path)
    evaluated = checkpoint_path or tf.train.latest_checkpoint(self.config.run.model_dir)
    self.last_report = evaluation.full_report(metrics, self.config.head.class_names,
                                              evaluated or "", data)
    evaluation.write_report(self.last_report, output_dir or self.config.run.model_dir)
    return evaluation.scalar_metrics(metrics)

  def export(self, export_dir: Optional[str] = None,
             checkpoint_path: Optional[str] = None, verify=None) -> str:
    """Exports a checkpoint (latest by default) as a new TF Serving version.

    `verify(temp_dir)` runs on the finished export before it is published.
    """
    export_dir = export_dir or self.config.export.export_dir
    if not export_dir:
      raise ConfigError("--export_dir is required for export.")
    self._require_checkpoint(checkpoint_path)
    checkpoint_path = self.servable_checkpoint(checkpoint_path)
    return export_lib.export_saved_model(
        self.estimator, export_dir, exporters.export_options(self.config, self.image_size),
        checkpoint_path=checkpoint_path, verify=verify)

  def export_after_evaluation(self, eval_result: Dict[str, float],
                              checkpoint_path: str) -> Dict[str, object]:
    """Best export into --export_dir, latest into model_dir/export/latest."""
    return exporters.export_after_evaluation(self.estimator, self.config, self.image_size,
                                             eval_result,
                                             self.servable_checkpoint(checkpoint_path))

  def _require_checkpoint(self, checkpoint_path):
    if checkpoint_path:
      if not tf.io.gfile.exists(checkpoint_path + ".index"):
        raise ConfigError(f"checkpoint {checkpoint_path} does not exist; give a "
                          "path such as model_dir/model.ckpt-1000.")
    elif not checkpoints.resolve_resume_checkpoint(self.config.run.model_dir,
                                                   read_tensors=False):
      raise ConfigError(f"no checkpoint in {self.config.run.model_dir}; train first "
                        "(et-train) or point --model_dir at a trained model.")


def early_stopping_hook(estimator, config: ExperimentConfig):
  """Early stopping for train_and_evaluate (cluster) runs, or None when not asked for.

  The chief reads the evaluator's results from `model_dir/eval` and stops
  when `guards.early_stopping_metric` has not improved for `patience`
  evaluation intervals; workers stop with it. It checks every
  `eval_every_steps` steps with `run_every_secs=None`: the default 60-second
  timer is the known trap with distribution strategies (the check then does
  not run as expected and the job never stops early).
  """
  g = config.guards
  if not (g.early_stopping_metric and g.patience):
    return None
  every = g.eval_every_steps or config.run.save_checkpoints_steps
  mode = specs.metric_mode(g.early_stopping_metric, g.metric_mode)
  make = (tf.estimator.experimental.stop_if_no_increase_hook if mode == "max"
          else tf.estimator.experimental.stop_if_no_decrease_hook)
  return make(estimator, g.early_stopping_metric, g.patience * every,
              run_every_secs=None, run_every_steps=every)


def cluster_guard_hooks(estimator, config: ExperimentConfig, preemption=None) -> list:
  """The guards a cluster training task runs: NaN/Inf stop, SIGTERM, early stopping.

  Raises:
    ConfigError: restore-best was asked for (it rewinds the chief's weights
      behind the workers' backs, so it is a single-machine feature).
  """
  if config.guards.regression_tolerance is not None:
    raise ConfigError("--regression_tolerance restores the best checkpoint in "
                      "single-machine runs only; drop it for a cluster (TF_CONFIG) job.")
  out = [hooks_lib.NonFiniteLossHook(config.run.model_dir)]
  if isinstance(preemption, hooks_lib.PreemptionHandler):
    out.append(hooks_lib.StopOnSignalHook(preemption))
  stop = early_stopping_hook(estimator, config)
  latest = tf.train.latest_checkpoint(config.run.model_dir)
  if stop is not None and latest and _STOP_VARIABLE not in \
      tf.train.load_checkpoint(latest).get_variable_to_shape_map():
    # The hook's stop flag is a global variable: a checkpoint written without
    # it cannot be restored into a graph with it.
    log.warning("--patience is ignored: %s was started without early stopping, "
                "and its stop flag must be in the checkpoint from the start; use a "
                "new --model_dir (--warm_start_from=%s) to stop early",
                config.run.model_dir, config.run.model_dir)
    stop = None
  if stop is not None:
    out.append(stop)
  return out


_STOP_VARIABLE = "signal_early_stopping/STOP"  # tf.estimator.experimental's stop flag


def _guarded_model_fn(model_fn, model_dir: str):
  """The TRAIN spec's loss exposed to the NaN/Inf guard; resumes checked first.

  A tf.compat.v1 Saver restores a [8, 3] checkpoint tensor into a [8, 4]
  resource variable without complaint (training then fails far from the
  cause, or runs with the wrong shapes), so before a resume every variable
  of the new graph is matched against the checkpoint by name and shape.
  """

  def guarded_model_fn(features, labels, mode, params=None):
    spec = model_fn(features, labels, mode, params)
    if mode == tf.estimator.ModeKeys.TRAIN:
      tf.compat.v1.add_to_collection(hooks_lib.TRAIN_LOSS_COLLECTION, spec.loss)
      latest = tf.train.latest_checkpoint(model_dir)
      if latest:
        _check_graph_fits(latest, model_dir)
    return spec

  return guarded_model_fn


def _check_graph_fits(checkpoint: str, model_dir: str) -> None:
  shapes = tf.train.load_checkpoint(checkpoint).get_variable_to_shape_map()
  problems = []
  for var in tf.compat.v1.global_variables():
    name, shape = var.op.name, var.shape.as_list()
    if name not in shapes:
      problems.append(f"{name} is not in the checkpoint")
    elif list(shapes[name]) != shape:
      problems.append(f"{name} is {list(shapes[name])} in the checkpoint, {shape} here")
  if problems:
    more = f"; {len(problems) - 1} more" if len(problems) > 1 else ""
    raise ConfigError(
        f"the checkpoint {checkpoint} does not fit the model this config builds "
        f"({problems[0]}{more}); resume with the settings it was trained with, or "
        f"start a new --model_dir with --warm_start_from={model_dir}.")


def _describe_data(path: str) -> str:
  """'N images in K classes' for folders, 'N files' for TFRecords; no reading."""
  from estimator_transfer.data import labels as labels_lib  # pylint: disable=g-import-not-at-top
  try:
    if labels_lib.is_image_folder(path):
      files, _, names = input_fns.list_image_folder(path)
      return f"{len(files)} images in {len(names)} classes"
    return f"{len(input_fns.list_tfrecord_files(path))} TFRecord files"
  except ConfigError:
    return "not found"
  except Exception:  # pylint: disable=broad-except
    return "other format"


def _write_atomically(path: str, text: str) -> None:
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    f.write(text)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def _short(value) -> str:
  text = repr(tuple(value) if isinstance(value, list) else value)
  return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------
# Cluster jobs: tf.estimator.train_and_evaluate in this task's role (TF_CONFIG).
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class ClusterOutcome:
  """What this task did in `train_and_evaluate`.

  Attributes:
    role: the task's name (chief-0, worker-1, evaluator-0, local).
    local_steps: training steps this process ran (0 for ps and evaluator).
    global_step: the latest checkpoint's step when the task finished.
    metrics: the last evaluation (evaluator, or local with eval data).
    record: the per-task record file in model_dir/cluster/, if written.
  """
  role: str
  local_steps: int = 0
  global_step: int = 0
  metrics: Optional[Dict[str, float]] = None
  record: str = ""


def make_cluster_run_config(config: ExperimentConfig, task,
                            strategy=None) -> tf.estimator.RunConfig:
  """RunConfig for `task` (a `cluster.Task`); call inside `cluster.tf_config_env`.

  Args:
    config: the run's config.
    task: this process's task.
    strategy: the train_distribute strategy (`cluster.build_strategy`); built
      here when None and `cluster.distribution` asks for one.

  Raises:
    ConfigError: the distribution does not fit the cluster.
  """
  from estimator_transfer.cluster import tf_config as cluster  # pylint: disable=g-import-not-at-top
  r, c = config.run, config.cluster
  cluster.check(task, c.distribution, r.model_dir)
  return tf.estimator.RunConfig(
      model_dir=r.model_dir,
      tf_random_seed=r.seed,
      save_checkpoints_steps=r.save_checkpoints_steps,
      save_checkpoints_secs=None,
      keep_checkpoint_max=r.keep_checkpoint_max,
      log_step_count_steps=r.log_every_steps,
      save_summary_steps=r.log_every_steps,
      session_config=cluster.session_config(task, c.distribution, r.intra_op_threads,
                                            r.inter_op_threads),
      train_distribute=strategy or cluster.build_strategy(c.distribution, task))


def train_and_evaluate(config: ExperimentConfig, task=None,
                       experiment: Optional["Experiment"] = None,
                       strategy=None) -> ClusterOutcome:
  """Runs this process's part of `tf.estimator.train_and_evaluate`.

  chief / worker: train until the global step reaches `run.max_steps`
  (`max_steps`, never `steps`: a restarted task stops at the same place),
  then return; only the chief checkpoints. ps: serves the variables and never
  returns (the job stops it). evaluator: evaluates each new checkpoint (at
  most every `cluster.eval_throttle_secs`) until one reaches max_steps, then
  returns. local: trains, evaluating after checkpoints when there is eval data.
  Exporting is left to the caller, on the chief only.

  Every training task records its local step count in
  `model_dir/cluster/<task>.json` (also every `log_every_steps` steps, so a
  task that dies leaves its count); the evaluator records its evaluations in
  `model_dir/cluster/evaluator-0.json`.

  Args:
    config: the run's config.
    task: a `cluster.Task`; default from TF_CONFIG.
    experiment: the resolved Experiment of `config` (its config and backbone
      are used); built when None, except for a ps task, which needs none.
    strategy: the task's strategy from `cluster.build_strategy`, built
      before anything ran a TensorFlow op (multi_worker_mirrored needs that);
      built here when None.

  Returns:
    A ClusterOutcome.

  Raises:
    ConfigError: missing data for the role, or a cluster that does not fit
      the distribution.
  """
  from estimator_transfer.cluster import tf_config as cluster  # pylint: disable=g-import-not-at-top
  task = task if task is not None else cluster.current_task()
  if task.task_type == cluster.PS:
    return _serve_parameters(config, task)
  if experiment is None:
    with cluster.tf_config_env(cluster.Task()):  # its own estimator stays local
      experiment = Experiment(config)
  cfg = experiment.config
  model_dir = cfg.run.model_dir
  # Who runs evaluations: the evaluator task; a legacy `master` (Estimator
  # evaluates there after each checkpoint, as locally).
  evaluates = bool(cfg.input.eval_data) and task.task_type in (
      cluster.EVALUATOR, cluster.MASTER, cluster.LOCAL)
  if task.task_type == cluster.MASTER and not evaluates:
    raise ConfigError("a 'master' task evaluates as it trains; give --eval_data "
                      "(or name the job 'chief' and run an evaluator task).")
  if task.trains and not cfg.input.train_data:
    raise ConfigError(f"--train_data is required for the {task.task_type} task.")
  if task.task_type == cluster.EVALUATOR and not cfg.input.eval_data:
    raise ConfigError("the evaluator task needs --eval_data.")

  def no_input():  # the input_fn of a role that never reads this data
    raise RuntimeError("this task does not read this input")

  train_input_fn = experiment.train_input_fn() if task.trains else no_input
  eval_input_fn = (experiment.input_fn(cfg.input.eval_data, training=False)
                   if evaluates else no_input)
  if task.is_chief:
    config_lib.save(cfg, model_dir)
  model_fn = model_fn_lib.build_model_fn(cfg, experiment.backbone)
  if (task.is_chief and cfg.continual.warm_start_from and
      not tf.train.latest_checkpoint(model_dir)):
    # Only the chief initialises variables; the warm start runs in its init_fn.
    source = warm_start.resolve_source(cfg.continual.warm_start_from)
    model_fn = warm_start.wrap_model_fn(model_fn, source, cfg.head.class_names, model_dir)
  # Distribution strategies call the model_fn per replica through autograph,
  # which rewrites its Python control flow (and that of everything it calls:
  # freeze plans, hub.KerasLayer wrappers) and breaks on plain Python helpers.
  model_fn = _without_autograph(model_fn)
  record = cluster.task_steps_path(model_dir, task)
  train_hooks = []
  steps_hook = None
  if task.trains:
    steps_hook = _TaskStepsHook(record, task.name, cfg.run.log_every_steps)
    train_hooks.append(steps_hook)
    workers = [cluster.Task(cluster.WORKER, i, task.cluster)
               for i in range(len(task.cluster.get(cluster.WORKER, ())))]
    if task.is_chief and workers and cfg.cluster.wait_for_workers_secs:
      train_hooks.append(_WaitForWorkersHook(model_dir, workers,
                                             cfg.cluster.wait_for_workers_secs))
    if task.is_chief and cfg.cluster.summary_dir:
      train_hooks.append(_ExtraSummaryHook(cfg.run.log_every_steps,
                                           cfg.cluster.summary_dir))
  metrics_exporter = _EvalRecordExporter(record if task.task_type == cluster.EVALUATOR
                                         else "", cfg.cluster.summary_dir)
  # SIGTERM (preemption) stops a training task cleanly; an evaluator keeps
  # the default action.
  preemption = hooks_lib.PreemptionHandler() if task.trains else contextlib.nullcontext()
  with cluster.tf_config_env(task), preemption:
    estimator = tf.compat.v1.estimator.Estimator(
        model_fn=model_fn, config=make_cluster_run_config(cfg, task, strategy))
    listeners = []
    if task.trains:
      train_hooks += cluster_guard_hooks(estimator, cfg, preemption)
      listeners = [hooks_lib.FiniteCheckpointListener(model_dir)] if task.is_chief else []
    train_spec = tf.estimator.TrainSpec(train_input_fn, max_steps=cfg.run.max_steps,
                                        hooks=train_hooks, saving_listeners=listeners)
    eval_spec = tf.estimator.EvalSpec(
        eval_input_fn, steps=cfg.run.eval_steps or None, exporters=[metrics_exporter],
        start_delay_secs=0, throttle_secs=cfg.cluster.eval_throttle_secs)
    log.info("%s: train_and_evaluate (distribution=%s, max_steps %d)", task.name,
             cfg.cluster.distribution, cfg.run.max_steps)
    if task.is_local and not evaluates:
      estimator.train(train_input_fn, max_steps=cfg.run.max_steps, hooks=train_hooks,
                      saving_listeners=listeners)
    else:
      tf.estimator.train_and_evaluate(estimator, train_spec, eval_spec)
  latest = tf.train.latest_checkpoint(model_dir)
  outcome = ClusterOutcome(
      role=task.name, local_steps=steps_hook.local_steps if steps_hook else 0,
      global_step=checkpoints.step_of(latest) if latest else 0,
      metrics=metrics_exporter.last_result,
      record=record if (task.trains or task.task_type == cluster.EVALUATOR) else "")
  return outcome


def _without_autograph(model_fn):
  """model_fn that autograph leaves alone (Estimator needs the named arguments)."""
  unconverted = tf.autograph.experimental.do_not_convert(model_fn)

  def model_fn_without_autograph(features, labels, mode, params):
    return unconverted(features, labels, mode, params=params)

  return model_fn_without_autograph


def _serve_parameters(config: ExperimentConfig, task) -> ClusterOutcome:
  """A ps task's train_and_evaluate: start the server and serve, forever.

  The model is never built on a ps, so its estimator needs no backbone.
  """
  from estimator_transfer.cluster import tf_config as cluster  # pylint: disable=g-import-not-at-top

  def model_fn(features, labels, mode):
    raise RuntimeError("a ps task never builds the model")

  def no_input():
    raise RuntimeError("a ps task never reads data")

  with cluster.tf_config_env(task):
    estimator = tf.compat.v1.estimator.Estimator(
        model_fn=model_fn, config=make_cluster_run_config(config, task))
    log.info("%s: serving variables (stops when the job stops it)", task.name)
    tf.estimator.train_and_evaluate(
        estimator, tf.estimator.TrainSpec(no_input, max_steps=config.run.max_steps),
        tf.estimator.EvalSpec(no_input))
  return ClusterOutcome(role=task.name)


class _TaskStepsHook(tf.compat.v1.train.SessionRunHook):
  """Counts the training steps this process runs; records them in a JSON file.

  In asynchronous training every trainer advances the shared global step;
  this is how much of it each one did.
  """

  def __init__(self, path: str, task_name: str, every_steps: int):
    self._path = path
    self._task_name = task_name
    self._every = max(1, every_steps)
    self.local_steps = 0
    self._first_global_step = None
    self._last_global_step = None
    self._joined_at = None

  def begin(self):
    self._global_step = tf.compat.v1.train.get_global_step()

  def after_create_session(self, session, coord):
    self._joined_at = time.time()
    self._write(final=False)  # "joined": what the chief's _WaitForWorkersHook waits for

  def before_run(self, run_context):
    return tf.compat.v1.train.SessionRunArgs(self._global_step)

  def after_run(self, run_context, run_values):
    step = int(run_values.results)
    self.local_steps += 1
    if self._first_global_step is None:
      self._first_global_step = step
    self._last_global_step = step
    if self.local_steps % self._every == 0:
      self._write(final=False)

  def end(self, session):
    self._write(final=True)
    log.info("%s ran %d training steps (global steps %s..%s)", self._task_name,
             self.local_steps, self._first_global_step, self._last_global_step)

  def _write(self, final: bool):
    tf.io.gfile.makedirs(os.path.dirname(self._path))
    _write_atomically(self._path, json.dumps({
        "task": self._task_name, "local_steps": self.local_steps,
        "first_global_step": self._first_global_step,
        "last_global_step": self._last_global_step, "finished": final,
        "joined_at": self._joined_at}, indent=1))


class _WaitForWorkersHook(tf.compat.v1.train.SessionRunHook):
  """Holds the chief's first step until every worker has joined (or a timeout).

  In asynchronous training the chief starts alone and, on a short job, can
  be done before a worker has its session; waiting makes every trainer take
  part. A worker has joined when its step record (written right after its
  session is created) is newer than this chief's start.
  """

  def __init__(self, model_dir: str, workers, timeout_secs: float):
    from estimator_transfer.cluster import tf_config as cluster  # pylint: disable=g-import-not-at-top
    self._paths = {w.name: cluster.task_steps_path(model_dir, w) for w in workers}
    self._timeout = timeout_secs
    self._started = time.time()

  def after_create_session(self, session, coord):
    deadline = time.time() + self._timeout
    waiting = dict(self._paths)
    while waiting and time.time() < deadline:
      for name, path in list(waiting.items()):
        if self._joined(path):
          log.info("%s joined", name)
          del waiting[name]
      if waiting:
        time.sleep(0.5)
    if waiting:
      log.warning("starting without %s: not joined after %ds (--wait_for_workers_secs)",
                  ", ".join(sorted(waiting)), self._timeout)

  def _joined(self, path: str) -> bool:
    try:
      with tf.io.gfile.GFile(path) as f:
        record = json.loads(f.read())
    except (tf.errors.OpError, ValueError):
      return False
    # Clocks differ between hosts: allow a minute of skew. A record from an
    # earlier incarnation of the job is older than that.
    return float(record.get("joined_at") or 0) >= self._started - 60


class _ExtraSummaryHook(tf.compat.v1.train.SummarySaverHook):
  """Writes the graph's summaries to a second directory (e.g. Vertex TensorBoard)."""

  def __init__(self, every_steps: int, output_dir: str):
    super().__init__(save_steps=every_steps, output_dir=output_dir,
                     summary_op=())  # the graph's merged summaries, set in begin()

  def begin(self):
    self._summary_op = tf.compat.v1.summary.merge_all()
    super().begin()

  def _get_summary_op(self):
    return [self._summary_op] if self._summary_op is not None else None


class _EvalRecordExporter(tf.estimator.Exporter):
  """An `EvalSpec` exporter that exports no model: it records each evaluation.

  Exporters are the evaluator's only per-evaluation callback; this one keeps
  the result, appends it to the evaluator's record file, and writes the
  scalars to `summary_dir/eval` for TensorBoard.
  """

  def __init__(self, record_path: str, summary_dir: str):
    self._record_path = record_path
    self._summary_dir = summary_dir
    self._history = []
    self.last_result = None

  @property
  def name(self) -> str:
    return "eval_record"

  def export(self, estimator, export_path, checkpoint_path, eval_result,
             is_the_final_export):
    del estimator, export_path
    result = {}
    for key, value in eval_result.items():
      try:
        result[key] = int(value) if key == "global_step" else float(value)
      except (TypeError, ValueError):
        continue
    self.last_result = result
    self._history.append(result)
    log.info("evaluated %s: %s", os.path.basename(checkpoint_path), ", ".join(
        f"{k} {v:.4f}" for k, v in sorted(result.items()) if k != "global_step"))
    if self._record_path:
      tf.io.gfile.makedirs(os.path.dirname(self._record_path))
      _write_atomically(self._record_path, json.dumps({
          "task": "evaluator-0", "evaluations": len(self._history), "last": result,
          "last_checkpoint": checkpoint_path, "final": bool(is_the_final_export),
          "history": self._history}, indent=1))
    if self._summary_dir:
      writer = tf.summary.create_file_writer(os.path.join(self._summary_dir, "eval"))
      with writer.as_default():
        for key, value in result.items():
          if key != "global_step":
            tf.summary.scalar(key, value, step=result.get("global_step", 0))
      writer.flush()
    return None
