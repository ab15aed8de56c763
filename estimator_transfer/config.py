"""Run configuration: frozen dataclasses, validation and a JSON round trip.

The library takes these objects explicitly; only `estimator_transfer.cli` turns
flags into them. Every user-fixable problem raises `ConfigError` with one
sentence that names the setting and the fix.
"""
import dataclasses
import json
import os
from typing import Optional, Tuple

from estimator_transfer import specs
from estimator_transfer.errors import ConfigError

CONFIG_FILENAME = "config.json"


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """Where the pretrained feature extractor comes from.

  Attributes:
    handle: a `tf.keras.applications` name (`mobilenet_v2`, `resnet50`, ...),
      a TF-Hub handle (URL or local SavedModel/Hub module directory, optionally
      prefixed `hub:`), or a Keras model file (`.h5`/`.keras`) or Keras
      SavedModel directory (prefix `keras:` to force Keras loading).
    weights: for Keras sources, a local weights file, `none` for random
      initialisation, or empty for the source's own weights (a Keras model
      file's weights; random for an application name).
    output_layer: for Keras models, the layer whose output is the feature
      vector (the model is cut there); empty for the model's output.
    image_size: input height/width in pixels; 0 takes it from the backbone.
    value_range: the pixel range the backbone expects (zero_one,
      minus_one_one, zero_255, caffe, torch); empty takes it from the backbone
      (Keras applications know theirs; Hub modules and Keras models: zero_one).
  """
  handle: str = ""
  weights: str = ""
  output_layer: str = ""
  image_size: int = 0
  value_range: str = ""


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """The new head put on the backbone features.

  Attributes:
    kind: `classification` (softmax, or sigmoid with `multi_label`) or
      `regression` (`num_outputs` linear outputs, mean squared error).
    multi_label: classification with independent sigmoid outputs; labels are
      multi-hot vectors.
    class_weights: empty, `balanced` (n / (k * n_c) from the training data) or
      one weight per class, e.g. `1,1,4`.
    num_outputs: regression outputs per example.
  """
  num_classes: int = 0
  class_names: Tuple[str, ...] = ()
  hidden_units: Tuple[int, ...] = ()
  dropout_rate: float = 0.0
  label_smoothing: float = 0.0
  kind: str = "classification"
  multi_label: bool = False
  class_weights: str = ""
  num_outputs: int = 1


