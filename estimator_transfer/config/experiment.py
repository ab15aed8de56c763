"""ExperimentConfig: every section of one run, its JSON round trip, save/load."""
import dataclasses
import json
import os
from typing import Optional

from estimator_transfer import files
from estimator_transfer.config.validation import validate as validate_config
from estimator_transfer.config.sections import (
    BackboneConfig, ClusterConfig, ContinualConfig, ExportConfig, FreezeConfig,
    GuardConfig, HeadConfig, InputConfig, OptimizerConfig, RunConfig, ScheduleConfig)
from estimator_transfer.errors import ConfigError

CONFIG_FILENAME = "config.json"

# Fields that moved: (old section, old field) -> (new section, new field).
# config.json files of earlier versions and `replace(old__field=...)` still
# work. An old value only fills the new field when that one is still at its
# default (both were separate settings before they were merged).
RENAMED_FIELDS = {
    ("export", "best_metric_mode"): ("guards", "metric_mode"),
}


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
    validate_config(self)
    return self

  def replace(self, **sections) -> "ExperimentConfig":
    """Returns a copy with whole sections or `section__field=value` replaced."""
    updates = {}
    for key, value in sections.items():
      if "__" in key:
        section, field = key.split("__", 1)
        section, field = RENAMED_FIELDS.get((section, field), (section, field))
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
    """Builds a config from `to_dict` output, also of earlier versions.

    Raises:
      ConfigError: a section has keys this version does not know.
    """
    raw = {name: dict(data.get(name, {})) for name in (f.name for f in dataclasses.fields(cls))}
    _apply_renames(raw)
    sections = {}
    for field in dataclasses.fields(cls):
      section_cls = field.type if isinstance(field.type, type) else type(field.default)
      values = raw[field.name]
      known = {f.name for f in dataclasses.fields(section_cls)}
      unknown = sorted(set(values) - known)
      if unknown:
        raise ConfigError(
            f"config section '{field.name}' has unknown keys {unknown}; "
            "remove them or upgrade estimator-transfer.")
      values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
      sections[field.name] = section_cls(**values)
    return cls(**sections)

  @classmethod
  def from_json(cls, text: str) -> "ExperimentConfig":
    return cls.from_dict(json.loads(text))


def _apply_renames(raw: dict) -> None:
  """Moves old keys of `raw` ({section: {field: value}}) to their new place."""
  for (old_section, old_field), (section, field) in RENAMED_FIELDS.items():
    if old_field not in raw.get(old_section, {}):
      continue
    value = raw[old_section].pop(old_field)
    default = getattr(_section_defaults(section), field)
    if raw[section].get(field, default) == default:
      raw[section][field] = value


def _section_defaults(section: str):
  return getattr(ExperimentConfig(), section)


def save(cfg: ExperimentConfig, model_dir: str) -> str:
  """Writes the config as JSON into `model_dir` atomically; returns the path."""
  return files.write_atomically(os.path.join(model_dir, CONFIG_FILENAME), cfg.to_json())


def load(model_dir: str) -> Optional[ExperimentConfig]:
  """Reads the config saved in `model_dir`, or None when there is none.

  Raises:
    ConfigError: the file is not a config this version can read.
  """
  path = os.path.join(model_dir, CONFIG_FILENAME)
  try:
    text = files.read_text(path)
  except NotADirectoryError:
    raise ConfigError(f"--model_dir={model_dir} is a file, not a directory; give the "
                      "directory of a run, or a new one.") from None
  except IsADirectoryError:
    raise ConfigError(f"{path} is a directory, not a config file; remove it or start a "
                      "new --model_dir.") from None
  if text is None:
    return None
  try:
    if not isinstance(json.loads(text), dict):
      raise ValueError("not a JSON object")
    return ExperimentConfig.from_json(text)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{path} is not a valid estimator-transfer config ({e}); "
                      "restore it or start a new --model_dir.") from e
