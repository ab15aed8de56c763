"""Flag definitions and flags -> ExperimentConfig (the only absl.flags user).

Precedence: flags given on the command line or in a --flagfile, then the
config saved in --model_dir by an earlier run, then the defaults. So
`et-evaluate --model_dir=runs/x` and `et-export --model_dir=runs/x
--export_dir=exports/x` need nothing else.
"""
import dataclasses
from typing import Callable, Dict, Tuple

from absl import flags

from estimator_transfer import config as config_lib
from estimator_transfer.training import continual
from estimator_transfer.errors import ConfigError
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.data import labels as labels_lib

FLAGS = flags.FLAGS


def _ints(name):
  def convert(values):
    try:
      return tuple(int(v) for v in values)
    except ValueError:
      raise ConfigError(f"--{name}={','.join(values)} must be a comma-separated "
                        "list of integers.") from None
  return convert


def _floats(name):
  def convert(values):
    try:
      return tuple(float(v) for v in values)
    except ValueError:
      raise ConfigError(f"--{name}={','.join(values)} must be a comma-separated "
                        "list of numbers.") from None
  return convert


def _plain(value):
  return value


def _boundaries(values):
  """Steps stay ints; epoch boundaries such as 30e stay strings."""
  return tuple(int(v) if str(v).strip().isdigit() else str(v).strip() for v in values)


