"""The config sections: frozen dataclasses, one `setting` per flag.

Each field is one setting: its flag name, help text and kind sit on the
field (see `settings.setting`), and `estimator_transfer.cli` generates the
flags and the README's flag reference from them. The first docstring line of
a section is its one-line summary in that reference.
"""
import dataclasses
from typing import Optional, Tuple

from estimator_transfer.config.settings import setting

# --mixed_precision values: Keras dtype policies.
MIXED_PRECISION_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")

# --serving_inputs values -> the signatures they add (see serving/signatures.py).
SERVING_INPUTS = ("image_bytes", "tf_example", "image_tensor")

DISTRIBUTIONS = ("none", "mirrored", "multi_worker_mirrored", "parameter_server")


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """The pretrained feature extractor: where it comes from and what it expects."""
  handle: str = setting(
      "", "backbone", "Keras application name (mobilenet_v2, resnet50, "
      "mobilenet_v2(alpha=0.35), ...), TF-Hub handle (URL or local dir; prefix hub: "
      "to force), or Keras model file/dir (prefix keras: to force).")
  weights: str = setting(
      "", "backbone_weights", "Keras backbones: local weights file (.h5), 'none' for "
      "random init, empty for the model file's own weights.")
  output_layer: str = setting(
      "", "backbone_output_layer", "Keras model backbones: cut the model at this layer.")
  image_size: int = setting(
      0, "image_size", "Input size in pixels; 0 takes it from the backbone.")
  value_range: str = setting(
      "", "backbone_value_range", "Pixel range the backbone expects: zero_one, "
      "minus_one_one, zero_255, caffe or torch; empty takes the backbone's own (Keras "
      "applications know theirs; Hub and Keras models: zero_one).")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """The new head put on the backbone features, and its loss."""
  num_classes: int = setting(
      0, "num_classes", "Number of classes; 0 takes it from the label map.")
  # Not a flag: the label map / data decide it (cli.flags fills it in).
  class_names: Tuple[str, ...] = ()
  hidden_units: Tuple[int, ...] = setting(
      (), "head_hidden_units", "Hidden ReLU layer sizes of the head, e.g. 256,128.",
      kind="ints")
  dropout_rate: float = setting(
      0.0, "dropout_rate", "Dropout before the head's dense layers.")
  label_smoothing: float = setting(
      0.0, "label_smoothing", "Label smoothing of the cross-entropy loss.")
  kind: str = setting(
      "classification", "head", "classification (softmax; sigmoid with "
      "--multi_label) or regression (--num_outputs linear outputs).")
  multi_label: bool = setting(
      False, "multi_label", "Independent sigmoid per class; labels are multi-hot.")
  class_weights: str = setting(
      "", "class_weights", "Loss weight per class, e.g. 1,1,4, or 'balanced' "
      "(n / (k * n_c) counted on --train_data).")
  num_outputs: int = setting(1, "num_outputs", "Regression outputs per example.")


