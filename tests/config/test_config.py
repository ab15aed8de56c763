"""Config: validation messages, settings and the JSON round trip."""
import dataclasses
import subprocess
import sys

import pytest

from conftest import ROOT
from estimator_transfer import config as config_lib
from estimator_transfer import files
from estimator_transfer.config import settings
from estimator_transfer.errors import ConfigError
from estimator_transfer.config import ExperimentConfig


def test_json_round_trip(make_config):
  cfg = make_config(head__hidden_units=(16, 8), schedule__boundaries=(3, 5),
                    schedule__values=(0.1, 0.01, 0.001))
  again = ExperimentConfig.from_json(cfg.to_json())
  assert again == cfg
  assert isinstance(again.head.class_names, tuple)


def test_save_and_load(make_config, tmp_path):
  cfg = make_config()
  config_lib.save(cfg, str(tmp_path))
  assert config_lib.load(str(tmp_path)) == cfg
  assert config_lib.load(str(tmp_path / "missing")) is None


def test_corrupt_saved_config_is_clear_error(tmp_path):
  (tmp_path / config_lib.CONFIG_FILENAME).write_text("{not json")
  with pytest.raises(ConfigError, match="not a valid estimator-transfer config"):
    config_lib.load(str(tmp_path))


def test_unknown_keys_are_rejected():
  with pytest.raises(ConfigError, match="unknown keys"):
    ExperimentConfig.from_dict({"run": {"max_step": 3}})