# flag name -> (config section, field, converter)
_FLAG_TO_CONFIG: Dict[str, Tuple[str, str, Callable]] = {
    "backbone": ("backbone", "handle", _plain),
    "backbone_weights": ("backbone", "weights", _plain),
    "backbone_output_layer": ("backbone", "output_layer", _plain),
    "image_size": ("backbone", "image_size", _plain),
    "num_classes": ("head", "num_classes", _plain),
    "head_hidden_units": ("head", "hidden_units", _ints("head_hidden_units")),
    "dropout_rate": ("head", "dropout_rate", _plain),
    "label_smoothing": ("head", "label_smoothing", _plain),
    "freeze": ("freeze", "spec", _plain),
    "lr_boundaries": ("schedule", "boundaries", _boundaries),
    "lr_values": ("schedule", "values", _floats("lr_values")),
    "warmup_steps": ("schedule", "warmup_steps", _plain),
    "optimizer": ("optimizer", "name", _plain),
    "momentum": ("optimizer", "momentum", _plain),
    "clip_norm": ("optimizer", "clip_norm", _plain),
    "train_data": ("input", "train_data", _plain),
    "eval_data": ("input", "eval_data", _plain),
    "batch_size": ("input", "batch_size", _plain),
    "eval_batch_size": ("input", "eval_batch_size", _plain),
    "shuffle_buffer": ("input", "shuffle_buffer", _plain),
    "image_key": ("input", "image_key", _plain),
    "label_key": ("input", "label_key", _plain),
    "model_dir": ("run", "model_dir", _plain),
    "max_steps": ("run", "max_steps", _plain),
    "save_checkpoints_steps": ("run", "save_checkpoints_steps", _plain),
    "keep_checkpoint_max": ("run", "keep_checkpoint_max", _plain),
    "log_every_steps": ("run", "log_every_steps", _plain),
    "eval_steps": ("run", "eval_steps", _plain),
    "seed": ("run", "seed", _plain),
    "intra_op_threads": ("run", "intra_op_threads", _plain),
    "inter_op_threads": ("run", "inter_op_threads", _plain),
    "export_dir": ("export", "export_dir", _plain),
    "exports_to_keep": ("export", "exports_to_keep", _plain),
    "serving_inputs": ("export", "serving_inputs", tuple),
    "export_features": ("export", "export_features", _plain),
    "best_metric": ("export", "best_metric", _plain),
    "best_metric_mode": ("export", "best_metric_mode", _plain),
    "serving_warmup": ("export", "serving_warmup", _plain),
    "warm_start_from": ("continual", "warm_start_from", _plain),
    "keep_old_classes": ("continual", "keep_old_classes", _plain),
    "replay_data": ("continual", "replay_data", _plain),
    "replay_ratio": ("continual", "replay_ratio", _plain),
    "eval_every_steps": ("guards", "eval_every_steps", _plain),
    "early_stopping_metric": ("guards", "early_stopping_metric", _plain),
    "metric_mode": ("guards", "metric_mode", _plain),
    "patience": ("guards", "patience", _plain),
    "min_delta": ("guards", "min_delta", _plain),
    "regression_tolerance": ("guards", "regression_tolerance", _plain),
    "regression_lr_factor": ("guards", "regression_lr_factor", _plain),
    # Transfer-learning core (backbones, freezing, schedules, optimizers, heads).
    "backbone_value_range": ("backbone", "value_range", _plain),
    "head": ("head", "kind", _plain),
    "multi_label": ("head", "multi_label", _plain),
    "class_weights": ("head", "class_weights", _plain),
    "num_outputs": ("head", "num_outputs", _plain),
    "unfreeze_schedule": ("freeze", "unfreeze_schedule", _plain),
    "train_size": ("schedule", "train_size", _plain),
    "lr_multipliers": ("schedule", "lr_multipliers", _plain),
    "nesterov": ("optimizer", "nesterov", _plain),
    "weight_decay": ("optimizer", "weight_decay", _plain),
    "ema_decay": ("optimizer", "ema_decay", _plain),
    # Cluster jobs (TF_CONFIG) and platform conventions.
    "distribution": ("cluster", "distribution", _plain),
    "eval_throttle_secs": ("cluster", "eval_throttle_secs", _plain),
    "summary_dir": ("cluster", "summary_dir", _plain),
    "wait_for_workers_secs": ("cluster", "wait_for_workers_secs", _plain),
    # Input pipeline: bad records, cache, augmentation (data/).
    "on_bad_record": ("input", "on_bad_record", _plain),
    "cache": ("input", "cache", _plain),
    "random_flip": ("input", "random_flip", _plain),
    "random_crop": ("input", "random_crop", _plain),
    "crop_min_area": ("input", "crop_min_area", _plain),
    "rotation_degrees": ("input", "rotation_degrees", _plain),
    "brightness": ("input", "brightness", _plain),
    "contrast": ("input", "contrast", _plain),
    "saturation": ("input", "saturation", _plain),
    "mixup_alpha": ("input", "mixup_alpha", _plain),
    "csv_label_column": ("input", "csv_label_column", _plain),
    # Feature-cache mode (feature_cache.py).
    "cache_features": ("input", "cache_features", _plain),
    "cache_features_with_augmentation": ("input", "cache_features_with_augmentation",
                                         _plain),
    # Performance knobs (measured by scripts/benchmark.py).
    "xla": ("run", "xla", _plain),
    "mixed_precision": ("run", "mixed_precision", _plain),
    "prefetch": ("input", "prefetch", _plain),
}


def define_flags() -> None:
  """Defines every flag of the et-* scripts (idempotent)."""
  if "backbone" in FLAGS:
    return
  d = ExperimentConfig()
  _define_location_flags(d)
  _define_model_flags(d)
  _define_schedule_flags(d)
  _define_loop_flags(d)
  _define_export_flags(d)
  _define_continual_flags(d)
  _define_transfer_flags(d)
  _define_cluster_flags(d)
  _define_pipeline_flags(d)
  _define_cache_flags(d)
  _define_performance_flags(d)


def _define_location_flags(d: ExperimentConfig) -> None:
  """Flags: where things are."""
  # Where things are.
  flags.DEFINE_string("model_dir", None, "Directory for checkpoints, the saved "
                      "config and eval results.")
  flags.DEFINE_string("train_data", d.input.train_data, "Training data: TFRecord "
                      "file, glob or directory of shards, or an image folder with "
                      "one sub-folder per class.")
  flags.DEFINE_string("eval_data", d.input.eval_data, "Evaluation data, same forms "
                      "as --train_data.")
  flags.DEFINE_string("label_map", "", "Text file with one class name per line "
                      "(line i is class i). Default: labels.txt next to the data, "
                      "or the class folder names.")
  flags.DEFINE_string("export_dir", d.export.export_dir, "Base directory for "
                      "SavedModel exports (TF Serving layout: <export_dir>/<version>; "
                      "point TF Serving's --model_base_path here). et-train with "
                      "--eval_data publishes here only a model that beats those "
                      "published before (--best_metric), and every evaluated "
                      "checkpoint to <model_dir>/export/latest.")