@dataclasses.dataclass(frozen=True)
class FreezeConfig:
  """Which backbone layers stay frozen, and when they thaw (spec forms: specs.py)."""
  spec: str = setting(
      "all", "freeze", "Frozen backbone layers: all, none, first:N (freeze the first "
      "N weighted layers), last:N (train only the last N), until:<layer> (freeze up "
      "to and including it), regex:<pattern> (freeze matching layers/variables).")
  # From each STEP on, SPEC replaces `spec`; empty: `spec` for the whole run.
  unfreeze_schedule: str = setting(
      "", "unfreeze_schedule", "Gradual unfreezing STEP:SPEC,..., e.g. "
      "0:all,500:last:20,1500:none (STEP may be epochs, 2e); SPEC as in --freeze.")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Piecewise-constant learning rate on the global step.

  `values[i]` applies from step `boundaries[i-1]` (inclusive) up to step
  `boundaries[i]` (exclusive); optional linear warmup over the first
  `warmup_steps` steps ramps from 0 to `values[0]`.
  """
  # Steps, or "<epochs>e" strings such as "30e".
  boundaries: Tuple[int, ...] = setting(
      (), "lr_boundaries", "Global steps at which the learning rate changes, e.g. "
      "500,800, or epochs with an e suffix, e.g. 30e,60e (see --train_size).",
      kind="boundaries")
  values: Tuple[float, ...] = setting(
      (0.01,), "lr_values", "Learning rates, one more than --lr_boundaries, e.g. "
      "0.1,0.01,0.001.", kind="floats")
  warmup_steps: int = setting(
      0, "warmup_steps", "Linear warmup steps at the start of training.")
  train_size: int = setting(
      0, "train_size", "Training examples per epoch, for epoch boundaries (30e); 0 "
      "counts --train_data.")
  lr_multipliers: str = setting(
      "", "lr_multipliers", "Discriminative learning rates REGEX=FACTOR,... on "
      "backbone/<var> and head/<var> names, e.g. backbone/=0.1 (first match wins).")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer and what is applied around it (clipping, decay, EMA)."""
  name: str = setting(
      "momentum", "optimizer", "sgd, momentum, nesterov, adam, adamw or rmsprop.")
  momentum: float = setting(
      0.9, "momentum", "Momentum (momentum, nesterov, rmsprop).")
  clip_norm: float = setting(
      0.0, "clip_norm", "Clip gradients to this global norm; 0 for no clipping.")
  nesterov: bool = setting(
      False, "nesterov", "Nesterov momentum for --optimizer=momentum.")
  # An L2 term weight_decay/2 * |w|^2 in the loss, or w -= lr * wd * w (adamw).
  weight_decay: float = setting(
      0.0, "weight_decay", "Weight decay on trainable kernels only (not biases, not "
      "BatchNorm); decoupled for adamw, an L2 loss term otherwise.")
  # Training continues on the raw weights.
  ema_decay: float = setting(
      0.0, "ema_decay", "Exponential moving average of the trained weights (e.g. "
      "0.999); evaluation and export use the averages. 0: off.")


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Where examples come from, how they are read, batched, cached and augmented.

  `train_data` / `eval_data` are TFRecord files, globs or directories of
  shards (`*.tfrecord*`), an image folder with one sub-folder per class, or a
  CSV file (glob) of numeric features with a label column. Augmentation is
  training-only: evaluation and the export see the plain decoded image.
  """
  train_data: str = setting(
      "", "train_data", "Training data: TFRecord file, glob or directory of shards, "
      "or an image folder with one sub-folder per class.")
  eval_data: str = setting(
      "", "eval_data", "Evaluation data, same forms as --train_data.")
  batch_size: int = setting(32, "batch_size", "Training batch size.")
  eval_batch_size: int = setting(
      0, "eval_batch_size", "Evaluation batch size; 0 uses --batch_size.")
  shuffle_buffer: int = setting(
      2048, "shuffle_buffer", "Training: records shuffled together (split over the "
      "files read at once; files are shuffled every epoch too); 0: no record shuffle.")
  image_key: str = setting(
      "image/encoded", "image_key", "tf.Example key of the encoded image bytes.")
  # An int64 class id, or a string class name (e.g. image/class/text) looked
  # up in the label map.
  label_key: str = setting(
      "image/class/label", "label_key", "tf.Example key of the int64 class id.")
  # slim's build_image_data.py writes labels 1..N (0 is its background class).
  label_offset: int = setting(
      0, "label_offset", "Subtracted from every int64 TFRecord label: 1 for TFRecords "
      "written by slim's build_image_data.py (labels 1..N, 0 reserved for background; "
      "labels.txt then names class 1 on its first line); 0: labels start at 0.")
  # Not a flag: -1 is tf.data.AUTOTUNE.
  num_parallel_calls: int = -1
  on_bad_record: str = setting(
      "skip", "on_bad_record", "A record or image file that cannot be read or "
      "decoded: skip it (counted as bad_records in the log and eval results) or "
      "fail naming its file.", kind="enum", choices=("skip", "fail"))
  cache: str = setting(
      "auto", "cache", "Keep decoded training examples after the first pass: 'auto' "
      "(in memory when the decoded training set fits --cache_budget_mb; said in the "
      "start banner), 'memory', a file path prefix, or 'off'. Augmentation still draws "
      "anew every epoch.", deprecated_flags=("cache_dataset",))
  cache_budget_mb: int = setting(
      0, "cache_budget_mb", "--cache=auto: the most memory the decoded training set "
      "may take (examples x size x size x 3 float32); 0: a quarter of this machine's "
      "memory.")
  random_flip: str = setting(
      "none", "random_flip", "Random flips: none, horizontal, vertical or both.")
  random_crop: bool = setting(
      False, "random_crop", "Random resized crop (area >= --crop_min_area, aspect "
      "3/4..4/3), scaled back to the input size.")
  crop_min_area: float = setting(
      0.25, "crop_min_area", "Smallest share of the image a random crop keeps.")
  rotation_degrees: float = setting(
      0.0, "rotation_degrees", "Random rotation up to +/- this many degrees; 0: off.")
  brightness: float = setting(
      0.0, "brightness", "Random brightness change up to +/- this (pixels in "
      "[0, 1]); 0: off.")
  contrast: float = setting(
      0.0, "contrast", "Random contrast factor in 1 +/- this; 0: off.")
  saturation: float = setting(
      0.0, "saturation", "Random saturation factor in 1 +/- this; 0: off.")
  mixup_alpha: float = setting(
      0.0, "mixup_alpha", "Mixup with Beta(alpha, alpha) weights (0.2 is typical); "
      "0: off.")
  csv_label_column: str = setting(
      "label", "csv_label_column", "CSV data: the label column (class id or class "
      "name).")
  # Feature-cache mode (feature_cache/): a frozen backbone runs once.
  cache_features: str = setting(
      "", "cache_features", "With --freeze=all: compute the backbone features of "
      "--train_data/--eval_data once into this directory (keyed by the backbone's "
      "content, image size and the input files) and train the head on them; later "
      "runs reuse them. With a partial freeze of a Keras backbone (--freeze=last:N, "
      "until:LAYER, or an unfreeze schedule whose lower part stays frozen): the frozen "
      "lower part's output is cached and only the layers above it and the head train. "
      "Exports still take images.")
  cache_features_with_augmentation: int = setting(
      0, "cache_features_with_augmentation", "With --cache_features: cache this many "
      "augmented copies of each training image (the augmentation flags apply; K times "
      "the extraction time and disk, and only K variants per image); 0: un-augmented "
      "features, and augmentation flags are an error.")
  prefetch: int = setting(
      -1, "prefetch", "Batches the input pipeline prepares ahead of the training "
      "step; -1: tf.data.AUTOTUNE, 0: none.")

  def augments(self) -> bool:
    """True when any per-example augmentation is switched on (mixup excluded)."""
    return (self.random_flip != "none" or self.random_crop or
            self.rotation_degrees > 0 or self.brightness > 0 or
            self.contrast > 0 or self.saturation > 0)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The training loop: where checkpoints go, when it stops, how fast it runs."""
  model_dir: str = setting(
      "", "model_dir", "Directory for checkpoints, the saved config and eval results.",
      flag_default=None)
  max_steps: int = setting(
      1000, "max_steps", "Train until this global step (a re-run resumes and stops "
      "here too).")
  save_checkpoints_steps: int = setting(
      200, "save_checkpoints_steps", "Checkpoint every this many steps.")
  keep_checkpoint_max: int = setting(5, "keep_checkpoint_max", "Checkpoints to keep.")
  log_every_steps: int = setting(
      100, "log_every_steps", "Progress line and summaries every this many steps.")
  eval_steps: int = setting(
      0, "eval_steps", "Evaluation batches; 0 for the whole eval set.")
  seed: Optional[int] = setting(
      None, "seed", "Random seed of everything random (backbone and head init, data "
      "order, augmentation, dropout, mixup, replay); turns on TF op determinism: the same "
      "flags on the same machine (CPU) give bit-identical checkpoints.", kind="integer")
  intra_op_threads: int = setting(
      0, "intra_op_threads", "TF intra-op threads; 0 lets TensorFlow choose.")
  inter_op_threads: int = setting(
      0, "inter_op_threads", "TF inter-op threads; 0 lets TensorFlow choose.")
  # Performance knobs (numbers: scripts/benchmark.py). Variables stay float32
  # under every policy, so checkpoints are the same either way.
  xla: bool = setting(
      False, "xla", "Compile the training step with XLA (for GPUs; the first step "
      "pays the compilation). It works on CPU, but XLA's CPU convolutions measured "
      "~10x slower than the default kernels (scripts/benchmark.py --only=knobs).")
  mixed_precision: str = setting(
      "float32", "mixed_precision", "Keras dtype policy of the backbone: float32, "
      "mixed_float16 (GPUs; dynamic loss scaling) or mixed_bfloat16 (TPUs, recent "
      "GPUs). Both run on CPUs, correctly but not faster (bfloat16 measured slower on "
      "an AVX512_BF16 CPU: scripts/benchmark.py --only=knobs). Variables and "
      "checkpoints stay float32; Keras backbones only.", kind="enum",
      choices=MIXED_PRECISION_POLICIES)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """SavedModel exports for TF Serving: where, which signatures, which model is best."""
  export_dir: str = setting(
      "", "export_dir", "Base directory for SavedModel exports (TF Serving layout: "
      "<export_dir>/<version>; point TF Serving's --model_base_path here). et-train "
      "with --eval_data publishes here only a model that beats those published before "
      "(--best_metric); see --export_latest.")
  exports_to_keep: int = setting(
      5, "exports_to_keep", "Newest export versions to keep under --export_dir.")
  serving_inputs: Tuple[str, ...] = setting(
      (), "serving_inputs", "Signatures to export, by input; the first is also "
      "serving_default; empty: all that the head supports. image_bytes: 'predict', "
      "encoded JPEG/PNG of any size (REST {\"b64\": ...}); tf_example: 'classify' (or "
      "'regress'), serialized tf.Example with the image under --image_key; "
      "image_tensor: 'predict_images', float32 RGB [n, size, size, 3] in [0, 1].",
      kind="strings")
  export_features: bool = setting(
      False, "export_features", "Also output the backbone features ('features') from "
      "the predict signatures.")
  # Compared in the direction of --metric_mode (GuardConfig.metric_mode).
  best_metric: str = setting(
      "accuracy", "best_metric", "et-train: eval metric that picks the best export; "
      "--export_dir only receives a model that beats every one published there before.")
  serving_warmup: int = setting(
      0, "serving_warmup", "Write this many --eval_data records as TF Serving warmup "
      "requests (assets.extra/tf_serving_warmup_requests); 0: none. Needs "
      "tensorflow-serving-api.")
  # Off by default: each one is a full SavedModel write per evaluation.
  export_latest: bool = setting(
      False, "export_latest", "et-train with --export_dir and --eval_data: also export "
      "every evaluated checkpoint (while training and the final one) to "
      "<model_dir>/export/latest.")