@dataclasses.dataclass(frozen=True)
class FreezeConfig:
  """Which backbone layers stay frozen (see `freezing` for the spec forms).

  Attributes:
    spec: `all`, `none`, `first:N`, `last:N`, `until:<layer>` or
      `regex:<pattern>`.
    unfreeze_schedule: gradual unfreezing, `STEP:SPEC,...` (STEP may be
      `<epochs>e`), e.g. `0:all,500:last:20,1500:none`; from each step on,
      SPEC replaces `spec`. Empty: `spec` for the whole run.
  """
  spec: str = "all"
  unfreeze_schedule: str = ""


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Piecewise-constant learning rate on the global step.

  `values[i]` applies from step `boundaries[i-1]` (inclusive) up to step
  `boundaries[i]` (exclusive); optional linear warmup over the first
  `warmup_steps` steps ramps from 0 to `values[0]`.
  """
  boundaries: Tuple[int, ...] = ()  # steps, or "<epochs>e" strings such as "30e"
  values: Tuple[float, ...] = (0.01,)
  warmup_steps: int = 0
  train_size: int = 0  # examples per epoch for "e" boundaries; 0 counts train_data
  lr_multipliers: str = ""  # REGEX=FACTOR,... on backbone/<var> and head/<var>


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer and what is applied around it.

  Attributes:
    weight_decay: on trainable kernels (rank >= 2) only: an L2 term
      weight_decay/2 * |w|^2 in the loss, or decoupled (w -= lr * wd * w) for
      adamw.
    ema_decay: exponential moving average of the trained weights; evaluation
      and export use the averages, training continues on the raw weights.
  """
  name: str = "momentum"
  momentum: float = 0.9
  clip_norm: float = 0.0
  nesterov: bool = False
  weight_decay: float = 0.0
  ema_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Where examples come from, how they are batched and augmented.

  `train_data` / `eval_data` are TFRecord files, globs or directories of
  shards (`*.tfrecord*`), an image folder with one sub-folder per class, or a
  CSV file (glob) of numeric features with a label column.

  Attributes:
    label_key: the tf.Example key of the label: an int64 class id, or a
      string class name (e.g. `image/class/text`) looked up in the label map.
    on_bad_record: `skip` (count, log and skip corrupt records or images) or
      `fail` (stop at the first one, naming its file).
    cache: empty (off), `memory`, or a file path prefix: decoded examples are
      kept after the first pass.
    random_flip .. mixup_alpha: training-only augmentation (see
      `data/augment.py`); evaluation and export never augment.
    csv_label_column: the label column of CSV data.
    cache_features: feature-cache mode (`feature_cache.py`): a directory
      where a frozen backbone's features of the training and evaluation
      images are computed once and reused; the head trains on them. Empty:
      off.
    cache_features_with_augmentation: with `cache_features`, cache this many
      augmented copies of each training image (the augmentation flags apply);
      0 caches un-augmented features only.
  """
  train_data: str = ""
  eval_data: str = ""
  batch_size: int = 32
  eval_batch_size: int = 0
  shuffle_buffer: int = 2048
  image_key: str = "image/encoded"
  label_key: str = "image/class/label"
  num_parallel_calls: int = -1  # -1: tf.data.AUTOTUNE
  on_bad_record: str = "skip"
  cache: str = ""
  random_flip: str = "none"
  random_crop: bool = False
  crop_min_area: float = 0.25
  rotation_degrees: float = 0.0
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  mixup_alpha: float = 0.0
  csv_label_column: str = "label"
  cache_features: str = ""
  cache_features_with_augmentation: int = 0
  prefetch: int = -1  # batches prefetched after the pipeline; -1: tf.data.AUTOTUNE, 0: none

  def augments(self) -> bool:
    """True when any per-example augmentation is switched on (mixup excluded)."""
    return (self.random_flip != "none" or self.random_crop or
            self.rotation_degrees > 0 or self.brightness > 0 or
            self.contrast > 0 or self.saturation > 0)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The training loop: where checkpoints go and when it stops."""
  model_dir: str = ""
  max_steps: int = 1000
  save_checkpoints_steps: int = 200
  keep_checkpoint_max: int = 5
  log_every_steps: int = 100
  eval_steps: int = 0  # 0: the whole eval set
  seed: Optional[int] = None
  intra_op_threads: int = 0
  inter_op_threads: int = 0
  # Performance knobs (numbers: scripts/benchmark.py). xla: compile the
  # training step with XLA (jit_scope; also on CPU). mixed_precision: the
  # Keras dtype policy of the backbone (float32, mixed_float16 with dynamic
  # loss scaling, mixed_bfloat16); variables stay float32, so checkpoints are
  # the same either way.
  xla: bool = False
  mixed_precision: str = "float32"


# --mixed_precision values: Keras dtype policies.
MIXED_PRECISION_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")

# --serving_inputs values -> the signatures they add (see export.py).
SERVING_INPUTS = ("image_bytes", "tf_example", "image_tensor")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """SavedModel exports for TF Serving.

  Attributes:
    export_dir: TF Serving model base path; versions are `<export_dir>/<n>`.
    exports_to_keep: newest versions kept per export directory.
    serving_inputs: receivers to export, the first is `serving_default`:
      `image_bytes` (signature `predict`), `tf_example` (`classify`, or
      `regress` for single-output regression heads), `image_tensor`
      (`predict_images`). Empty: all three, without tf_example for a head
      that cannot serve it.
    export_features: also output the backbone features.
    best_metric: eval metric that decides the best export.
    best_metric_mode: `max`, `min`, or `auto` (min for losses and errors:
      names containing loss, error, mse or mae; else max).
    serving_warmup: eval records written as TF Serving warmup requests; 0 for
      no warmup file.
  """
  export_dir: str = ""
  exports_to_keep: int = 5
  serving_inputs: Tuple[str, ...] = ()
  export_features: bool = False
  best_metric: str = "accuracy"
  best_metric_mode: str = "auto"
  serving_warmup: int = 0