def _define_model_flags(d: ExperimentConfig) -> None:
  """Flags: backbone and head."""
  # Backbone and head.
  flags.DEFINE_string("backbone", d.backbone.handle, "Keras application name "
                      "(mobilenet_v2, resnet50, mobilenet_v2(alpha=0.35), ...), "
                      "TF-Hub handle (URL or local dir; prefix hub: to force), or "
                      "Keras model file/dir (prefix keras: to force).")
  flags.DEFINE_string("backbone_weights", d.backbone.weights, "Keras backbones: "
                      "local weights file (.h5), 'none' for random init, empty for "
                      "the model file's own weights.")
  flags.DEFINE_string("backbone_output_layer", d.backbone.output_layer, "Keras "
                      "model backbones: cut the model at this layer.")
  flags.DEFINE_integer("image_size", d.backbone.image_size, "Input size in pixels; "
                       "0 takes it from the backbone.")
  flags.DEFINE_integer("num_classes", d.head.num_classes, "Number of classes; 0 "
                       "takes it from the label map.")
  flags.DEFINE_list("head_hidden_units", list(d.head.hidden_units), "Hidden ReLU "
                    "layer sizes of the head, e.g. 256,128.")
  flags.DEFINE_float("dropout_rate", d.head.dropout_rate, "Dropout before the "
                     "head's dense layers.")
  flags.DEFINE_float("label_smoothing", d.head.label_smoothing, "Label smoothing "
                     "of the cross-entropy loss.")
  flags.DEFINE_string("freeze", d.freeze.spec, "Frozen backbone layers: all, none, "
                      "first:N (freeze the first N weighted layers), last:N (train "
                      "only the last N), until:<layer> (freeze up to and including "
                      "it), regex:<pattern> (freeze matching layers/variables).")


def _define_schedule_flags(d: ExperimentConfig) -> None:
  """Flags: schedule and optimizer."""
  # Schedule and optimizer.
  flags.DEFINE_list("lr_boundaries", list(map(str, d.schedule.boundaries)),
                    "Global steps at which the learning rate changes, e.g. 500,800, "
                    "or epochs with an e suffix, e.g. 30e,60e (see --train_size).")
  flags.DEFINE_list("lr_values", list(map(str, d.schedule.values)), "Learning "
                    "rates, one more than --lr_boundaries, e.g. 0.1,0.01,0.001.")
  flags.DEFINE_integer("warmup_steps", d.schedule.warmup_steps, "Linear warmup "
                       "steps at the start of training.")
  flags.DEFINE_string("optimizer", d.optimizer.name, "sgd, momentum, nesterov, "
                      "adam, adamw or rmsprop.")
  flags.DEFINE_float("momentum", d.optimizer.momentum, "Momentum (momentum, "
                     "nesterov, rmsprop).")
  flags.DEFINE_float("clip_norm", d.optimizer.clip_norm, "Clip gradients to this "
                     "global norm; 0 for no clipping.")


