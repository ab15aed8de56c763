"""Run configuration: frozen dataclasses, validation and a JSON round trip.

The library takes these objects explicitly; only `estimator_transfer.cli` turns
flags into them. Every user-fixable problem raises `ConfigError` with one
sentence that names the setting and the fix.
"""
import dataclasses
import json
import os
from typing import Optional, Tuple

CONFIG_FILENAME = "config.json"


class ConfigError(ValueError):
  """A configuration problem the user can fix; the message is one sentence."""


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
  """
  handle: str = ""
  weights: str = ""
  output_layer: str = ""
  image_size: int = 0


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """The new classification head put on the backbone features."""
  num_classes: int = 0
  class_names: Tuple[str, ...] = ()
  hidden_units: Tuple[int, ...] = ()
  dropout_rate: float = 0.0
  label_smoothing: float = 0.0


@dataclasses.dataclass(frozen=True)
class FreezeConfig:
  """Which backbone layers stay frozen: `all`, `none`, `first:N`, `last:N`."""
  spec: str = "all"


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Piecewise-constant learning rate on the global step.

  `values[i]` applies from step `boundaries[i-1]` (inclusive) up to step
  `boundaries[i]` (exclusive); optional linear warmup over the first
  `warmup_steps` steps ramps from 0 to `values[0]`.
  """
  boundaries: Tuple[int, ...] = ()
  values: Tuple[float, ...] = (0.01,)
  warmup_steps: int = 0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "momentum"
  momentum: float = 0.9
  clip_norm: float = 0.0


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Where examples come from and how they are batched.

  `train_data` / `eval_data` are TFRecord files, globs or directories of
  shards (`*.tfrecord*`), or an image folder with one sub-folder per class.
  """
  train_data: str = ""
  eval_data: str = ""
  batch_size: int = 32
  eval_batch_size: int = 0
  shuffle_buffer: int = 2048
  image_key: str = "image/encoded"
  label_key: str = "image/class/label"
  num_parallel_calls: int = -1  # -1: tf.data.AUTOTUNE


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


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  export_dir: str = ""
  exports_to_keep: int = 5


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


_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "rmsprop")


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
  _require(h.num_classes >= 2 or h.num_classes == 0,
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
  _require(all(x > 0 for x in s.boundaries) and
           all(a < b2 for a, b2 in zip(s.boundaries, s.boundaries[1:])),
           f"--lr_boundaries must be positive and strictly increasing steps, "
           f"got {list(s.boundaries)}.")
  _require(s.warmup_steps >= 0, "--warmup_steps must not be negative.")
  _require(o.name in _OPTIMIZERS,
           f"--optimizer={o.name} is not supported; choose one of "
           f"{', '.join(_OPTIMIZERS)}.")
  _require(o.clip_norm >= 0, "--clip_norm must not be negative.")
  _require(i.batch_size > 0, f"--batch_size must be positive, got {i.batch_size}.")
  _require(i.eval_batch_size >= 0, "--eval_batch_size must not be negative.")
  _require(r.max_steps > 0, f"--max_steps must be positive, got {r.max_steps}.")
  _require(r.save_checkpoints_steps > 0, "--save_checkpoints_steps must be positive.")
  _require(r.keep_checkpoint_max > 0, "--keep_checkpoint_max must be positive.")
  _require(r.log_every_steps > 0, "--log_every_steps must be positive.")
  _require(r.eval_steps >= 0, "--eval_steps must not be negative (0: whole eval set).")
  _require(cfg.export.exports_to_keep > 0, "--exports_to_keep must be positive.")
  from estimator_transfer import freezing  # local: freezing imports config
  freezing.parse_spec(cfg.freeze.spec)


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
