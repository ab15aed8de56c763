"""THE training loop: a local run and every TF_CONFIG role go through `TrainingLoop`.

Every training process, local or chief / worker / master, trains with the same
guards: the NaN/Inf loss stop, the finite-checkpoint listener (on the task
that checkpoints), SIGTERM handling (save a checkpoint, return, exit 0),
`max_steps` (never `steps`: a restarted task stops at the same place), the
resume check (the latest checkpoint reads back and fits the model) and the
warm start, on the chief only. Every evaluation, wherever it ran, goes to the
same after-evaluation callbacks.

How the roles differ, and why:

  local      trains to max_steps in one `Estimator.train` call; with
             evaluation, a checkpoint is saved at every evaluation step and
             evaluated at once inside the process, with the evaluation graph
             built once and fed the live weights
             (`in_process_eval.InProcessEvaluator`); then
             `early_stopping.record_evaluation` (best copy in model_dir/best,
             patience, min_delta, restore-best on a regression) and the
             caller's callbacks (the best exporter). Early stopping ends the
             call; a restore-best ends it and the next call starts from the
             best weights. model_dir/train_state.json makes it restartable.
  chief / worker  train to max_steps in one `tf.estimator.train_and_evaluate`
             call (it starts the gRPC server or the distribute coordinator);
             the evaluator task evaluates, and early stopping is the same
             decision replayed from its results (`early_stopping.stop_decision`)
             through Estimator's in-graph stop flag, so workers stop with the
             chief. Restore-best is refused at start-up (`roles.check_role`).
  master     (legacy) as chief, and Estimator evaluates after each checkpoint
             in this process; the results go to the same callbacks.
  evaluator  evaluates each new checkpoint with the same evaluator until one
             reaches max_steps or early stopping decides; records them
             (`roles.EvaluationRecord`).
  ps         serves the variables (`roles.serve_parameters`); never returns.
"""
import dataclasses
import logging
import os
from typing import Callable, Dict, Optional, Sequence

import tensorflow as tf

from estimator_transfer import config as config_lib
from estimator_transfer import files
from estimator_transfer.cluster import roles
from estimator_transfer.cluster import tf_config as cluster
from estimator_transfer.errors import ConfigError
from estimator_transfer.evaluation import pictures
from estimator_transfer.model import model_fn as model_fn_lib
from estimator_transfer.training import checkpoints
from estimator_transfer.training import dry_build
from estimator_transfer.training import early_stopping
from estimator_transfer.training import evaluator as evaluator_lib
from estimator_transfer.training import hooks as hooks_lib
from estimator_transfer.training import in_process_eval
from estimator_transfer.training import model_fns
from estimator_transfer.training import run_config
from estimator_transfer.training import warm_start

log = logging.getLogger("estimator_transfer")

AfterEvaluation = Callable[[Dict[str, float], str], None]
_FALL_BACK = "<the newest readable checkpoint>"  # resolved under the lock

@dataclasses.dataclass
class TrainOutcome:
  """How a `TrainingLoop.run` ended, in any role.

  Attributes:
    role: the task's name (local, chief-0, worker-1, evaluator-0, ps-0).
    step: the latest checkpoint's global step when the task finished.
    local_steps: training steps this process ran (0 for ps and evaluator).
    resumed_from: the checkpoint training resumed from, if any.
    warm_started_from: the warm-start source checkpoint, if used.
    preempted: SIGTERM: checkpoint saved, re-run to continue.
    stopped_early: early stopping's reason, once it stopped the run.
    best: {"step", "value", "metric", "checkpoint"} of the kept best model.
    last_eval: the last evaluation's metrics plus its "step".
    metrics: the last evaluation's scalar metrics (with "global_step").
    record: the per-task record file in model_dir/cluster/, if written.
  """
  role: str = cluster.LOCAL
  step: int = 0
  local_steps: int = 0
  resumed_from: Optional[str] = None
  warm_started_from: Optional[str] = None
  preempted: bool = False
  stopped_early: str = ""
  best: Optional[dict] = None
  last_eval: Optional[dict] = None
  metrics: Optional[Dict[str, float]] = None
  record: str = ""

  @property
  def global_step(self) -> int:
    return self.step