def _define_loop_flags(d: ExperimentConfig) -> None:
  """Flags: input and loop."""
  # Input and loop.
  flags.DEFINE_integer("batch_size", d.input.batch_size, "Training batch size.")
  flags.DEFINE_integer("eval_batch_size", d.input.eval_batch_size, "Evaluation "
                       "batch size; 0 uses --batch_size.")
  flags.DEFINE_integer("shuffle_buffer", d.input.shuffle_buffer, "Training: records "
                       "shuffled together (split over the files read at once; "
                       "files are shuffled every epoch too); 0: no record shuffle.")
  flags.DEFINE_string("image_key", d.input.image_key, "tf.Example key of the "
                      "encoded image bytes.")
  flags.DEFINE_string("label_key", d.input.label_key, "tf.Example key of the "
                      "int64 class id.")
  flags.DEFINE_integer("max_steps", d.run.max_steps, "Train until this global "
                       "step (a re-run resumes and stops here too).")
  flags.DEFINE_integer("save_checkpoints_steps", d.run.save_checkpoints_steps,
                       "Checkpoint every this many steps.")
  flags.DEFINE_integer("keep_checkpoint_max", d.run.keep_checkpoint_max,
                       "Checkpoints to keep.")
  flags.DEFINE_integer("log_every_steps", d.run.log_every_steps, "Progress line "
                       "and summaries every this many steps.")
  flags.DEFINE_integer("eval_steps", d.run.eval_steps, "Evaluation batches; 0 for "
                       "the whole eval set.")
  flags.DEFINE_integer("seed", d.run.seed, "Random seed (graph and input order).")
  flags.DEFINE_integer("intra_op_threads", d.run.intra_op_threads, "TF intra-op "
                       "threads; 0 lets TensorFlow choose.")
  flags.DEFINE_integer("inter_op_threads", d.run.inter_op_threads, "TF inter-op "
                       "threads; 0 lets TensorFlow choose.")
  flags.DEFINE_integer("exports_to_keep", d.export.exports_to_keep, "Newest export "
                       "versions to keep under --export_dir.")
  flags.DEFINE_string("checkpoint_path", "", "et-evaluate/et-export: a specific "
                      "checkpoint (model_dir/model.ckpt-N); et-evaluate also takes "
                      "'best' (kept by et-train's eval loop) and 'latest' (default).")


def _define_export_flags(d: ExperimentConfig) -> None:
  """Flags: serving exports (et-export, and et-train with --export_dir)."""
  # Serving exports (et-export, and et-train with --export_dir).
  flags.DEFINE_list("serving_inputs", list(d.export.serving_inputs), "Signatures "
                    "to export, by input; the first is also serving_default; empty: "
                    "all that the head supports. "
                    "image_bytes: 'predict', encoded JPEG/PNG of any size (REST "
                    "{\"b64\": ...}); tf_example: 'classify' (or 'regress'), "
                    "serialized tf.Example with the image under --image_key; "
                    "image_tensor: 'predict_images', float32 RGB [n, size, size, 3] "
                    "in [0, 1].")
  flags.DEFINE_bool("export_features", d.export.export_features, "Also output the "
                    "backbone features ('features') from the predict signatures.")
  flags.DEFINE_string("best_metric", d.export.best_metric, "et-train: eval metric "
                      "that picks the best export; --export_dir only receives a "
                      "model that beats every one published there before.")
  flags.DEFINE_string("best_metric_mode", d.export.best_metric_mode, "max, min, or "
                      "auto (min for losses and errors: names with loss, error, mse, mae; "
                      "else max).")
  flags.DEFINE_integer("serving_warmup", d.export.serving_warmup, "Write this many "
                       "--eval_data records as TF Serving warmup requests "
                       "(assets.extra/tf_serving_warmup_requests); 0: none. Needs "
                       "tensorflow-serving-api.")


