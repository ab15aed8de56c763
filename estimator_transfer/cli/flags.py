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
from estimator_transfer.config import ConfigError, ExperimentConfig
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
    "lr_boundaries": ("schedule", "boundaries", _ints("lr_boundaries")),
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
}


def define_flags() -> None:
  """Defines every flag of the et-* scripts (idempotent)."""
  if "backbone" in FLAGS:
    return
  d = ExperimentConfig()
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
                      "SavedModel exports (TF Serving layout: <export_dir>/<version>).")
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
                      "only the last N).")
  # Schedule and optimizer.
  flags.DEFINE_list("lr_boundaries", list(map(str, d.schedule.boundaries)),
                    "Global steps at which the learning rate changes, e.g. 500,800.")
  flags.DEFINE_list("lr_values", list(map(str, d.schedule.values)), "Learning "
                    "rates, one more than --lr_boundaries, e.g. 0.1,0.01,0.001.")
  flags.DEFINE_integer("warmup_steps", d.schedule.warmup_steps, "Linear warmup "
                       "steps at the start of training.")
  flags.DEFINE_string("optimizer", d.optimizer.name, "sgd, momentum, nesterov, "
                      "adam or rmsprop.")
  flags.DEFINE_float("momentum", d.optimizer.momentum, "Momentum (momentum, "
                     "nesterov, rmsprop).")
  flags.DEFINE_float("clip_norm", d.optimizer.clip_norm, "Clip gradients to this "
                     "global norm; 0 for no clipping.")
  # Input and loop.
  flags.DEFINE_integer("batch_size", d.input.batch_size, "Training batch size.")
  flags.DEFINE_integer("eval_batch_size", d.input.eval_batch_size, "Evaluation "
                       "batch size; 0 uses --batch_size.")
  flags.DEFINE_integer("shuffle_buffer", d.input.shuffle_buffer, "Examples in the "
                       "shuffle buffer.")
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
                      "checkpoint (model_dir/model.ckpt-N); default the latest.")


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
  cfg = _with_class_names(cfg, flag_values.label_map)
  return cfg.validate()


def _with_class_names(cfg: ExperimentConfig, label_map: str) -> ExperimentConfig:
  names = None
  for data in (cfg.input.train_data, cfg.input.eval_data):
    names = labels_lib.class_names_for(data, label_map)
    if names:
      break
  if not names:
    if cfg.head.class_names or cfg.head.num_classes:
      return cfg
    raise ConfigError("the classes are unknown: pass --num_classes or --label_map, "
                      "or put a labels.txt next to the TFRecords.")
  names = tuple(names)
  if cfg.head.num_classes and cfg.head.num_classes != len(names):
    raise ConfigError(f"--num_classes={cfg.head.num_classes} but the label map "
                      f"has {len(names)} classes; drop --num_classes or fix the "
                      "label map.")
  return cfg.replace(head=dataclasses.replace(cfg.head, num_classes=len(names),
                                              class_names=names))
