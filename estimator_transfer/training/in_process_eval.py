"""Evaluation inside the training process: one eval graph, fed the live weights.

`Estimator.evaluate` builds a new graph, opens a new session and restores a
checkpoint for every evaluation (seconds each, on a small model most of an
evaluation's cost). `InProcessEvaluator` builds the evaluation graph once
(the model_fn in EVAL mode over the eval input_fn, exactly as
`Estimator.evaluate` builds it) in its own graph and session, and at each
evaluation copies the training session's variables into it, re-initialises
the metrics and the eval iterator, and runs the pass. It writes what
`Estimator.evaluate` writes (the eval summaries in model_dir/eval, same tags,
plus the checkpoint path) and the same report (`evaluator.finish_evaluation`).

This is the idea of `tf.estimator.experimental.InMemoryEvaluatorHook`,
without its known limits: that hook builds a new MonitoredSession and a
Scaffold copy per evaluation (a memory leak reported upstream, tensorflow
issue 30807), refuses a custom saver, so EMA evaluation, and evaluates by
iteration count rather than at the steps a checkpoint exists for. Here the
variables are mapped by the evaluation scaffold's own restore map (EMA
shadows included), and a graph whose variables cannot be mapped (saveable
objects, partitioned variables) restores the step's checkpoint instead.

The training side is `EvaluationCheckpointSaverHook`: Estimator's checkpoint
hook, saving also at every evaluation step (the after-evaluation callbacks
need a checkpoint of the evaluated step: the best copy, the best export),
whose `EvaluationListener` evaluates right after that save, while the
session's weights are the checkpoint's.
"""
import contextlib
import functools
import logging
import os
import sys
import threading
import time
from typing import Callable, Dict, Optional

import tensorflow as tf
# Estimator's own eval-graph builder and summary writers (the package is
# pinned at 2.15): the in-process evaluation builds exactly the graph
# `Estimator.evaluate` builds and writes exactly its summaries, as
# InMemoryEvaluatorHook does.
from tensorflow_estimator.python.estimator import estimator as estimator_lib

from estimator_transfer.data import pipeline
from estimator_transfer.training import eval_batches
from estimator_transfer.training import evaluator as evaluator_lib
from estimator_transfer.training import hooks as hooks_lib

log = logging.getLogger("estimator_transfer")

# step -> whether an evaluation is due at that step.
StepPredicate = Callable[[int], bool]


def _restore_map(scaffold) -> Optional[Dict[str, tf.Variable]]:
  """Checkpoint name -> eval variable, as the eval scaffold restores; None: unmappable.

  With EMA the evaluation scaffold's saver maps `<name>/ExponentialMovingAverage`
  onto each trained variable; otherwise every global variable loads from
  itself. Anything but plain variables (saveable objects, partitioned
  variables) only a checkpoint restore can fill.
  """
  saver = scaffold.saver if scaffold is not None else None
  var_list = getattr(saver, "_var_list", None) if saver is not None else None
  if isinstance(var_list, dict):
    mapping = dict(var_list)
  else:
    mapping = {v.op.name: v for v in tf.compat.v1.global_variables()}
  if tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.SAVEABLE_OBJECTS):
    return None
  if not all(isinstance(v, tf.Variable) for v in mapping.values()):
    return None
  covered = {id(v) for v in mapping.values()}
  if any(id(v) not in covered for v in tf.compat.v1.global_variables()):
    return None
  return mapping


def _without_autotune(input_fn):
  """The eval input_fn, its pipeline without tf.data's autotuning thread.

  The evaluator's iterator lives as long as the run and is idle between
  evaluations (idle for good once the batches are kept): autotuning sleeps
  ever longer there, and closing the session waits for it to wake (seconds).
  Parallel maps then run on as many threads as there are cores.
  """

  @functools.wraps(input_fn)  # Estimator passes what the input_fn's arguments name
  def wrapped(*args, **kwargs):
    dataset = input_fn(*args, **kwargs)
    return pipeline.without_autotune(dataset) if isinstance(dataset, tf.data.Dataset) \
        else dataset

  return wrapped