@dataclasses.dataclass(frozen=True)
class ContinualConfig:
  """Continued training: start from another model, replay old data.

  Attributes:
    warm_start_from: a checkpoint prefix, a model_dir, or an exported
      SavedModel (version dir or TF Serving base dir) whose variables
      initialise a fresh run (backbone, head, BatchNorm statistics, EMA; not
      the optimizer state or global step). Ignored when model_dir already
      holds a checkpoint (the run resumes instead).
    keep_old_classes: with `warm_start_from` a model that knows its class
      names: the new model's classes are the old ones followed by the data's
      new ones (merged by name) and the old head rows are kept; False: the
      data's classes only (rows of classes still present are still copied).
    replay_data: old training data mixed into every batch (same forms as
      `train_data`); labels are mapped into the model's classes by name.
    replay_ratio: expected fraction of each batch drawn from `replay_data`.
  """
  warm_start_from: str = ""
  keep_old_classes: bool = True
  replay_data: str = ""
  replay_ratio: float = 0.5




@dataclasses.dataclass(frozen=True)
class GuardConfig:
  """Interleaved evaluation during et-train and the guards that use it.

  Attributes:
    eval_every_steps: evaluate `input.eval_data` every this many steps while
      training; 0 uses `run.save_checkpoints_steps` when a metric is set.
    early_stopping_metric: the eval metric watched (e.g. accuracy, loss); the
      best checkpoint by it is kept in `model_dir/best/`.
    metric_mode: `max`, `min`, or `auto` (min for names with loss/error).
    patience: stop after this many evaluations without an improvement of
      more than `min_delta`; 0 never stops early.
    min_delta: smallest change that counts as an improvement.
    regression_tolerance: when the metric is worse than the best by more than
      this, restore the best checkpoint's weights and optimizer state and
      continue (the global step continues); None: off.
    regression_lr_factor: multiply the learning rate by this at each such
      restore (1: unchanged).
  """
  eval_every_steps: int = 0
  early_stopping_metric: str = ""
  metric_mode: str = "auto"
  patience: int = 0
  min_delta: float = 0.0
  regression_tolerance: Optional[float] = None
  regression_lr_factor: float = 1.0


