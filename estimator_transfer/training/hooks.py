"""SessionRunHooks used by the training loop.

Besides progress logging: the guards that keep a long run from shipping or
persisting a broken state (NaN/Inf guard, finite-checkpoint listener), the
SIGTERM handling of cluster preemption, and the restore of another
checkpoint's variables into a running session (restore-best).
"""
import logging
import math
import os
import signal
import threading
import time

import tensorflow as tf
from tensorflow.python.framework import meta_graph  # pylint: disable=g-direct-tensorflow-import

log = logging.getLogger("estimator_transfer")


def _fmt_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


class ProgressHook(tf.compat.v1.train.SessionRunHook):
  """Logs step/max_steps, loss, learning rate, examples/s, elapsed and ETA."""

  def __init__(self, loss, max_steps: int, batch_size: int, every_steps: int,
               summary_dir: str = ""):
    self._loss = loss
    self._max_steps = max_steps
    self._batch_size = batch_size
    self._every = every_steps
    self._summary_dir = summary_dir  # examples/s goes to TensorBoard too
    self._last_step = None
    self._last_time = None
    self._start = None

  def begin(self):
    self._global_step = tf.compat.v1.train.get_global_step()
    graph = tf.compat.v1.get_default_graph()
    try:
      self._lr = graph.get_tensor_by_name("current_learning_rate:0")
    except KeyError:
      self._lr = tf.constant(float("nan"))

  def before_run(self, run_context):
    return tf.compat.v1.train.SessionRunArgs(
        {"step": self._global_step, "loss": self._loss, "lr": self._lr})

  def after_run(self, run_context, run_values):
    now = time.time()
    step = int(run_values.results["step"]) + 1
    if self._start is None:
      self._start, self._start_step = now, step
      self._last_time, self._last_step = now, step
      return
    if step % self._every and step < self._max_steps:
      return
    dt = now - self._last_time
    rate = (step - self._last_step) * self._batch_size / dt if dt > 0 else float("nan")
    steps_per_s = (step - self._start_step) / max(now - self._start, 1e-9)
    eta = (self._max_steps - step) / steps_per_s if steps_per_s > 0 else 0
    log.info("step %d/%d  loss %.4f  lr %.3g  %.1f examples/s  elapsed %s  eta %s",
             step, self._max_steps, run_values.results["loss"], run_values.results["lr"],
             rate, _fmt_seconds(now - self._start), _fmt_seconds(eta))
    if self._summary_dir and rate == rate:
      writer = tf.compat.v1.summary.FileWriterCache.get(self._summary_dir)
      writer.add_summary(tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(
          tag="examples_per_sec", simple_value=rate)]), step)
    self._last_time, self._last_step = now, step


# The training loss, put here by the runner's model_fn wrapper, so hooks built
# before the graph can find it.
TRAIN_LOSS_COLLECTION = "estimator_transfer_train_loss"


class DivergedError(RuntimeError):
  """Training produced a NaN or Inf; nothing was saved from that state."""


def _latest_checkpoint_text(model_dir: str) -> str:
  latest = tf.train.latest_checkpoint(model_dir) if model_dir else None
  return f"the last good checkpoint is {latest}" if latest else \
      "no checkpoint was written yet"


