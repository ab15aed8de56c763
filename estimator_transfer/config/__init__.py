"""Run configuration: frozen dataclasses, validation and a JSON round trip.

The library takes these objects explicitly; only `estimator_transfer.cli`
turns flags into them, generating each flag from its field (`settings`).
Every user-fixable problem raises `ConfigError` with one sentence that names
the setting and the fix. Layers, bottom-up: settings (the `setting` field
helper) -> sections (the dataclasses) -> validation -> experiment
(ExperimentConfig, JSON, save/load). No module here imports TensorFlow.
"""
from estimator_transfer.config.experiment import (
    CONFIG_FILENAME, RENAMED_FIELDS, ExperimentConfig, load, save)
from estimator_transfer.config.sections import (
    DISTRIBUTIONS, MIXED_PRECISION_POLICIES, SERVING_INPUTS, BackboneConfig,
    ClusterConfig, ContinualConfig, ExportConfig, FreezeConfig, GuardConfig,
    HeadConfig, InputConfig, OptimizerConfig, RunConfig, ScheduleConfig)
from estimator_transfer.config.settings import Setting, section_settings, setting
from estimator_transfer.errors import ConfigError

__all__ = [
    "CONFIG_FILENAME", "RENAMED_FIELDS", "ExperimentConfig", "load", "save",
    "DISTRIBUTIONS", "MIXED_PRECISION_POLICIES", "SERVING_INPUTS", "BackboneConfig",
    "ClusterConfig", "ContinualConfig", "ExportConfig", "FreezeConfig", "GuardConfig",
    "HeadConfig", "InputConfig", "OptimizerConfig", "RunConfig", "ScheduleConfig",
    "Setting", "section_settings", "setting", "ConfigError",
]