@dataclasses.dataclass(frozen=True)
class ContinualConfig:
  """Continued training: start from another model, keep its classes, replay old data."""
  # Not the optimizer state or global step; ignored when model_dir already
  # holds a checkpoint (the run resumes instead).
  warm_start_from: str = setting(
      "", "warm_start_from", "Start a new run from this checkpoint, model_dir or "
      "exported SavedModel: backbone, head, BatchNorm statistics and EMA (variables "
      "whose shape changed are skipped and logged). Ignored on resume.")
  # Source name OLD_PREFIX... is read as NEW_PREFIX... (training/warm_start.py).
  warm_start_map: str = setting(
      "", "warm_start_map", "With --warm_start_from a checkpoint whose variable names "
      "differ (another framework's or codebase's run): OLD_PREFIX=NEW_PREFIX,... reads "
      "each source variable named OLD_PREFIX<rest> as NEW_PREFIX<rest> (first matching "
      "pair wins; either side may be empty), e.g. resnet/block1/=conv1/; warm_start.json "
      "and the log list what matched, what was skipped and why.")
  # False: the data's classes only (rows of classes still present are copied).
  keep_old_classes: bool = setting(
      True, "keep_old_classes", "With --warm_start_from a model that knows its "
      "classes: keep them (and their head rows) and append the data's new classes, "
      "merged by name.")
  replay_data: str = setting(
      "", "replay_data", "Old training data mixed into every batch (same forms as "
      "--train_data), against forgetting; labels are matched to the model's classes "
      "by name.")
  replay_ratio: float = setting(
      0.5, "replay_ratio", "Expected share of --replay_data examples in each training "
      "batch.")


