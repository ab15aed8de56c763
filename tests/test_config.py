"""Config: validation messages and the JSON round trip."""
import pytest

from estimator_transfer import config as config_lib
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
