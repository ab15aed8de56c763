"""The training loop's model_fn wrappers: progress log, loss guard, resume check.

Used by `loop.TrainingLoop` for every training Estimator it builds.
"""
import tensorflow as tf

from estimator_transfer.training import checkpoints
from estimator_transfer.training import hooks as hooks_lib


def without_autograph(model_fn):
  """model_fn that autograph leaves alone (Estimator needs the named arguments).

  Distribution strategies call the model_fn per replica through autograph,
  which rewrites its Python control flow (and that of everything it calls:
  freeze plans, hub.KerasLayer wrappers) and breaks on plain Python helpers.
  """
  unconverted = tf.autograph.experimental.do_not_convert(model_fn)

  def model_fn_without_autograph(features, labels, mode, params):
    return unconverted(features, labels, mode, params=params)

  return model_fn_without_autograph


def _ready_at_once(scaffold):
  """`scaffold` whose readiness checks report nothing: a local session's own init.

  Scaffold's default ready ops ask every variable whether it is initialized
  (about 800 ops on mobilenet_v2, built and run twice per session start: a
  quarter of a second). They exist for a task that waits for another to
  initialize the variables. A local session initializes or restores every
  variable itself, and a restore that misses one fails on its own (and is
  checked by name and shape before).
  """
  nothing = tf.constant([], dtype=tf.string, name="ready_local")
  return tf.compat.v1.train.Scaffold(ready_op=nothing, ready_for_local_init_op=nothing,
                                     copy_from_scaffold=scaffold)


def guarded_model_fn(model_fn, cfg, check_resume: bool = True, local: bool = False):
  """The TRAIN spec with its progress log, its loss exposed to the NaN/Inf guard.

  A tf.compat.v1 Saver restores a [8, 3] checkpoint tensor into a [8, 4]
  resource variable without complaint (training then fails far from the
  cause, or runs with the wrong shapes), so before a resume every variable
  of the new graph is matched against the checkpoint by name and shape.
  `local`: one process without a cluster (`_ready_at_once`).
  """

  model_dir = cfg.run.model_dir

  def guarded_model_fn(features, labels, mode, params=None):
    spec = model_fn(features, labels, mode, params)
    if mode == tf.estimator.ModeKeys.TRAIN:
      tf.compat.v1.add_to_collection(hooks_lib.TRAIN_LOSS_COLLECTION, spec.loss)
      progress = hooks_lib.ProgressHook(spec.loss, cfg.run.max_steps, cfg.input.batch_size,
                                        cfg.run.log_every_steps, model_dir)
      spec = spec._replace(training_hooks=list(spec.training_hooks) + [progress])
      latest = tf.train.latest_checkpoint(model_dir)
      if latest and check_resume:
        checkpoints.check_graph_fits(latest, model_dir)
      if local:
        spec = spec._replace(scaffold=_ready_at_once(spec.scaffold))
    return spec

  return guarded_model_fn