DISTRIBUTIONS = ("none", "mirrored", "multi_worker_mirrored", "parameter_server")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  """Batch cluster jobs (TF_CONFIG) and where TensorBoard looks (see `cluster`).

  Attributes:
    distribution: how trainers cooperate: `none` (local, or asynchronous
      parameter servers with TF_CONFIG), `mirrored`, `multi_worker_mirrored`,
      `parameter_server`.
    eval_throttle_secs: the evaluator task (and a local train_and_evaluate)
      evaluates a new checkpoint at most this often.
    summary_dir: also write training and evaluation scalars here (Vertex AI
      TensorBoard: AIP_TENSORBOARD_LOG_DIR); empty: model_dir only.
    wait_for_workers_secs: the chief holds its first step until every worker
      has joined, at most this long; 0: start at once (Estimator's way).
  """
  distribution: str = "none"
  eval_throttle_secs: int = 60
  summary_dir: str = ""
  wait_for_workers_secs: int = 0


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything one train / evaluate / export run needs."""
  backbone: BackboneConfig = BackboneConfig()
  head: HeadConfig = HeadConfig()
  freeze: FreezeConfig = FreezeConfig()
  schedule: ScheduleConfig = ScheduleConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  input: InputConfig = InputConfig()
  run: RunConfig = RunConfig()
  export: ExportConfig = ExportConfig()
  continual: ContinualConfig = ContinualConfig()
  guards: GuardConfig = GuardConfig()
  cluster: ClusterConfig = ClusterConfig()

  def validate(self) -> "ExperimentConfig":
    """Checks the whole config; returns it unchanged.

    Raises:
      ConfigError: the first problem found, as one sentence with the fix.
    """
    _validate(self)
    return self

  def replace(self, **sections) -> "ExperimentConfig":
    """Returns a copy with whole sections or `section__field=value` replaced."""
    updates = {}
    for key, value in sections.items():
      if "__" in key:
        section, field = key.split("__", 1)
        base = updates.get(section, getattr(self, section))
        updates[section] = dataclasses.replace(base, **{field: value})
      else:
        updates[key] = value
    return dataclasses.replace(self, **updates)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, data: dict) -> "ExperimentConfig":
    sections = {}
    for field in dataclasses.fields(cls):
      section_cls = field.type if isinstance(field.type, type) else type(field.default)
      raw = dict(data.get(field.name, {}))
      known = {f.name: f for f in dataclasses.fields(section_cls)}
      unknown = sorted(set(raw) - set(known))
      if unknown:
        raise ConfigError(
            f"config section '{field.name}' has unknown keys {unknown}; "
            "remove them or upgrade estimator-transfer.")
      for name, value in raw.items():
        if isinstance(value, list):
          raw[name] = tuple(value)
      sections[field.name] = section_cls(**raw)
    return cls(**sections)

  @classmethod
  def from_json(cls, text: str) -> "ExperimentConfig":
    return cls.from_dict(json.loads(text))


_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop")
_HEAD_KINDS = ("classification", "regression")


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _validate(cfg: ExperimentConfig) -> None:
  b, h, s, o, i, r = (cfg.backbone, cfg.head, cfg.schedule, cfg.optimizer,
                      cfg.input, cfg.run)
  _require(bool(b.handle), "--backbone is required: give a keras application "
           "name (e.g. mobilenet_v2), a TF-Hub handle or a Keras model file.")
  _require(b.image_size >= 0 and (b.image_size == 0 or b.image_size >= 8),
           f"--image_size={b.image_size} is invalid; use a size of at least 8 "
           "pixels, or 0 to take it from the backbone.")
  _require(h.kind in _HEAD_KINDS,
           f"--head={h.kind} is not supported; choose classification or regression.")
  _require(h.num_outputs >= 1, f"--num_outputs must be at least 1, got {h.num_outputs}.")
  _require(not (h.multi_label and h.kind == "regression"),
           "--multi_label applies to classification heads; drop it or --head=regression.")
  _require(h.num_classes >= 2 or h.num_classes == 0 or
           (h.multi_label and h.num_classes == 1),
           f"the head needs at least 2 classes, got {h.num_classes}; check "
           "--num_classes or the label map of your data.")
  _require(not h.class_names or len(h.class_names) == h.num_classes,
           f"{len(h.class_names)} class names were given for "
           f"{h.num_classes} classes; make --num_classes match the label map.")
  _require(all(u > 0 for u in h.hidden_units),
           f"--head_hidden_units must be positive integers, got {list(h.hidden_units)}.")
  _require(0.0 <= h.dropout_rate < 1.0,
           f"--dropout_rate={h.dropout_rate} must be in [0, 1).")
  _require(0.0 <= h.label_smoothing < 1.0,
           f"--label_smoothing={h.label_smoothing} must be in [0, 1).")
  _require(len(s.values) == len(s.boundaries) + 1,
           f"--lr_values needs exactly one more value than --lr_boundaries "
           f"(got {len(s.values)} values for {len(s.boundaries)} boundaries).")
  _require(all(v >= 0 for v in s.values),
           f"--lr_values must not be negative, got {list(s.values)}.")
  _require(s.train_size >= 0, "--train_size must not be negative (0: count the data).")
  _require(0.0 <= o.weight_decay, "--weight_decay must not be negative.")
  _require(0.0 <= o.ema_decay < 1.0,
           f"--ema_decay={o.ema_decay} must be in [0, 1), e.g. 0.999 (0: off).")
  specs.check_boundaries(s.boundaries)
  specs.parse_multipliers(s.lr_multipliers)
  _require(s.warmup_steps >= 0, "--warmup_steps must not be negative.")
  _require(o.name in _OPTIMIZERS,
           f"--optimizer={o.name} is not supported; choose one of "
           f"{', '.join(_OPTIMIZERS)}.")
  _require(o.clip_norm >= 0, "--clip_norm must not be negative.")
  _require(i.batch_size > 0, f"--batch_size must be positive, got {i.batch_size}.")
  _require(i.eval_batch_size >= 0, "--eval_batch_size must not be negative.")
  _require(i.on_bad_record in ("skip", "fail"),
           f"--on_bad_record={i.on_bad_record} is invalid; use skip or fail.")
  _require(i.shuffle_buffer >= 0, "--shuffle_buffer must not be negative.")
  _validate_augmentation(i)
  _require(r.max_steps > 0, f"--max_steps must be positive, got {r.max_steps}.")
  _require(r.save_checkpoints_steps > 0, "--save_checkpoints_steps must be positive.")
  _require(r.keep_checkpoint_max > 0, "--keep_checkpoint_max must be positive.")
  _require(r.log_every_steps > 0, "--log_every_steps must be positive.")
  _require(r.eval_steps >= 0, "--eval_steps must not be negative (0: whole eval set).")
  _require(r.mixed_precision in MIXED_PRECISION_POLICIES,
           f"--mixed_precision={r.mixed_precision} is not supported; choose one of "
           f"{', '.join(MIXED_PRECISION_POLICIES)}.")
  _require(i.prefetch >= -1, f"--prefetch={i.prefetch} is invalid; give a number of "
           "batches, 0 for none or -1 for tf.data.AUTOTUNE.")
  _require(cfg.export.exports_to_keep > 0, "--exports_to_keep must be positive.")
  _validate_export(cfg.export, h)
  _require(cfg.cluster.distribution in DISTRIBUTIONS,
           f"--distribution={cfg.cluster.distribution} is not supported; choose one of "
           f"{', '.join(DISTRIBUTIONS)}.")
  _require(cfg.cluster.eval_throttle_secs >= 0,
           "--eval_throttle_secs must not be negative.")
  _require(cfg.cluster.wait_for_workers_secs >= 0,
           "--wait_for_workers_secs must not be negative.")
  _validate_continual(cfg.continual, cfg.guards)
  specs.parse_spec(cfg.freeze.spec)
  specs.parse_schedule(cfg.freeze.unfreeze_schedule)
  _require(not b.value_range or b.value_range in specs.VALUE_RANGES,
           f"--backbone_value_range={b.value_range} is not one of "
           f"{', '.join(specs.VALUE_RANGES)}.")
  specs.parse_class_weights(h.class_weights, h.num_classes)
  _validate_feature_cache(cfg)


def _validate_feature_cache(cfg: ExperimentConfig) -> None:
  i, f = cfg.input, cfg.freeze
  copies = i.cache_features_with_augmentation
  _require(copies >= 0, f"--cache_features_with_augmentation={copies} must not be "
           "negative (0: cache un-augmented features only).")
  if not i.cache_features:
    _require(not copies, "--cache_features_with_augmentation needs "
             "--cache_features=DIR, the directory of the feature cache.")
    return
  # Cached features are only valid while no backbone weight moves.
  _require(f.spec.strip() == "all" and not f.unfreeze_schedule,
           f"--cache_features needs a frozen backbone, but --freeze={f.spec}"
           f"{' with --unfreeze_schedule' if f.unfreeze_schedule else ''} trains part "
           "of it; use --freeze=all without --unfreeze_schedule, or drop --cache_features.")
  _require(not i.mixup_alpha, "--mixup_alpha mixes images before the backbone, which "
           "--cache_features skips; drop one of the two.")
  if copies:
    _require(i.augments(), f"--cache_features_with_augmentation={copies} "
             "caches augmented copies but no augmentation is on; set e.g. "
             "--random_flip=horizontal, or use 0.")
  else:
    _require(not i.augments(), "--cache_features caches features of "
             "un-augmented images but augmentation is on (--random_flip, --random_crop, "
             "--rotation_degrees, --brightness, --contrast or --saturation); drop it, or "
             "cache K augmented copies with --cache_features_with_augmentation=K.")


def _validate_continual(c: ContinualConfig, g: GuardConfig) -> None:
  _require(0.0 < c.replay_ratio < 1.0,
           f"--replay_ratio={c.replay_ratio} must be between 0 and 1 (exclusive): "
           "the expected share of replayed examples in each batch.")
  _require(g.eval_every_steps >= 0, "--eval_every_steps must not be negative.")
  _require(g.metric_mode in specs.METRIC_MODES,
           f"--metric_mode={g.metric_mode} is invalid; use {', '.join(specs.METRIC_MODES)}.")
  _require(g.patience >= 0, "--patience must not be negative (0: no early stopping).")
  _require(g.min_delta >= 0, "--min_delta must not be negative.")
  _require(g.regression_tolerance is None or g.regression_tolerance >= 0,
           "--regression_tolerance must not be negative.")
  _require(0.0 < g.regression_lr_factor <= 1.0,
           f"--regression_lr_factor={g.regression_lr_factor} must be in (0, 1].")
  _require(bool(g.early_stopping_metric) or
           (not g.patience and g.regression_tolerance is None),
           "--patience and --regression_tolerance watch an eval metric; set "
           "--early_stopping_metric (e.g. accuracy or loss).")


def _validate_export(e: ExportConfig, h: HeadConfig) -> None:
  unknown = [k for k in e.serving_inputs if k not in SERVING_INPUTS]
  _require(not unknown,
           f"--serving_inputs={','.join(e.serving_inputs)} is invalid; list one or "
           f"more of {', '.join(SERVING_INPUTS)} (the first is serving_default).")
  _require(len(set(e.serving_inputs)) == len(e.serving_inputs),
           f"--serving_inputs={','.join(e.serving_inputs)} names an input twice; "
           "list each once.")
  _require("tf_example" not in e.serving_inputs or h.kind != "regression" or
           h.num_outputs == 1,
           f"--serving_inputs=tf_example serves TF Serving's regress, which takes one "
           f"value per example, but the head has {h.num_outputs} outputs; drop "
           "tf_example from --serving_inputs.")
  _require(bool(e.best_metric.strip()), "--best_metric must name an eval metric, "
           "e.g. accuracy or loss.")
  _require(e.best_metric_mode in specs.METRIC_MODES,
           f"--best_metric_mode={e.best_metric_mode} is invalid; use "
           f"{', '.join(specs.METRIC_MODES)}.")
  _require(0 <= e.serving_warmup <= 1000,
           f"--serving_warmup={e.serving_warmup} must be between 0 (no warmup "
           "file) and 1000 (TF Serving's limit).")


def save(cfg: ExperimentConfig, model_dir: str) -> str:
  """Writes the config as JSON into `model_dir` atomically; returns the path."""
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, CONFIG_FILENAME)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(cfg.to_json())
  os.replace(tmp, path)
  return path


def load(model_dir: str) -> Optional[ExperimentConfig]:
  """Reads the config saved in `model_dir`, or None when there is none."""
  path = os.path.join(model_dir, CONFIG_FILENAME)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return ExperimentConfig.from_json(f.read())
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{path} is not a valid estimator-transfer config ({e}); "
                      "restore it or start a new --model_dir.") from e


def _validate_augmentation(config: "InputConfig") -> None:
  """Checks the augmentation settings.

  Raises:
    ConfigError: one sentence naming the flag and the valid range.
  """
  checks = [
      (config.random_flip in specs.FLIP_MODES,
       f"--random_flip={config.random_flip} is invalid; use one of "
       f"{', '.join(specs.FLIP_MODES)}."),
      (0.0 < config.crop_min_area <= 1.0,
       f"--crop_min_area={config.crop_min_area} must be in (0, 1], the smallest "
       "share of the image a random crop keeps (e.g. 0.25)."),
      (0.0 <= config.rotation_degrees <= 180.0,
       f"--rotation_degrees={config.rotation_degrees} must be in [0, 180]."),
      (0.0 <= config.brightness <= 1.0,
       f"--brightness={config.brightness} must be in [0, 1] (max added to pixels "
       "in [0, 1])."),
      (0.0 <= config.contrast < 1.0,
       f"--contrast={config.contrast} must be in [0, 1) (factor 1 +/- contrast)."),
      (0.0 <= config.saturation < 1.0,
       f"--saturation={config.saturation} must be in [0, 1) (factor 1 +/- "
       "saturation)."),
      (config.mixup_alpha >= 0.0,
       f"--mixup_alpha={config.mixup_alpha} must not be negative (0: off; "
       "0.2 is typical)."),
  ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)