class NonFiniteLossHook(tf.compat.v1.train.SessionRunHook):
  """Stops training on a NaN or Inf loss, naming the step and last good checkpoint.

  Estimator's own NanTensorHook misses Inf and says neither. This hook runs
  before it and raises `DivergedError`; an exception out of a step skips the
  hooks' `end()`, so no final checkpoint is written from the diverged state
  (checkpoints due at that very step are stopped by
  `FiniteCheckpointListener`).
  """

  def __init__(self, model_dir: str):
    self._model_dir = model_dir

  def begin(self):
    losses = tf.compat.v1.get_collection(TRAIN_LOSS_COLLECTION) or \
        tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.LOSSES)
    if not losses:
      raise RuntimeError("NonFiniteLossHook found no training loss in the graph.")
    self._loss = losses[-1]
    self._global_step = tf.compat.v1.train.get_global_step()
    self._step = None

  def after_create_session(self, session, coord):
    self._step = int(session.run(self._global_step))

  def before_run(self, run_context):
    return tf.compat.v1.train.SessionRunArgs(self._loss)

  def after_run(self, run_context, run_values):
    loss = float(run_values.results)
    step = self._step
    self._step += 1
    if not math.isfinite(loss):
      raise DivergedError(
          f"the training loss is {loss} at global step {step}; training stopped "
          f"and nothing was saved from this state; {_latest_checkpoint_text(self._model_dir)}"
          " (lower --lr_values or set --clip_norm, then re-run to resume from it).")


_WRITE_OPS = ("Assign", "AssignAdd", "AssignSub", "AssignVariableOp", "AssignAddVariableOp",
               "AssignSubVariableOp")
_WRITE_PREFIXES = ("Apply", "SparseApply", "ResourceApply", "ResourceSparseApply",
                   "ResourceScatter", "Scatter")
_VARIABLE_OPS = ("VarHandleOp", "VariableV2", "Variable")


def written_variable_ops(train_ops) -> set:
  """Names of the variable ops that running `train_ops` writes (empty: unknown).

  Walks back from the train ops through data and control inputs: optimizer
  updates of weights and slots, BatchNorm moving statistics, EMA averages and
  the global step. Initializers and restore ops are not upstream of it.
  """
  seen, stack, written = set(), [t if isinstance(t, tf.Operation) else t.op
                                 for t in train_ops], set()
  while stack:
    op = stack.pop()
    if op.name in seen:
      continue
    seen.add(op.name)
    if op.type in _WRITE_OPS or op.type.startswith(_WRITE_PREFIXES):
      written.update(t.op.name for t in op.inputs if t.op.type in _VARIABLE_OPS)
    stack.extend(t.op for t in op.inputs)
    stack.extend(op.control_inputs)
  return written


class FiniteCheckpointListener(tf.compat.v1.train.CheckpointSaverListener):
  """Refuses to write a checkpoint whose variables hold a NaN or Inf.

  The Estimator's CheckpointSaverHook runs before any user hook in a step, so
  a step whose update made the weights non-finite would otherwise be saved
  before the loss of the next step shows it. Checked are the variables the
  train op writes (`written_variable_ops`), or every floating variable when
  the graph has no `GraphKeys.TRAIN_OP`.
  """

  def __init__(self, model_dir: str):
    self._model_dir = model_dir

  def begin(self):
    variables = [v for v in tf.compat.v1.global_variables() if v.dtype.base_dtype.is_floating]
    written = written_variable_ops(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.TRAIN_OP))
    if written:  # training never changes a frozen weight, so only these can go bad
      variables = [v for v in variables if v.op.name in written]
    self._names = [v.op.name for v in variables]
    with tf.name_scope("finite_check"):
      self._finite = tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in variables]) \
          if variables else tf.constant([], tf.bool)

  def before_save(self, session, global_step_value):
    finite = session.run(self._finite)
    bad = [n for n, ok in zip(self._names, finite) if not ok]
    if bad:
      raise DivergedError(
          f"variable {bad[0]} holds NaN or Inf at global step {global_step_value} "
          f"({len(bad)} variables in all); training stopped without writing that "
          f"checkpoint; {_latest_checkpoint_text(self._model_dir)} (lower --lr_values "
          "or set --clip_norm, then re-run to resume from it).")