def _define_continual_flags(d: ExperimentConfig) -> None:
  """Flags: continued training, resume and guards (et-train)."""
  # Continued training, resume and guards (et-train).
  flags.DEFINE_string("warm_start_from", d.continual.warm_start_from, "Start a new "
                      "run from this checkpoint, model_dir or exported SavedModel: "
                      "backbone, head, BatchNorm statistics and EMA (variables whose "
                      "shape changed are skipped and logged). Ignored on resume.")
  flags.DEFINE_bool("keep_old_classes", d.continual.keep_old_classes, "With "
                    "--warm_start_from a model that knows its classes: keep them (and "
                    "their head rows) and append the data's new classes, merged by name.")
  flags.DEFINE_string("replay_data", d.continual.replay_data, "Old training data "
                      "mixed into every batch (same forms as --train_data), against "
                      "forgetting; labels are matched to the model's classes by name.")
  flags.DEFINE_float("replay_ratio", d.continual.replay_ratio, "Expected share of "
                     "--replay_data examples in each training batch.")
  flags.DEFINE_integer("eval_every_steps", d.guards.eval_every_steps, "Evaluate "
                       "--eval_data every this many steps while training; 0 uses "
                       "--save_checkpoints_steps when --early_stopping_metric is set.")
  flags.DEFINE_string("early_stopping_metric", d.guards.early_stopping_metric,
                      "Eval metric watched while training (e.g. accuracy, loss): the "
                      "best checkpoint is kept in model_dir/best; see --patience and "
                      "--regression_tolerance.")
  flags.DEFINE_string("metric_mode", d.guards.metric_mode, "max, min, or auto (min "
                      "for metrics named *loss*/*error*, else max).")
  flags.DEFINE_integer("patience", d.guards.patience, "Stop after this many "
                       "evaluations without improvement; 0 never stops early.")
  flags.DEFINE_float("min_delta", d.guards.min_delta, "Smallest change of the "
                     "metric that counts as an improvement.")
  flags.DEFINE_float("regression_tolerance", d.guards.regression_tolerance, "When "
                     "the metric is worse than the best by more than this, continue "
                     "from the best checkpoint's weights and optimizer state; unset: off.")
  flags.DEFINE_float("regression_lr_factor", d.guards.regression_lr_factor,
                     "Multiply the learning rate by this at each restore of the best "
                     "checkpoint (1: unchanged).")
  flags.DEFINE_enum("on_corrupt_checkpoint", "error", ["error", "previous"],
                    "et-train: when model_dir's latest checkpoint is unreadable, fail "
                    "naming the file (error) or resume from the newest readable one "
                    "(previous; the broken files are moved to model_dir/corrupt-*).")
  flags.DEFINE_bool("allow_config_change", False, "et-train: resume although the "
                    "backbone or head settings differ from the config saved in "
                    "--model_dir.")


def _define_transfer_flags(d: ExperimentConfig) -> None:
  """Flags: transfer-learning core."""
  # Transfer-learning core.
  flags.DEFINE_string("backbone_value_range", d.backbone.value_range, "Pixel range "
                      "the backbone expects: zero_one, minus_one_one, zero_255, "
                      "caffe or torch; empty takes the backbone's own (Keras "
                      "applications know theirs; Hub and Keras models: zero_one).")
  flags.DEFINE_string("head", d.head.kind, "classification (softmax; sigmoid with "
                      "--multi_label) or regression (--num_outputs linear outputs).")
  flags.DEFINE_bool("multi_label", d.head.multi_label, "Independent sigmoid per "
                    "class; labels are multi-hot.")
  flags.DEFINE_string("class_weights", d.head.class_weights, "Loss weight per "
                      "class, e.g. 1,1,4, or 'balanced' (n / (k * n_c) counted on "
                      "--train_data).")
  flags.DEFINE_integer("num_outputs", d.head.num_outputs, "Regression outputs per "
                       "example.")
  flags.DEFINE_string("unfreeze_schedule", d.freeze.unfreeze_schedule, "Gradual "
                      "unfreezing STEP:SPEC,..., e.g. 0:all,500:last:20,1500:none "
                      "(STEP may be epochs, 2e); SPEC as in --freeze.")
  flags.DEFINE_integer("train_size", d.schedule.train_size, "Training examples per "
                       "epoch, for epoch boundaries (30e); 0 counts --train_data.")
  flags.DEFINE_string("lr_multipliers", d.schedule.lr_multipliers, "Discriminative "
                      "learning rates REGEX=FACTOR,... on backbone/<var> and "
                      "head/<var> names, e.g. backbone/=0.1 (first match wins).")
  flags.DEFINE_bool("nesterov", d.optimizer.nesterov, "Nesterov momentum for "
                    "--optimizer=momentum.")
  flags.DEFINE_float("weight_decay", d.optimizer.weight_decay, "Weight decay on "
                     "trainable kernels only (not biases, not BatchNorm); "
                     "decoupled for adamw, an L2 loss term otherwise.")
  flags.DEFINE_float("ema_decay", d.optimizer.ema_decay, "Exponential moving "
                     "average of the trained weights (e.g. 0.999); evaluation and "
                     "export use the averages. 0: off.")