@contextlib.contextmanager
def _short_switch_interval(seconds: float = 0.0005):
  """A shorter GIL switch interval (default 5 ms) while a helper thread runs Python.

  The training thread wants the GIL back after every step's session.run;
  with the default it can wait up to 5 ms per step behind the graph build.
  """
  before = sys.getswitchinterval()
  sys.setswitchinterval(min(before, seconds))
  try:
    yield
  finally:
    sys.setswitchinterval(before)


class InProcessEvaluator:
  """Evaluates --eval_data with one graph and session kept for the whole run.

  `evaluate_live` copies the weights of a training session in;
  `evaluate_checkpoint` restores a checkpoint (a restart whose last
  evaluation did not finish). Both return what `CheckpointEvaluator` returns
  for the same weights, and write the same files.
  """

  def __init__(self, experiment, preemption=None):
    """Creates the evaluator; the graph is built at the first evaluation.

    Args:
      experiment: the `Experiment` (its estimator, config and eval data).
      preemption: a `hooks.PreemptionHandler`; a signal during an evaluation
        stops it (the call returns None). None: never interrupted.
    """
    self._experiment = experiment
    self._preemption = preemption
    self._input_fn = _without_autotune(
        experiment.input_fn(experiment.config.input.eval_data, training=False))
    self._session = None
    self._preparing: Optional[threading.Thread] = None
    self._prepare_error: Optional[BaseException] = None
    self._closing = threading.Event()
    self.last_pass_s = 0.0  # seconds of the last evaluation's passes over the data

  def prepare_in_background(self) -> None:
    """Builds the evaluation graph and decodes --eval_data on a thread, once.

    Called as training starts: the graph build (Python), the session and
    the first, decoding read of the eval data then overlap the training
    session's start and first steps, and the first evaluation runs only its
    forward passes. Every other call waits for the thread (`_ready`); an
    error on it is raised there, by the first evaluation, as if it had
    happened there.
    """
    if self._session is not None or self._preparing is not None:
      return
    self._preparing = threading.Thread(target=self._prepare, name="eval-prepare",
                                       daemon=True)
    self._preparing.start()

  def _prepare(self) -> None:
    try:
      with _short_switch_interval():
        self._build()
        self._decode_pass()
    except BaseException as e:  # pylint: disable=broad-except  # raised by _ready
      self._prepare_error = e

  def _ready(self) -> None:
    """Waits for the background preparation; builds here when none ran."""
    if self._preparing is not None:
      self._preparing.join()
      self._preparing = None
      error, self._prepare_error = self._prepare_error, None
      if error is not None:
        raise error
    if self._session is None:
      self._build()

  def _interrupted(self) -> bool:
    return self._closing.is_set() or (self._preemption is not None and
                                      self._preemption.requested)

  def _decode_pass(self) -> None:
    """Reads --eval_data once into the kept batches, without the model (when they fit)."""
    if self._batches.keeps:
      self._session.run(self._local_init)  # the bad-record count of this pass starts at 0
      self._read_pass(self._session, self._experiment.config.run.eval_steps or None,
                      update=False)

  def _build(self) -> None:
    estimator = self._experiment.estimator
    graph = tf.Graph()
    with graph.as_default():
      # pylint: disable=protected-access
      scaffold, update_op, eval_dict, hooks = estimator._evaluate_build_graph(
          self._input_fn, hooks=[], checkpoint_path=None)
      # pylint: enable=protected-access
      for hook in hooks:  # the input hooks: they (re)initialise the eval iterator
        hook.begin()
      mapping = _restore_map(scaffold)
      self._placeholders = {}
      assigns = []
      for name, variable in sorted((mapping or {}).items()):
        placeholder = tf.compat.v1.placeholder(variable.dtype.base_dtype, variable.shape)
        self._placeholders[name] = placeholder
        assigns.append(variable.assign(placeholder, read_value=False))
      self._mapping_complete = mapping is not None
      self._feed_op = tf.group(assigns) if assigns else tf.no_op()
      self._saver = scaffold.saver or tf.compat.v1.train.Saver(sharded=True)
      local_init = [tf.compat.v1.local_variables_initializer()]
      if scaffold.local_init_op is not None:
        local_init.append(scaffold.local_init_op)
      self._local_init = tf.group(local_init)
      tables = tf.compat.v1.tables_initializer()
      cfg = self._experiment.config
      self._batches = eval_batches.EvalBatches(graph, cfg.input, cfg.input.eval_data)
      graph.finalize()
    self._graph = graph
    self._update_op, self._eval_dict, self._hooks = update_op, eval_dict, hooks
    self._session = tf.compat.v1.Session(graph=graph, config=estimator.config.session_config)
    self._session.run(tables)
    self._eval_dir = estimator.eval_dir()

  def close(self) -> None:
    self._closing.set()
    if self._preparing is not None:
      self._preparing.join()
      self._preparing = None
    if self._session is not None:
      self._session.close()
      self._session = None

  def can_feed(self, train_variables: Dict[str, tf.Variable]) -> bool:
    """Whether every eval variable has its training variable in `train_variables`."""
    self._ready()
    return self._mapping_complete and all(n in train_variables for n in self._placeholders)

  def evaluate_live(self, train_session, train_variables: Dict[str, tf.Variable],
                    step: int, checkpoint: str) -> Optional[Dict[str, float]]:
    """Evaluates the weights `train_session` holds now (those of `checkpoint`).

    Args:
      train_session: the training session (a hook's or listener's session).
      train_variables: op name -> variable of the training graph.
      step: the global step of those weights.
      checkpoint: the checkpoint saved at `step`, recorded in the report
        (and restored instead when the variables cannot be mapped).

    Returns:
      The scalar metrics with "global_step", or None when interrupted.
    """
    if not self.can_feed(train_variables):
      return self.evaluate_checkpoint(step, checkpoint)
    values = train_session.run({n: train_variables[n] for n in self._placeholders})
    self._session.run(self._feed_op, feed_dict={
        self._placeholders[n]: value for n, value in values.items()})
    return self._run(step, checkpoint)

  def evaluate_checkpoint(self, step: int, checkpoint: str) -> Optional[Dict[str, float]]:
    """Evaluates `checkpoint` (restored into the kept eval graph)."""
    self._ready()
    try:
      with self._graph.as_default():  # a Saver restores in its own graph only
        self._saver.restore(self._session, checkpoint)
    except (tf.errors.NotFoundError, ValueError) as e:
      # keep_checkpoint_max removed it between listing and reading.
      log.warning("%s is gone (%s): not evaluated", checkpoint, str(e).splitlines()[0])
      return None
    return self._run(step, checkpoint)

  def __call__(self, step: int, checkpoint: str) -> Optional[Dict[str, float]]:
    """The `evaluator.Evaluator` call: evaluates a checkpoint."""
    return self.evaluate_checkpoint(step, checkpoint)

  def _run(self, step: int, checkpoint: str) -> Optional[Dict[str, float]]:
    """One pass over the eval data with the weights now in the eval session."""
    session = self._session
    session.run(self._local_init)  # metric accumulators, eval step, bad-record count
    limit = self._experiment.config.run.eval_steps or None
    start = time.perf_counter()
    if self._batches.ready:  # the decoded batches of the first pass, fed
      for feed in self._batches.feeds(session, limit):
        if self._preemption is not None and self._preemption.requested:
          return None
        session.run(self._update_op, feed_dict=feed)
    elif not self._read_pass(session, limit):
      return None
    # The evaluation's own passes over the data (scripts/benchmark.py --only=eval
    # sets the run's cost against the run without evaluation plus these).
    self.last_pass_s = time.perf_counter() - start
    result = session.run(self._eval_dict)
    global_step = int(result[tf.compat.v1.GraphKeys.GLOBAL_STEP])
    # pylint: disable=protected-access
    with self._graph.as_default():  # the v1 summary writers refuse eager mode
      estimator_lib._write_dict_to_summary(self._eval_dir, result, global_step)
      estimator_lib._write_checkpoint_path_to_summary(self._eval_dir, checkpoint,
                                                       global_step)
    # pylint: enable=protected-access
    return evaluator_lib.finish_evaluation(self._experiment.config, result, step, checkpoint)

  def _read_pass(self, session, limit: Optional[int], update: bool = True) -> bool:
    """A pass reading --eval_data (keeping its batches when they fit); False: interrupted.

    `update=False`, the background decoding pass, runs the input only and
    stops as soon as the batches cannot be kept.
    """
    for hook in self._hooks:  # (re)initialise the eval iterator
      hook.after_create_session(session, None)
    fetches, kept = self._batches.fetches(), self._batches.start_pass()
    done = 0
    while limit is None or done < limit:
      if self._interrupted():
        return False
      if not update and kept is None:
        return True  # over the budget: the first evaluation reads the files
      try:
        if fetches is None:
          session.run(self._update_op)
        elif update:
          _, values = session.run([self._update_op, fetches])
          kept = self._batches.add(kept, values)
        else:
          kept = self._batches.add(kept, session.run(fetches))
      except tf.errors.OutOfRangeError:
        break
      done += 1
    self._batches.finish_pass(kept, session, complete=True)
    return True


