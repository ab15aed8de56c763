"""The et-* flags, generated from the config fields, and flags -> ExperimentConfig.

Every setting is a config field carrying its flag name, help text and kind
(`estimator_transfer.config.settings`); this module turns those fields into
absl flags and parses them back. The few flags that are not settings (they
steer one script and are not saved in config.json) are defined in
`_define_script_flags`. This is, with the other cli/ modules, the only place
that imports absl.flags.

Precedence: flags given on the command line or in a --flagfile, then the
config saved in --model_dir by an earlier run, then the defaults. So
`et-evaluate --model_dir=runs/x` and `et-export --model_dir=runs/x
--export_dir=exports/x` need nothing else.
"""
import dataclasses
import os
import sys
from typing import Iterator, Tuple

from absl import flags
import tensorflow as tf

from estimator_transfer import config as config_lib
from estimator_transfer import files as files_lib
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.config.settings import Setting, section_settings
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import sources
from estimator_transfer.errors import ConfigError
from estimator_transfer.training import warm_start

FLAGS = flags.FLAGS

_DEFINE = {
    "string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
    "float": flags.DEFINE_float, "bool": flags.DEFINE_bool,
    "ints": flags.DEFINE_list, "floats": flags.DEFINE_list,
    "strings": flags.DEFINE_list, "boundaries": flags.DEFINE_list,
}


def settings() -> Iterator[Tuple[str, dataclasses.Field, Setting]]:
  """(section name, field, Setting) of every flag-carrying config field."""
  for section in dataclasses.fields(ExperimentConfig):
    for field, meta in section_settings(type(section.default)):
      yield section.name, field, meta


def define_flags() -> None:
  """Defines every flag of the et-* scripts (idempotent)."""
  if "backbone" in FLAGS:
    return
  for _, field, meta in settings():
    _define_setting(meta, field.default)
  _define_script_flags()


def _define_setting(meta: Setting, field_default) -> None:
  default = meta.default_for_flag(field_default)
  if meta.kind == "enum":
    flags.DEFINE_enum(meta.flag, default, list(meta.choices), meta.help)
  else:
    _DEFINE[meta.kind](meta.flag, default, meta.help)
  for old_name in meta.deprecated_flags:
    flags.DEFINE_flag(_DeprecatedAlias(old_name, FLAGS[meta.flag]),
                      module_name=__name__)


def _define_script_flags() -> None:
  """The flags that are not config settings: not saved in config.json."""
  flags.DEFINE_string("label_map", "", "Text file with one class name per line "
                      "(line i is class i). Default: labels.txt next to the data, "
                      "or the class folder names.")
  flags.DEFINE_string("checkpoint_path", "", "et-evaluate/et-export: a specific "
                      "checkpoint (model_dir/model.ckpt-N); et-evaluate also takes "
                      "'best' (kept by et-train's eval loop) and 'latest' (default).")
  flags.DEFINE_enum("on_corrupt_checkpoint", "error", ["error", "previous"],
                    "et-train: when model_dir's latest checkpoint is unreadable, fail "
                    "naming the file (error) or resume from the newest readable one "
                    "(previous; the broken files are moved to model_dir/corrupt-*).")
  flags.DEFINE_bool("allow_config_change", False, "et-train: resume although the "
                    "backbone or head settings differ from the config saved in "
                    "--model_dir.")
  flags.DEFINE_bool("check_cluster", False, "et-train: check TF_CONFIG and the "
                    "settings, print what this task would do, and exit without "
                    "training.")