class CheckpointSaverHook(tf.compat.v1.train.CheckpointSaverHook):
  """Estimator's checkpoint hook, writing the graph for TensorBoard on a thread.

  At session start Estimator's hook serialises the training graph twice (the
  graph and meta graph events) before its step-0 save: 0.1-0.2 s before the
  first step of a small model. Here a thread writes both while training
  starts, into the same event file; `end` (and the process end, which joins
  non-daemon threads) waits for it. No graph.pbtxt and no .meta files, as
  `run_config` asks. Local training passes it in Estimator's place.
  """

  def __init__(self, checkpoint_dir: str, save_steps: int, listeners=()):
    super().__init__(checkpoint_dir, save_steps=save_steps, listeners=list(listeners),
                     save_graph_def=False)
    self._graph_writer = None

  def after_create_session(self, session, coord):
    global_step = session.run(self._global_step_tensor)
    saver = self._get_saver()
    self._graph_writer = threading.Thread(
        target=self._write_graph, name="et-graph-event",
        args=(tf.compat.v1.get_default_graph(), saver.saver_def if saver else None))
    self._graph_writer.start()
    self._save(session, global_step)  # the state at step "global_step"
    self._timer.update_last_triggered_step(global_step)

  def _write_graph(self, graph, saver_def) -> None:
    try:
      graph_def = graph.as_graph_def(add_shapes=True)  # finalized: read-only
      self._summary_writer.add_graph(None, graph_def=graph_def)
      self._summary_writer.add_meta_graph(
          meta_graph.create_meta_graph_def(graph_def=graph_def, saver_def=saver_def))
    except Exception as e:  # pylint: disable=broad-except
      # TensorBoard's graph view only: training goes on, with one line.
      log.warning("the training graph was not written for TensorBoard: %s", e)

  def end(self, session):
    super().end(session)
    if self._graph_writer is not None:
      self._graph_writer.join()


class PreemptionHandler:
  """Context manager: the first SIGTERM asks training to save and stop.

  Cluster schedulers send SIGTERM before they kill a preempted task. Inside
  the `with` block the first SIGTERM only sets `requested`; `StopOnSignalHook`
  then stops the step loop, Estimator's checkpoint hook saves the current step
  in its `end()`, and the caller returns normally (exit 0). A second SIGTERM
  gets the previous handler (by default: terminate at once).
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._signals = signals
    self._previous = {}
    self.requested = False
    self.signal_name = ""

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    log.warning("%s received: saving a checkpoint and stopping (send it again to "
                "stop at once)", self.signal_name)
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    else:
      log.warning("not on the main thread: SIGTERM will not save a checkpoint")
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}
    return False


class StopOnSignalHook(tf.compat.v1.train.SessionRunHook):
  """Requests a clean stop (hooks' end() runs: a checkpoint is saved) after a signal."""

  def __init__(self, handler: PreemptionHandler):
    self._handler = handler

  def after_run(self, run_context, run_values):
    if self._handler.requested:
      run_context.request_stop()


class RestoreCheckpointHook(tf.compat.v1.train.SessionRunHook):
  """Loads every variable but the global step from `checkpoint_path` at session start.

  Used by restore-best: the run keeps its global step (and so its schedule
  position) but continues from the best checkpoint's weights, BatchNorm
  statistics, EMA and optimizer slots. Runs after the Estimator's own
  checkpoint hook, whose session-start save therefore still holds the state
  it resumed from.
  """

  def __init__(self, checkpoint_path: str):
    self._path = checkpoint_path
    self.restored = []

  def begin(self):
    available = tf.train.load_checkpoint(self._path).get_variable_to_shape_map()
    global_step = tf.compat.v1.train.get_global_step()
    var_list = {}
    for var in tf.compat.v1.global_variables():
      name = var.op.name
      if var is global_step or name == "global_step":
        continue
      if name in available and list(available[name]) == var.shape.as_list():
        var_list[name] = var
    if not var_list:
      raise RuntimeError(f"{self._path} shares no variables with this model.")
    self.restored = sorted(var_list)
    self._saver = tf.compat.v1.train.Saver(var_list=var_list, sharded=False,
                                           name="restore_best")

  def after_create_session(self, session, coord):
    del coord
    self._saver.restore(session, self._path)
    log.info("restored %d variables from %s (global step kept)", len(self.restored),
             os.path.basename(self._path))