class TrainingLoop:
  """Runs this process's part of training `experiment`: see the module docstring."""

  def __init__(self, experiment, task: Optional[cluster.Task] = None, strategy=None,
               after_evaluation: Sequence[AfterEvaluation] = (),
               hooks: Sequence[tf.compat.v1.train.SessionRunHook] = ()):
    """Creates the loop.

    Args:
      experiment: the resolved `Experiment` (config, backbone, input_fns).
      task: this process's task; default local.
      strategy: the task's train_distribute strategy, built before anything
        ran a TensorFlow op (multi_worker_mirrored needs that); built here
        when None and --distribution asks for one.
      after_evaluation: called as f(metrics, checkpoint_path) after each
        evaluation (e.g. the best exporter).
      hooks: extra SessionRunHooks for every training segment.
    """
    self.experiment = experiment
    self.config = experiment.config
    self.task = task if task is not None else cluster.Task()
    if strategy is None and self.task.task_type not in (cluster.PS, cluster.EVALUATOR):
      with cluster.tf_config_env(self.task):
        strategy = cluster.build_strategy(self.config.cluster.distribution, self.task)
    self._strategy = strategy
    self._after_evaluation = list(after_evaluation)
    self._user_hooks = list(hooks)
    self._role_hooks, self._steps_hook = roles.trainer_hooks(self.task, self.config)
    self.outcome = TrainOutcome(role=self.task.name)

  def run(self, on_corrupt_checkpoint: str = "error", allow_config_change: bool = False,
          extra_files: Optional[Dict[str, str]] = None,
          lock: Optional[files.ModelDirLock] = None) -> TrainOutcome:
    """Trains (or serves, or evaluates) to `run.max_steps`; re-running resumes.

    Args:
      on_corrupt_checkpoint: "error", or "previous" to resume from the newest
        readable checkpoint when the latest is broken.
      allow_config_change: resume although backbone/head settings differ
        from the config saved in model_dir.
      extra_files: name -> text written atomically into model_dir once the
        run is accepted (e.g. the full flags); by the chief only.
      lock: the model_dir's single-writer lock; the chief (or a local run)
        acquires it after every check passed, before its first write, and
        the caller releases it (after the final export).

    Returns:
      The TrainOutcome (also `self.outcome`).

    Raises:
      ConfigError: bad settings for this role, an incompatible resume, or a
        broken checkpoint (`checkpoints.CheckpointError`, naming the file).
      hooks.DivergedError: the loss or the weights became NaN/Inf; nothing
        was saved from that state.
    """
    roles.check_role(self.task, self.config)
    if self.task.task_type == cluster.PS:
      roles.serve_parameters(self.config, self.task)
      return self.outcome
    if self.task.task_type == cluster.EVALUATOR:
      return self._run_evaluator()
    train_input_fn = self._check_data()
    # Every check first (data, resume, the whole training graph with the
    # freeze plan resolved on the backbone): a rejected setting never reaches
    # model_dir. Then the lock, then the first write.
    resume, source = self._check_resume(on_corrupt_checkpoint, allow_config_change)
    # A new local run has nothing to protect: its real graph build checks.
    fresh = dry_build.is_new_local_run(self.config.run.model_dir, self.task.is_local and
                                       not resume and self._strategy is None)
    if self.task.trains and not fresh and dry_build.may_change_model_dir(
        self.config, self.task.is_chief and resume is not _FALL_BACK and resume, extra_files):
      dry_build.check_training_graph(
          self.experiment, train_input_fn,
          resume if resume is not _FALL_BACK and self._strategy is None else None)
    if lock is not None and self.task.is_chief:
      lock.acquire()
    try:
      self._prepare(resume, on_corrupt_checkpoint, allow_config_change, source, extra_files)
      signal_name = self._train(train_input_fn, source)
    except ConfigError:
      if fresh:  # refused by the graph build: what the run wrote goes
        dry_build.undo_new_run(self.config.run.model_dir, lock)
      raise
    self._finish()
    if self.outcome.preempted:
      log.warning("stopped by %s at step %d with a checkpoint saved; re-run the same "
                  "command to resume", signal_name, self.outcome.step)
    return self.outcome

  def _train(self, train_input_fn, source) -> Optional[str]:
    """Trains (evaluating while training where asked); the stopping signal's name."""
    with hooks_lib.PreemptionHandler() as preemption:
      if self._evaluates_while_training():
        self._train_evaluate(train_input_fn, preemption, source)
      else:
        self._train_segment(train_input_fn, self.config.run.max_steps, preemption, source)
      self.outcome.preempted = preemption.requested
    return preemption.signal_name

  # --- set-up ---------------------------------------------------------------

  def _evaluates_while_training(self) -> bool:
    """Local runs evaluate while training when the guards ask for evaluations."""
    g = self.config.guards
    return self.task.is_local and bool(g.early_stopping_metric or g.eval_every_steps)

  def _check_data(self):
    """The training input_fn, after the data a local run needs is checked."""
    cfg = self.config
    if self.task.is_local and not cfg.input.train_data:
      raise ConfigError("--train_data is required for training.")
    if self._evaluates_while_training() and not cfg.input.eval_data:
      raise ConfigError("--early_stopping_metric and --eval_every_steps evaluate while "
                        "training; give --eval_data.")
    return self.experiment.train_input_fn()  # validates the data

  def _check_resume(self, on_corrupt: str, allow_config_change: bool):
    """The chief's read-only resume check: (checkpoint or None, warm-start source).

    A broken latest checkpoint with on_corrupt="previous" is resolved later
    (`_prepare`), under the lock: the fall-back moves files.
    """
    cfg = self.config
    if not self.task.is_chief:
      return None, None
    try:
      resume = checkpoints.resolve_resume_checkpoint(cfg.run.model_dir, "error")
    except checkpoints.CheckpointError:
      if on_corrupt != "previous":
        raise
      return _FALL_BACK, None
    if resume:
      checkpoints.check_resume_compatible(cfg, resume, allow_config_change)
      return resume, None
    if cfg.continual.warm_start_from:
      return None, warm_start.resolve_source(cfg.continual.warm_start_from)
    return None, None

  def _prepare(self, resume, on_corrupt: str, allow_config_change: bool, source,
               extra_files: Optional[Dict[str, str]]) -> None:
    """The chief's first writes: a pending checkpoint fall-back, the config record."""
    cfg = self.config
    model_dir = cfg.run.model_dir
    if not self.task.is_chief:
      return
    if resume is _FALL_BACK:
      resume = checkpoints.resolve_resume_checkpoint(model_dir, on_corrupt)
      checkpoints.check_resume_compatible(cfg, resume, allow_config_change)
    config_lib.save(cfg, model_dir)
    for name, text in (extra_files or {}).items():
      files.write_atomically(os.path.join(model_dir, name), text)
    self.outcome.resumed_from = resume
    self.outcome.warm_started_from = source.checkpoint if source else None
    if resume:
      log.info("resuming from %s (global step %d)", resume, checkpoints.step_of(resume))
      if cfg.continual.warm_start_from:
        log.info("--warm_start_from is ignored: %s already holds a checkpoint", model_dir)

  def _finish(self) -> None:
    latest = tf.train.latest_checkpoint(self.config.run.model_dir)
    self.outcome.step = checkpoints.step_of(latest) if latest else 0
    if self._steps_hook is not None:
      self.outcome.local_steps = self._steps_hook.local_steps
      self.outcome.record = self._steps_hook.path

  # --- training -------------------------------------------------------------

  def _training_estimator(self, lr_scale: float, source):
    """An Estimator for training: guarded model_fn, warm start, lr scale, strategy."""
    cfg = self.config
    if lr_scale != 1.0:
      cfg = cfg.replace(schedule__values=tuple(v * lr_scale for v in cfg.schedule.values))
    model_dir = cfg.run.model_dir
    # With a strategy the graph holds per-replica variable wrappers: the
    # name/shape check is for the plain graph only.
    model_fn = model_fns.guarded_model_fn(
        model_fn_lib.build_model_fn(cfg, self.experiment.backbone), cfg,
        check_resume=self._strategy is None,
        local=self.task.is_local and self._strategy is None)
    if source is not None and not tf.train.latest_checkpoint(model_dir):
      # Only the chief initialises variables; the warm start runs in its init_fn.
      model_fn = warm_start.wrap_model_fn(model_fn, source, cfg.head.class_names, model_dir)
    if self._strategy is not None:
      model_fn = model_fns.without_autograph(model_fn)
    return tf.compat.v1.estimator.Estimator(
        model_fn=model_fn, config=run_config.build_run_config(cfg, self.task, self._strategy),
        params=self.experiment.estimator.params)

  def _train_segment(self, input_fn, max_steps: int, preemption, source=None,
                     extra_hooks=(), lr_scale: float = 1.0, saver_hook=None) -> None:
    """Trains to `max_steps` with the guards, in this task's role.

    `saver_hook` replaces Estimator's checkpoint hook, in its place: first;
    a local task without one gets `hooks.CheckpointSaverHook`.
    """
    model_dir = self.config.run.model_dir
    with cluster.tf_config_env(self.task):
      estimator = self._training_estimator(lr_scale, source)
      if saver_hook is None and self.task.is_local:
        saver_hook = hooks_lib.CheckpointSaverHook(model_dir,
                                                   self.config.run.save_checkpoints_steps)
      train_hooks = [saver_hook] if saver_hook is not None else []
      train_hooks += [hooks_lib.NonFiniteLossHook(model_dir),
                      hooks_lib.StopOnSignalHook(preemption)] + self._role_hooks
      if not self.task.is_local:
        stop = early_stopping.build_cluster_stop_hook(estimator, self.config)
        train_hooks += [stop] if stop is not None else []
      train_hooks += list(extra_hooks) + self._user_hooks
      listeners = [hooks_lib.FiniteCheckpointListener(model_dir)] if self.task.is_chief else []
      try:
        if self.task.is_local:
          estimator.train(input_fn, max_steps=max_steps, hooks=train_hooks,
                          saving_listeners=listeners)
        else:
          log.info("%s: train_and_evaluate (distribution=%s, max_steps %d)", self.task.name,
                   self.config.cluster.distribution, max_steps)
          tf.estimator.train_and_evaluate(
              estimator, tf.estimator.TrainSpec(input_fn, max_steps=max_steps,
                                                hooks=train_hooks, saving_listeners=listeners),
              self._cluster_eval_spec())
      except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
        if "Restoring from checkpoint failed" not in (e.message or ""):
          raise
        detail = e.message.split("Original error:")[-1].strip().splitlines()[0][:200]
        raise ConfigError(
            f"the checkpoint in {model_dir} does not fit the model this config builds "
            f"({detail}); resume with the settings it was trained with, or start a new "
            f"--model_dir with --warm_start_from={model_dir}.") from e

  def _cluster_eval_spec(self) -> tf.estimator.EvalSpec:
    """A master evaluates in-process after checkpoints; chief and workers never do."""
    cfg = self.config
    if self.task.task_type != cluster.MASTER:
      return tf.estimator.EvalSpec(_no_input)
    return tf.estimator.EvalSpec(
        self.experiment.input_fn(cfg.input.eval_data, training=False),
        steps=cfg.run.eval_steps or None, start_delay_secs=0,
        throttle_secs=cfg.cluster.eval_throttle_secs,
        exporters=[evaluator_lib.CallbackExporter(self._on_evaluation)])

  def _train_evaluate(self, train_input_fn, preemption, source) -> None:
    """Trains with in-process evaluations and their decisions; restartable."""
    cfg = self.config
    model_dir, max_steps = cfg.run.model_dir, cfg.run.max_steps
    evaluator = in_process_eval.InProcessEvaluator(self.experiment, preemption)
    state = early_stopping.LoopState.load(model_dir)
    # The confusion-matrix pictures are drawn while training goes on.
    with pictures.in_background():
      self._train_evaluate_loop(state, evaluator, train_input_fn, preemption, source)
    if state.best_checkpoint:
      self.outcome.best = {"step": state.best_step, "value": state.best_value,
                           "metric": state.metric, "checkpoint": state.best_path(model_dir)}

  def _train_evaluate_loop(self, state, evaluator, train_input_fn, preemption,
                           source) -> None:
    model_dir, max_steps = self.config.run.model_dir, self.config.run.max_steps
    try:
      while not preemption.requested:
        if state.stopped:
          log.info("%s; re-running does not train further (raise --patience, or delete "
                   "%s to go on)", state.stopped, early_stopping.STATE_FILENAME)
          self.outcome.stopped_early = state.stopped
          break
        latest = tf.train.latest_checkpoint(model_dir)
        step = checkpoints.step_of(latest) if latest else 0
        if latest and self._evaluation_due(state, step):
          # Saved but not evaluated (killed or preempted in between): now.
          metrics = evaluator.evaluate_checkpoint(step, latest)
          if metrics is None:
            break  # preempted while evaluating: the step is evaluated after the restart
          self._apply_evaluation(state, step, metrics, latest)
          continue
        if step >= max_steps:
          break
        self._train_to(step, state, train_input_fn, preemption, source, evaluator)
    finally:
      evaluator.close()

  def _is_evaluation_step(self, step: int) -> bool:
    g, r = self.config.guards, self.config.run
    return step > 0 and (step % (g.eval_every_steps or r.save_checkpoints_steps) == 0 or
                         step >= r.max_steps)

  def _evaluation_due(self, state, step: int) -> bool:
    return step > state.last_eval_step and self._is_evaluation_step(step)

  def _train_to(self, step: int, state, train_input_fn, preemption, source,
                evaluator) -> None:
    """One training call to max_steps, evaluating in-process; applies a pending restore.

    The call ends early when an evaluation stops training (early stopping)
    or asks for the best checkpoint's weights (the next call restores them).
    """
    cfg = self.config
    model_dir = cfg.run.model_dir
    extra = []
    if state.pending_restore_at_step >= 0:
      best = state.best_path(model_dir)
      if state.pending_restore_at_step == step and best:
        extra.append(hooks_lib.RestoreCheckpointHook(best))
      else:  # a checkpoint after the restore exists: it holds the restored weights
        state.pending_restore_at_step = -1
        state.save(model_dir)
    listener = in_process_eval.EvaluationListener(
        evaluator, lambda s: self._evaluation_due(state, s),
        lambda s, metrics, checkpoint: self._apply_evaluation(state, s, metrics, checkpoint),
        model_dir, preemption, live=self._strategy is None)
    # Estimator adds the saving listeners (the finite-weights check) to it.
    saver_hook = in_process_eval.EvaluationCheckpointSaverHook(
        model_dir, cfg.run.save_checkpoints_steps, self._is_evaluation_step, [listener])
    self._train_segment(train_input_fn, cfg.run.max_steps, preemption, source, extra,
                        state.lr_scale, saver_hook=saver_hook)
    after = tf.train.latest_checkpoint(model_dir)
    if not preemption.requested and (checkpoints.step_of(after) if after else 0) <= step:
      raise ConfigError(f"training made no progress from step {step}: "
                        f"{self.config.input.train_data} yielded no batch; check the data.")
    if extra and state.pending_restore_at_step == step:
      state.pending_restore_at_step = -1
      state.save(model_dir)

  def _apply_evaluation(self, state, step: int, metrics: Dict[str, float],
                        checkpoint: str) -> bool:
    """Records one local evaluation, runs the callbacks; True: stop training now."""
    if 0 <= state.pending_restore_at_step < step:
      state.pending_restore_at_step = -1  # this checkpoint holds the restored weights
    self._record(state, step, metrics, checkpoint)
    # Before the state is saved: a kill in between re-evaluates this step
    # and calls the callbacks again (at least once, never skipped).
    self._on_evaluation(metrics, checkpoint)
    state.save(self.config.run.model_dir)
    return bool(state.stopped) or state.pending_restore_at_step == step

  # --- evaluations ------------------------------------------------------------

  def _on_evaluation(self, metrics: Dict[str, float], checkpoint: str) -> None:
    """Every evaluation of every role ends here: outcome, then the callbacks."""
    step = int(metrics.get("global_step", checkpoints.step_of(checkpoint)))
    self.outcome.metrics = dict(metrics)
    self.outcome.last_eval = dict(metrics, step=step)
    for callback in self._after_evaluation:
      callback(metrics, checkpoint)

  def _record(self, state, step: int, metrics, checkpoint: str) -> None:
    """Applies one evaluation to the local loop state (best copy, restore, stop)."""
    g, model_dir = self.config.guards, self.config.run.model_dir
    if not g.early_stopping_metric:
      state.last_eval_step = step
      state.add_history(step, metrics)
      return
    decision = early_stopping.record_evaluation(state, step, metrics, g)
    metric = g.early_stopping_metric
    if decision == early_stopping.IMPROVED:
      best = checkpoints.copy_checkpoint(
          checkpoint, os.path.join(model_dir, early_stopping.BEST_DIRNAME))
      state.best_checkpoint = os.path.relpath(best, model_dir)
      log.info("new best %s %.4f at step %d (kept in %s)", metric, state.best_value,
               step, best)
    elif decision == early_stopping.REGRESSED:
      log.warning("%s %.4f at step %d is worse than the best %.4f (step %d) by more "
                  "than --regression_tolerance=%g: continuing from the best "
                  "checkpoint's weights and optimizer state at learning rate x%g",
                  metric, metrics[metric], step, state.best_value, state.best_step,
                  g.regression_tolerance, state.lr_scale)
    elif decision == early_stopping.EARLY_STOP:
      log.warning("%s", state.stopped)
      self.outcome.stopped_early = state.stopped
    else:
      log.info("%s %.4f at step %d: no improvement on %.4f (step %d) for %d "
               "evaluation(s)", metric, metrics[metric], step, state.best_value,
               state.best_step, state.evals_without_improvement)

  def _run_evaluator(self) -> TrainOutcome:
    """The evaluator task: each new checkpoint until max_steps or early stopping."""
    cfg = self.config
    model_dir, max_steps = cfg.run.model_dir, cfg.run.max_steps
    evaluate = evaluator_lib.CheckpointEvaluator(self.experiment)
    record = roles.EvaluationRecord(self.task.name, roles.task_steps_path(model_dir, self.task),
                                    cfg.cluster.summary_dir, max_steps)
    self._after_evaluation.insert(0, record)
    for checkpoint in tf.train.checkpoints_iterator(
        model_dir, min_interval_secs=cfg.cluster.eval_throttle_secs):
      step = checkpoints.step_of(checkpoint)
      metrics = evaluate(step, checkpoint)
      if metrics is None:
        continue
      self._on_evaluation(metrics, checkpoint)
      stopped = early_stopping.stop_decision(model_dir, cfg.guards)
      if stopped:
        log.warning("%s: the trainers stop too", stopped)
        self.outcome.stopped_early = stopped
        record.write(final=True)
      if step >= max_steps or stopped:
        break
    self.outcome.record = record.path
    self._finish()
    return self.outcome


def _no_input():  # the input_fn of a role that never reads this data
  raise RuntimeError("this task does not read this input")