class _DeprecatedAlias(flags.Flag):
  """An old flag name: sets the new flag, warns at each use, never serialized.

  Unlike absl's DEFINE_alias it does not appear in flags.txt (the new name
  does), and a value that contradicts the new flag given earlier is refused
  (`check_deprecated_aliases` catches the other order).
  """

  def __init__(self, name: str, target: flags.Flag):
    self.target = target
    self.given = None
    super().__init__(target.parser, target.serializer, name, target.default,
                     f"Deprecated name of --{target.name}; use --{target.name}.",
                     boolean=target.boolean)

  def parse(self, argument):
    value = self.parser.parse(argument) if isinstance(argument, str) else argument
    if self.target.present and value != self.target.value:
      raise flags.IllegalFlagValueError(f"--{self.name} is the deprecated name of --{self.target.name}, "
                       f"which is already {self.target.value!r}; give --{self.target.name} "
                       "once")
    # Straight to stderr: logging is not set up while flags are parsed.
    sys.stderr.write(f"warning: --{self.name} is deprecated; use --{self.target.name} "
                     "(the same setting)\n")
    self.target.parse(argument)
    self.given = value
    self.present += 1

  def _parse_from_default(self, value):
    return value

  @property
  def value(self):
    return self.target.value

  @value.setter
  def value(self, value):
    del value  # the default is the target's; nothing of its own to store

  def serialize(self) -> str:
    return ""


def check_deprecated_aliases(flag_values=FLAGS) -> None:
  """Refuses an old flag name whose value the new name, given later, overrode.

  Raises:
    ConfigError: both names were given, with different values.
  """
  for _, _, meta in settings():
    for old_name in meta.deprecated_flags:
      alias = flag_values[old_name]
      if alias.present and alias.given != flag_values[meta.flag].value:
        raise ConfigError(
            f"--{old_name}={alias.given} and --{meta.flag}="
            f"{flag_values[meta.flag].value} disagree; --{old_name} is the deprecated "
            f"name of --{meta.flag}: give only --{meta.flag}.")


def flags_to_config(flag_values=FLAGS) -> ExperimentConfig:
  """Builds the validated config from flags, the saved config and defaults.

  Raises:
    ConfigError: a flag value is invalid, or the classes cannot be determined.
  """
  model_dir = flag_values.model_dir
  if not model_dir:
    raise ConfigError("--model_dir is required: the directory for checkpoints "
                      "and the saved config.")
  check_deprecated_aliases(flag_values)
  base = config_lib.load(model_dir)
  cfg = base or ExperimentConfig()
  updates = {}
  for section, field, meta in settings():
    if base is not None and not flag_values[meta.flag].present:
      continue
    updates[f"{section}__{field.name}"] = meta.parse(flag_values[meta.flag].value)
  cfg = cfg.replace(**updates)
  if cfg.head.kind != "regression":  # a regression head has no classes
    cfg = _with_class_names(cfg, flag_values.label_map,
                            check_count=not cfg.head.class_names or
                            flag_values["num_classes"].present)
  return cfg.validate()


def check_data_path(flag: str, data: str) -> None:
  """Refuses a data flag whose path (or glob) names nothing.

  Raises:
    ConfigError: "--train_data=X matches no file; check the path."
  """
  if files_lib.is_remote(data):
    return  # listed (and refused with the path) when the data is read
  if any(c in data for c in "*?["):
    if not tf.io.gfile.glob(data):
      raise ConfigError(f"--{flag}={data} matches no file; check the path.")
  elif not os.path.exists(data):
    raise ConfigError(f"--{flag}={data} does not exist; check the path.")


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
  names = warm_start.model_class_names(cfg, names)
  if not names:
    if cfg.head.class_names or cfg.head.num_classes:
      return cfg
    # The data comes first: a missing path or a file of the wrong kind is the
    # thing to fix, not the class count.
    for flag, data in (("train_data", cfg.input.train_data),
                       ("eval_data", cfg.input.eval_data)):
      if data:
        check_data_path(flag, data)
        sources.resolve_source(cfg.input, data)
    raise ConfigError("the classes are unknown: pass --num_classes or --label_map, "
                      "or put a labels.txt next to the TFRecords.")
  names = tuple(names)
  if check_count and cfg.head.num_classes and cfg.head.num_classes != len(names):
    raise ConfigError(f"--num_classes={cfg.head.num_classes} but the label map "
                      f"has {len(names)} classes; drop --num_classes or fix the "
                      "label map.")
  return cfg.replace(head=dataclasses.replace(cfg.head, num_classes=len(names),
                                              class_names=names))
