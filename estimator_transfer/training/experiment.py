"""The Experiment: one resolved config with its backbone, Estimator and input_fns.

Training goes through `training.loop` (one loop for local runs and every
cluster role); evaluation, export and the final export of a run are here.
"""
import logging
from typing import Callable, Dict, List, Optional, Sequence

import tensorflow as tf

from estimator_transfer.cluster import tf_config as cluster
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.data import sources
from estimator_transfer.data import memory_cache
from estimator_transfer.data import pipeline
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import relabel
from estimator_transfer.errors import ConfigError
from estimator_transfer.evaluation import report as evaluation
from estimator_transfer.feature_cache import cache as feature_cache_lib
from estimator_transfer.model import backbones
from estimator_transfer.model import model_fn as model_fn_lib
from estimator_transfer.serving import saved_model
from estimator_transfer.serving import exporters
from estimator_transfer.training import checkpoints
from estimator_transfer.training import loop as loop_lib
from estimator_transfer.training import run_config

EVAL_RESULTS_FILENAME = "eval_results.json"

log = logging.getLogger("estimator_transfer")


class Experiment:
  """One resolved config: backbone, Estimator and input_fns, built once."""

  def __init__(self, config: ExperimentConfig):
    config.validate()
    if not config.run.model_dir:
      raise ConfigError("--model_dir is required: the directory for checkpoints.")
    # Before anything runs a graph (resolving loads the backbone).
    run_config.enable_determinism(config.run.seed)
    self.backbone = backbones.resolve(config.backbone)
    if config.backbone.image_size != self.backbone.image_size:
      config = config.replace(backbone__image_size=self.backbone.image_size)
    self.config = config
    with cluster.tf_config_env(cluster.Task()):  # this estimator stays local
      estimator_config = run_config.build_run_config(config)
    self.estimator = tf.compat.v1.estimator.Estimator(
        model_fn=model_fn_lib.build_model_fn(config, self.backbone),
        config=estimator_config)
    self.outcome = loop_lib.TrainOutcome()

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
      fn = feature_cache_lib.build_input_fn(
          self.feature_cache(), data, training, seed=self.config.run.seed,
          class_names=data_names or head.class_names,
          num_classes=0 if data_names else head.num_classes)
      return self._remapped(fn, data)
    fn = pipeline.build_input_fn(
        self.config.input, data, self.image_size, training=training,
        seed=self.config.run.seed, class_names=data_names or head.class_names,
        num_classes=0 if data_names else head.num_classes)
    return self._remapped(fn, data)

  def feature_cache(self):
    """The `feature_cache.FeatureCache` of --cache_features (None when off)."""
    if not self.config.input.cache_features:
      return None
    if getattr(self, "_feature_cache", None) is None:
      self._feature_cache = feature_cache_lib.FeatureCache(self.config, self.backbone)
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
      mapping = relabel.label_mapping(labels_lib.class_names_for(data), names, data)
      if mapping:
        fn = relabel.remap_labels(fn, mapping, len(names))
    return fn

  def train_input_fn(self):
    """The training input_fn: --train_data, mixed with --replay_data if given."""
    cfg = self.config
    fn = self.input_fn(cfg.input.train_data, training=True)
    if cfg.continual.replay_data:
      replay = self.input_fn(cfg.continual.replay_data, training=True)
      fn = relabel.mix_input_fns(fn, replay, cfg.continual.replay_ratio,
                                   cfg.input.batch_size, seed=cfg.run.seed)
    return fn

  def train(self, on_corrupt_checkpoint: str = "error", allow_config_change: bool = False,
            extra_files: Optional[Dict[str, str]] = None,
            after_evaluation: Optional[Callable[[Dict[str, float], str], None]] = None,
            hooks: Sequence[tf.compat.v1.train.SessionRunHook] = ()) -> int:
    """Trains locally to `run.max_steps`; re-running it after any interruption resumes.

    The one training loop (`training.loop.TrainingLoop`) in the local role:
    resumes from model_dir's latest checkpoint (global step, optimizer slots,
    EMA; the learning rate and unfreeze stage follow the step), after
    checking it reads back; otherwise starts fresh, warm-started from
    `continual.warm_start_from` if set. With `guards.early_stopping_metric`
    (or `guards.eval_every_steps`) it evaluates while training, inside the
    process (`training.in_process_eval`), at a checkpoint of each evaluation
    step: the best checkpoint is kept in model_dir/best/, patience stops the
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
    loop = loop_lib.TrainingLoop(self, cluster.Task(),
                                 after_evaluation=[after_evaluation] if after_evaluation else [],
                                 hooks=hooks)
    self.outcome = loop.outcome
    loop.run(on_corrupt_checkpoint, allow_config_change, extra_files)
    return self.outcome.step

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
        *self._cache_lines(),
        f"model_dir {cfg.run.model_dir}",
    ]

  def _cache_lines(self) -> List[str]:
    """The banner's cache line: the feature cache, or the decoded-data cache."""
    i = self.config.input
    if i.cache_features:
      return [f"cache     {self.feature_cache().describe()}"]
    if not i.train_data:
      return []
    reason = memory_cache.describe(i, i.train_data, self.image_size,
                                   self.config.head.class_names)
    return [f"cache     {reason}"]

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
    return saved_model.export_saved_model(
        self.estimator, export_dir, exporters.export_options(self.config, self.image_size),
        checkpoint_path=checkpoint_path, verify=verify)

  def export_after_evaluation(self, eval_result: Dict[str, float],
                              checkpoint_path: str) -> Dict[str, object]:
    """Best export into --export_dir; with --export_latest also into model_dir/export/latest."""
    return exporters.export_after_evaluation(self.estimator, self.config, self.image_size,
                                             eval_result,
                                             self.servable_checkpoint(checkpoint_path))

  def export_final(self, last_eval: Optional[Dict[str, float]] = None) -> List[str]:
    """The end of a training run: the latest checkpoint, published.

    The one place the final export is written, for local runs and a
    cluster's chief alike. With --eval_data the checkpoint is evaluated
    (unless `last_eval`, the loop's last evaluation, is of this very
    checkpoint), the best model by --best_metric goes to --export_dir (and,
    with --export_latest, the checkpoint to model_dir/export/latest); without it the
    latest checkpoint is exported.

    Args:
      last_eval: the training loop's last evaluation (metrics plus "step").

    Returns:
      Lines saying what was exported, for the console.
    """
    cfg = self.config
    checkpoint = tf.train.latest_checkpoint(cfg.run.model_dir)
    if not cfg.input.eval_data:
      path = self.export(checkpoint_path=checkpoint)
      return [f"exported {path} (the latest checkpoint: without --eval_data there is no "
              "--best_metric to choose by)"]
    if last_eval and tf.train.load_checkpoint(checkpoint).get_tensor(
        "global_step") == last_eval["step"]:
      metrics = {k: v for k, v in last_eval.items() if k != "step"}
    else:
      metrics = self.evaluate(checkpoint_path=checkpoint)
    result = self.export_after_evaluation(metrics, checkpoint)
    return [f"best export: {result['best_decision']}",
            f"latest export: {result['latest_decision']}"]

  def _require_checkpoint(self, checkpoint_path):
    if checkpoint_path:
      if not tf.io.gfile.exists(checkpoint_path + ".index"):
        raise ConfigError(f"checkpoint {checkpoint_path} does not exist; give a "
                          "path such as model_dir/model.ckpt-1000.")
    elif not checkpoints.resolve_resume_checkpoint(self.config.run.model_dir,
                                                   read_tensors=False):
      raise ConfigError(f"no checkpoint in {self.config.run.model_dir}; train first "
                        "(et-train) or point --model_dir at a trained model.")


def _describe_data(path: str) -> str:
  """'N images in K classes' for folders, 'N files' for TFRecords; no reading."""
  try:
    if labels_lib.is_image_folder(path):
      files, _, names = sources.list_image_folder(path)
      return f"{len(files)} images in {len(names)} classes"
    return f"{len(sources.list_tfrecord_files(path))} TFRecord files"
  except ConfigError:
    return "not found"
  except Exception:  # pylint: disable=broad-except
    return "other format"