@dataclasses.dataclass(frozen=True)
class GuardConfig:
  """Evaluation while training and what uses it: early stopping, restore-best, best export."""
  eval_every_steps: int = setting(
      0, "eval_every_steps", "Evaluate --eval_data every this many steps while "
      "training; 0 uses --save_checkpoints_steps when --early_stopping_metric is set.")
  early_stopping_metric: str = setting(
      "", "early_stopping_metric", "Eval metric watched while training (e.g. "
      "accuracy, loss): the best checkpoint is kept in model_dir/best; see --patience "
      "and --regression_tolerance.")
  # One mode for every watched metric (early stopping, restore-best and the
  # best export); `auto` resolves per metric name (specs.metric_mode).
  metric_mode: str = setting(
      "auto", "metric_mode", "How --early_stopping_metric and --best_metric compare: "
      "max, min, or auto (per metric: min for losses and errors, names with loss, "
      "error, mse, mae; else max).", deprecated_flags=("best_metric_mode",))
  patience: int = setting(
      0, "patience", "Stop after this many evaluations without improvement; 0 never "
      "stops early.")
  min_delta: float = setting(
      0.0, "min_delta", "Smallest change of the metric that counts as an improvement.")
  # Restoring continues the global step.
  regression_tolerance: Optional[float] = setting(
      None, "regression_tolerance", "When the metric is worse than the best by more "
      "than this, continue from the best checkpoint's weights and optimizer state; "
      "unset: off.", kind="float")
  regression_lr_factor: float = setting(
      1.0, "regression_lr_factor", "Multiply the learning rate by this at each "
      "restore of the best checkpoint (1: unchanged).")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  """Batch cluster jobs (TF_CONFIG roles, strategies) and where TensorBoard looks."""
  distribution: str = setting(
      "none", "distribution", "none: one device, or with TF_CONFIG asynchronous "
      "training on ps tasks; mirrored: this machine's GPUs in sync; "
      "multi_worker_mirrored: sync all-reduce over chief + workers; parameter_server: "
      "ParameterServerStrategy.", kind="enum", choices=DISTRIBUTIONS)
  # A local train_and_evaluate throttles the same way.
  eval_throttle_secs: int = setting(
      60, "eval_throttle_secs", "With TF_CONFIG: the evaluator task evaluates a new "
      "checkpoint at most this often (seconds).")
  summary_dir: str = setting(
      "", "summary_dir", "Also write training and eval scalars here for TensorBoard "
      "(default on Vertex AI: AIP_TENSORBOARD_LOG_DIR); empty: model_dir only.")
  wait_for_workers_secs: int = setting(
      0, "wait_for_workers_secs", "With TF_CONFIG: the chief holds its first step "
      "until every worker has joined, at most this long; 0: start at once.")