def _define_cluster_flags(d: ExperimentConfig) -> None:
  """Flags: cluster jobs: TF_CONFIG roles, strategies (see estimator_transfer/cluster.py)."""
  # Cluster jobs: TF_CONFIG roles, strategies (see estimator_transfer/cluster.py).
  flags.DEFINE_enum("distribution", d.cluster.distribution,
                    list(config_lib.DISTRIBUTIONS), "none: one device, or with "
                    "TF_CONFIG asynchronous training on ps tasks; mirrored: this "
                    "machine's GPUs in sync; multi_worker_mirrored: sync all-reduce "
                    "over chief + workers; parameter_server: ParameterServerStrategy.")
  flags.DEFINE_integer("eval_throttle_secs", d.cluster.eval_throttle_secs, "With "
                       "TF_CONFIG: the evaluator task evaluates a new checkpoint at "
                       "most this often (seconds).")
  flags.DEFINE_string("summary_dir", d.cluster.summary_dir, "Also write training "
                      "and eval scalars here for TensorBoard (default on Vertex AI: "
                      "AIP_TENSORBOARD_LOG_DIR); empty: model_dir only.")
  flags.DEFINE_integer("wait_for_workers_secs", d.cluster.wait_for_workers_secs,
                       "With TF_CONFIG: the chief holds its first step until every "
                       "worker has joined, at most this long; 0: start at once.")
  flags.DEFINE_bool("check_cluster", False, "et-train: check TF_CONFIG and the "
                    "settings, print what this task would do, and exit without "
                    "training.")


def _define_pipeline_flags(d: ExperimentConfig) -> None:
  """Flags: input pipeline (data/input_fns.py, data/augment.py); augmentation is."""
  # Input pipeline (data/input_fns.py, data/augment.py); augmentation is
  # training-only: evaluation and the export see the plain decoded image.
  flags.DEFINE_enum("on_bad_record", d.input.on_bad_record, ["skip", "fail"],
                    "A record or image file that cannot be read or decoded: skip "
                    "it (counted as bad_records in the log and eval results) or "
                    "fail naming its file.")
  flags.DEFINE_string("cache", d.input.cache, "Keep decoded examples after the "
                      "first pass: 'memory' or a file path prefix; empty: off.")
  flags.DEFINE_string("random_flip", d.input.random_flip, "Random flips: none, "
                      "horizontal, vertical or both.")
  flags.DEFINE_bool("random_crop", d.input.random_crop, "Random resized crop "
                    "(area >= --crop_min_area, aspect 3/4..4/3), scaled back to "
                    "the input size.")
  flags.DEFINE_float("crop_min_area", d.input.crop_min_area, "Smallest share of "
                     "the image a random crop keeps.")
  flags.DEFINE_float("rotation_degrees", d.input.rotation_degrees, "Random "
                     "rotation up to +/- this many degrees; 0: off.")
  flags.DEFINE_float("brightness", d.input.brightness, "Random brightness change "
                     "up to +/- this (pixels in [0, 1]); 0: off.")
  flags.DEFINE_float("contrast", d.input.contrast, "Random contrast factor in "
                     "1 +/- this; 0: off.")
  flags.DEFINE_float("saturation", d.input.saturation, "Random saturation factor "
                     "in 1 +/- this; 0: off.")
  flags.DEFINE_float("mixup_alpha", d.input.mixup_alpha, "Mixup with "
                     "Beta(alpha, alpha) weights (0.2 is typical); 0: off.")
  flags.DEFINE_string("csv_label_column", d.input.csv_label_column, "CSV data: "
                      "the label column (class id or class name).")