class EvaluationListener(tf.compat.v1.train.CheckpointSaverListener):
  """Evaluates in-process right after each checkpoint of an evaluation step.

  `on_evaluation(step, metrics, checkpoint)` applies the result (loop state,
  callbacks) and returns True when training must stop now (early stopping,
  or a restore of the best checkpoint that the loop applies in a new
  training call); the checkpoint hook then requests the stop.
  """

  def __init__(self, evaluator: InProcessEvaluator, due: StepPredicate,
               on_evaluation: Callable[[int, Dict[str, float], str], bool], model_dir: str,
               preemption=None, live: bool = True):
    """Creates the listener.

    Args:
      evaluator: the run's evaluator (its graph outlives this train call).
      due: whether the checkpoint of a step is to be evaluated.
      on_evaluation: applies a result; True stops training.
      model_dir: where the checkpoints are.
      preemption: a `hooks.PreemptionHandler`: after a signal nothing is
        evaluated (the restart evaluates the checkpoint).
      live: copy the session's variables; False restores the checkpoint just
        saved (a distribution strategy's graph holds per-replica variables).
    """
    self._live = live
    self._evaluator = evaluator
    self._due = due
    self._on_evaluation = on_evaluation
    self._model_dir = model_dir
    self._preemption = preemption
    self._variables = {}

  def begin(self):
    self._variables = {v.op.name: v for v in tf.compat.v1.global_variables()}

  def session_started(self) -> None:
    """The training session is up: the evaluator prepares itself meanwhile."""
    self._evaluator.prepare_in_background()

  def after_save(self, session, global_step_value):
    step = int(global_step_value)
    if not self._due(step) or (self._preemption is not None and self._preemption.requested):
      return False  # a preempted run evaluates this checkpoint after its restart
    checkpoint = os.path.join(self._model_dir, f"model.ckpt-{step}")
    if self._live:
      metrics = self._evaluator.evaluate_live(session, self._variables, step, checkpoint)
    else:
      metrics = self._evaluator.evaluate_checkpoint(step, checkpoint)
    if metrics is None:
      return False
    return bool(self._on_evaluation(step, metrics, checkpoint))


class _EvaluationStepTimer(tf.compat.v1.train.SecondOrStepTimer):
  """Every `every_steps` steps, and at every step `due` names."""

  def __init__(self, every_steps: int, due: StepPredicate):
    super().__init__(every_steps=every_steps)
    self._due_step = due

  def should_trigger_for_step(self, step):
    if step == self.last_triggered_step():
      return False
    return super().should_trigger_for_step(step) or self._due_step(int(step))


class EvaluationCheckpointSaverHook(hooks_lib.CheckpointSaverHook):
  """The checkpoint hook (`hooks.CheckpointSaverHook`), also saving at every evaluation step.

  Given to `Estimator.train` in its hooks, it replaces the one Estimator
  would add (and receives the `saving_listeners`). Its session-start save
  and its final save in `end()` are Estimator's.
  """

  def __init__(self, model_dir: str, save_steps: int, evaluation_step: StepPredicate,
               listeners=()):
    super().__init__(model_dir, save_steps, listeners)
    self._timer = _EvaluationStepTimer(save_steps, evaluation_step)

  def after_create_session(self, session, coord):
    super().after_create_session(session, coord)  # Estimator's session-start save
    for listener in self._listeners:
      if isinstance(listener, EvaluationListener):
        listener.session_started()