@dataclasses.dataclass(frozen=True)
class RetrainConfig:
  """et-retrain only: rounds over a growing --train_data folder (not saved in config.json)."""
  min_new_examples: int = setting(
      64, "min_new_examples", "et-retrain: start a round once this many examples in "
      "complete new shards are waiting.")
  round_every_secs: float = setting(
      0.0, "round_every_secs", "et-retrain: also start a round with fewer new examples "
      "once this many seconds passed since the last round (or the start); 0: off.")
  epochs_per_round: float = setting(
      2.0, "epochs_per_round", "et-retrain: passes over the round's new examples; the "
      "round's steps follow from it (replay examples come on top, --replay_ratio).")
  max_regression: float = setting(
      0.01, "max_regression", "et-retrain: publish the challenger unless its "
      "--best_metric on the champion's classes is worse than the champion's by more "
      "than this.")
  settle_secs: float = setting(
      5.0, "settle_secs", "et-retrain: a shard counts as complete once its size and "
      "mtime stayed unchanged this long (and all its records read back, CRCs checked).")
  poll_secs: float = setting(
      1.0, "poll_secs", "et-retrain: seconds between looks at the data folder.")
  max_rounds: int = setting(
      0, "max_rounds", "et-retrain: exit 0 once model_dir holds this many finished "
      "rounds; 0: run until stopped (SIGTERM).")
  exit_when_idle_secs: float = setting(
      0.0, "exit_when_idle_secs", "et-retrain: exit 0 after this many seconds without "
      "new complete data or a round to finish; 0: never.")