def _define_cache_flags(d: ExperimentConfig) -> None:
  """Flags: feature-cache mode (feature_cache.py): a frozen backbone runs once."""
  # Feature-cache mode (feature_cache.py): a frozen backbone runs once.
  flags.DEFINE_string("cache_features", d.input.cache_features, "With --freeze=all: "
                      "compute the backbone features of --train_data/--eval_data "
                      "once into this directory (keyed by the backbone's content, "
                      "image size and the input files) and train the head on them; "
                      "later runs reuse them. Exports still take images.")
  flags.DEFINE_integer("cache_features_with_augmentation",
                       d.input.cache_features_with_augmentation, "With "
                       "--cache_features: cache this many augmented copies of each "
                       "training image (the augmentation flags apply; K times the "
                       "extraction time and disk, and only K variants per image); 0: "
                       "un-augmented features, and augmentation flags are an error.")


def _define_performance_flags(d: ExperimentConfig) -> None:
  """Flags: performance knobs (scripts/benchmark.py measures each; see README)."""
  # Performance knobs (scripts/benchmark.py measures each; see README).
  flags.DEFINE_bool("xla", d.run.xla, "Compile the training step with XLA (for "
                    "GPUs; the first step pays the compilation). It works on CPU, "
                    "but XLA's CPU convolutions measured ~10x slower than the "
                    "default kernels (scripts/benchmark.py --only=knobs).")
  flags.DEFINE_enum("mixed_precision", d.run.mixed_precision,
                    list(config_lib.MIXED_PRECISION_POLICIES), "Keras dtype policy of "
                    "the backbone: float32, mixed_float16 (GPUs; dynamic loss "
                    "scaling) or mixed_bfloat16 (TPUs, recent GPUs). Both run on "
                    "CPUs, correctly but not faster (bfloat16 measured slower on an "
                    "AVX512_BF16 CPU: scripts/benchmark.py --only=knobs). Variables "
                    "and checkpoints stay float32; Keras backbones only.")
  flags.DEFINE_integer("prefetch", d.input.prefetch, "Batches the input pipeline "
                       "prepares ahead of the training step; -1: tf.data.AUTOTUNE, "
                       "0: none.")
  flags.DEFINE_alias("cache_dataset", "cache")



def flags_to_config(flag_values=FLAGS) -> ExperimentConfig:
  """Builds the validated config from flags, the saved config and defaults.

  Raises:
    ConfigError: a flag value is invalid, or the classes cannot be determined.
  """
  model_dir = flag_values.model_dir
  if not model_dir:
    raise ConfigError("--model_dir is required: the directory for checkpoints "
                      "and the saved config.")
  base = config_lib.load(model_dir)
  cfg = base or ExperimentConfig()
  updates = {}
  for name, (section, field, convert) in _FLAG_TO_CONFIG.items():
    if base is not None and not flag_values[name].present:
      continue
    updates[f"{section}__{field}"] = convert(flag_values[name].value)
  cfg = cfg.replace(**updates)
  if cfg.head.kind != "regression":  # a regression head has no classes
    cfg = _with_class_names(cfg, flag_values.label_map,
                            check_count=not cfg.head.class_names or
                            flag_values["num_classes"].present)
  return cfg.validate()


def _with_class_names(cfg: ExperimentConfig, label_map: str,
                      check_count: bool = True) -> ExperimentConfig:
  names = None
  for data in (cfg.input.train_data, cfg.input.eval_data):
    names = labels_lib.class_names_for(data, label_map)
    if names:
      break
  # A model keeps its classes; new ones (and a warm-start source's or the
  # replay data's) are merged in by name. A grown class list on resume is
  # refused by et-train's resume check, with the fix.
  names = continual.model_class_names(cfg, names)
  if not names:
    if cfg.head.class_names or cfg.head.num_classes:
      return cfg
    raise ConfigError("the classes are unknown: pass --num_classes or --label_map, "
                      "or put a labels.txt next to the TFRecords.")
  names = tuple(names)
  if check_count and cfg.head.num_classes and cfg.head.num_classes != len(names):
    raise ConfigError(f"--num_classes={cfg.head.num_classes} but the label map "
                      f"has {len(names)} classes; drop --num_classes or fix the "
                      "label map.")
  return cfg.replace(head=dataclasses.replace(cfg.head, num_classes=len(names),
                                              class_names=names))