@pytest.mark.parametrize("overrides, message", [
    (dict(backbone__handle=""), "--backbone is required"),
    (dict(schedule__boundaries=(10,), schedule__values=(0.1,)), "one more value"),
    (dict(schedule__boundaries=(10, 5), schedule__values=(0.1, 0.1, 0.1)),
     "strictly increasing"),
    (dict(optimizer__name="adagrad"), "--optimizer=adagrad is not supported"),
    (dict(input__batch_size=0), "--batch_size must be positive"),
    (dict(run__max_steps=0), "--max_steps must be positive"),
    (dict(freeze__spec="some"), "--freeze='some' is not a freeze spec"),
    (dict(head__num_classes=1, head__class_names=("a",)), "at least 2 classes"),
    (dict(head__dropout_rate=1.5), "--dropout_rate"),
    (dict(backbone__image_size=3), "--image_size=3 is invalid"),
])
def test_validation_names_the_flag(make_config, overrides, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
    make_config(**overrides).validate()


def test_messages_are_one_sentence(make_config):
  with pytest.raises(ConfigError) as info:
    make_config(optimizer__name="x").validate()
  assert "\n" not in str(info.value)


def test_validate_runs_without_tensorflow(tmp_path):
  """config imports only errors, specs and files: validate() never loads TF."""
  script = """
import sys
from estimator_transfer import config as c
cfg = c.ExperimentConfig(
    backbone=c.BackboneConfig(handle="mobilenet_v2", value_range="minus_one_one"),
    head=c.HeadConfig(num_classes=3, class_names=("a", "b", "c"), class_weights="1,1,4",
                      hidden_units=(8,)),
    freeze=c.FreezeConfig("last:2", unfreeze_schedule="0:all,5:none"),
    schedule=c.ScheduleConfig(boundaries=(3, "2e"), values=(0.1, 0.01, 0.001),
                              lr_multipliers="backbone/=0.1"),
    input=c.InputConfig(train_data="x", random_flip="horizontal"),
    export=c.ExportConfig(serving_inputs=("image_bytes", "tf_example")),
    guards=c.GuardConfig(early_stopping_metric="loss", patience=2),
    cluster=c.ClusterConfig(distribution="mirrored"))
cfg.validate()
c.save(cfg, sys.argv[1])
assert c.load(sys.argv[1]) == cfg
assert "tensorflow" not in sys.modules, sorted(m for m in sys.modules if "tensorflow" in m)
print("ok")
"""
  result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "ok"


def test_save_writes_atomically(make_config, tmp_path, monkeypatch):
  written = []
  real = files.write_atomically
  monkeypatch.setattr(files, "write_atomically",
                      lambda path, data: written.append(path) or real(path, data))
  path = config_lib.save(make_config(), str(tmp_path / "new"))
  assert written == [path] and path == str(tmp_path / "new" / config_lib.CONFIG_FILENAME)
  assert [p.name for p in (tmp_path / "new").iterdir()] == [config_lib.CONFIG_FILENAME]


@pytest.mark.parametrize("guards_mode, export_mode, expected", [
    ("auto", "min", "min"),   # only the export's mode was set: it is kept
    ("max", "auto", "max"),
    ("max", "min", "max"),    # both set: the guards' (the surviving flag) wins
    ("auto", "auto", "auto"),
])
def test_config_json_of_earlier_versions_is_read(make_config, guards_mode, export_mode,
                                                 expected):
  data = make_config().to_dict()
  data["guards"]["metric_mode"] = guards_mode
  data["export"]["best_metric_mode"] = export_mode  # the field before the merge
  cfg = ExperimentConfig.from_dict(data)
  assert cfg.guards.metric_mode == expected
  assert "best_metric_mode" not in cfg.to_dict()["export"]


def test_replace_accepts_the_old_field_name(make_config):
  cfg = make_config(export__best_metric_mode="min")
  assert cfg.guards.metric_mode == "min"
  with pytest.raises(ConfigError, match="--metric_mode=up is invalid"):
    make_config(export__best_metric_mode="up").validate()


@pytest.mark.parametrize("overrides", [
    dict(guards__metric_mode="max"),  # one watched metric: any mode
    dict(guards__early_stopping_metric="perplexity", export__best_metric="perplexity",
         guards__metric_mode="min"),
    dict(guards__early_stopping_metric="loss", export__best_metric="accuracy"),  # auto
    dict(guards__early_stopping_metric="auc", export__best_metric="accuracy",
         guards__metric_mode="max"),  # right for both
])
def test_one_metric_mode_for_both_metrics(make_config, overrides):
  cfg = make_config(**overrides)
  assert cfg.validate() is cfg  # accepted: validate() raises on a refused mode


def test_a_mode_wrong_for_one_of_two_metrics_is_refused(make_config):
  with pytest.raises(ConfigError, match=r"--metric_mode=min applies to both "
                     r"--early_stopping_metric=perplexity and --best_metric=accuracy"):
    make_config(guards__early_stopping_metric="perplexity",
                guards__metric_mode="min").validate()


def test_every_field_is_a_setting_with_a_unique_flag():
  flags_seen = []
  for section in dataclasses.fields(ExperimentConfig):
    section_cls = type(section.default)
    for field in dataclasses.fields(section_cls):
      meta = settings.setting_of(field)
      if meta is None:
        assert (section.name, field.name) in NOT_SETTINGS
        continue
      flags_seen += [meta.flag, *meta.deprecated_flags]
      assert meta.help.strip() and meta.kind
    assert settings.first_doc_line(section_cls)  # the README's line for the section
  assert len(flags_seen) == len(set(flags_seen))


NOT_SETTINGS = {("head", "class_names"), ("input", "num_parallel_calls")}


@pytest.mark.parametrize("kind, flag_value, expected", [
    ("ints", ["16", "8"], (16, 8)),
    ("floats", ["0.1", "1e-3"], (0.1, 0.001)),
    ("strings", ["image_bytes"], ("image_bytes",)),
    ("boundaries", ["500", " 30e"], (500, "30e")),
    ("integer", None, None),  # an optional int (--seed) stays unset
])
def test_settings_parse_flag_values(kind, flag_value, expected):
  meta = settings.Setting(flag="x", help="h", kind=kind)
  assert meta.parse(flag_value) == expected


def test_a_bad_list_names_the_flag():
  meta = settings.Setting(flag="head_hidden_units", help="h", kind="ints")
  with pytest.raises(ConfigError, match="--head_hidden_units=16,x must be a "
                     "comma-separated list of integers"):
    meta.parse(["16", "x"])
