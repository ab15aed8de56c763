"""The et-* flags are generated from the config fields; old names still work."""
from absl import flags
import pytest

from estimator_transfer.cli import flags as et_flags
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.errors import ConfigError

FLAGS = flags.FLAGS

# Every flag et-train knows, as before the flags were generated: flagfiles
# and job specs use these names.
EXPECTED_FLAGS = {
    "allow_config_change", "backbone", "backbone_output_layer", "backbone_value_range",
    "backbone_weights", "batch_size", "best_metric", "best_metric_mode", "brightness",
    "cache", "cache_budget_mb", "cache_dataset", "cache_features",
    "cache_features_with_augmentation",
    "check_cluster", "checkpoint_path", "class_weights", "clip_norm", "contrast",
    "crop_min_area", "csv_label_column", "distribution", "dropout_rate",
    "early_stopping_metric", "ema_decay", "eval_batch_size", "eval_data",
    "eval_every_steps", "eval_steps", "eval_throttle_secs", "export_dir", "export_latest",
    "export_features", "exports_to_keep", "freeze", "head", "head_hidden_units",
    "image_key", "image_size", "inter_op_threads", "intra_op_threads",
    "keep_checkpoint_max", "keep_old_classes", "label_key", "label_map", "label_offset",
    "label_smoothing", "log_every_steps", "lr_boundaries", "lr_multipliers", "lr_values",
    "max_steps", "metric_mode", "min_delta", "mixed_precision", "mixup_alpha",
    "model_dir", "momentum", "multi_label", "nesterov", "num_classes", "num_outputs",
    "on_bad_record", "on_corrupt_checkpoint", "optimizer", "patience", "prefetch",
    "random_crop", "random_flip", "regression_lr_factor", "regression_tolerance",
    "replay_data", "replay_ratio", "rotation_degrees", "saturation",
    "save_checkpoints_steps", "seed", "serving_inputs", "serving_warmup",
    "shuffle_buffer", "summary_dir", "train_data", "train_size", "unfreeze_schedule",
    "wait_for_workers_secs", "warm_start_from", "warm_start_map", "warmup_steps", "weight_decay", "xla",
}


@pytest.fixture
def parse():
  """parse(*args): FLAGS parsed from args (defaults restored afterwards)."""
  et_flags.define_flags()

  def run(*args):
    FLAGS.unparse_flags()
    FLAGS(["et-test", *args])
    return FLAGS

  yield run
  FLAGS.unparse_flags()


def test_the_flag_set_is_unchanged(parse):
  del parse
  defined = {f.name for f in FLAGS.get_flags_for_module(et_flags.__name__)}
  assert defined == EXPECTED_FLAGS


def test_each_setting_defines_its_flag(parse):
  del parse
  for _, field, meta in et_flags.settings():
    flag = FLAGS[meta.flag]
    assert flag.default == meta.default_for_flag(field.default), meta.flag
    assert flag.help.endswith(meta.help)  # enum flags start with <a|b|c>:
    assert (type(flag).__name__ == "EnumFlag") == (meta.kind == "enum")
  assert FLAGS["model_dir"].default is None and FLAGS["seed"].default is None
  assert FLAGS["lr_values"].default == ["0.01"]


def test_flags_become_the_config(parse, tmp_path):
  args = parse("--backbone=mobilenet_v2", f"--model_dir={tmp_path}", "--head=regression",
               "--head_hidden_units=16,8", "--lr_boundaries=2e,5e",
               "--lr_values=0.1,0.01,0.001", "--serving_inputs=image_bytes,tf_example",
               "--early_stopping_metric=loss", "--regression_tolerance=0.5", "--xla",
               "--distribution=mirrored")
  cfg = et_flags.flags_to_config(args)
  assert cfg.head.hidden_units == (16, 8)
  assert cfg.schedule.boundaries == ("2e", "5e")
  assert cfg.schedule.values == (0.1, 0.01, 0.001)
  assert cfg.export.serving_inputs == ("image_bytes", "tf_example")
  assert cfg.guards.regression_tolerance == 0.5 and cfg.run.seed is None
  assert cfg.run.xla and cfg.cluster.distribution == "mirrored"
  defaults = ExperimentConfig()
  assert cfg.input == defaults.input
  assert cfg.optimizer == defaults.optimizer


def test_a_bad_list_is_a_config_error(parse, tmp_path):
  args = parse("--backbone=x", f"--model_dir={tmp_path}", "--head=regression",
               "--head_hidden_units=16,x")
  with pytest.raises(ConfigError, match="--head_hidden_units=16,x must be a "
                     "comma-separated list of integers"):
    et_flags.flags_to_config(args)


@pytest.mark.parametrize("old, new, value, section, field", [
    ("cache_dataset", "cache", "memory", "input", "cache"),
    ("best_metric_mode", "metric_mode", "min", "guards", "metric_mode"),
])
def test_old_names_work_and_warn(parse, tmp_path, capsys, old, new, value, section, field):
  args = parse("--backbone=x", f"--model_dir={tmp_path}", "--head=regression",
               f"--{old}={value}")
  assert f"warning: --{old} is deprecated; use --{new}" in capsys.readouterr().err
  cfg = et_flags.flags_to_config(args)
  assert getattr(getattr(cfg, section), field) == value
  # flags.txt (et-train's record of its flags) carries the new name only.
  assert FLAGS[old].serialize() == "" and FLAGS[new].serialize() == f"--{new}={value}"


def test_old_and_new_name_must_agree(parse, tmp_path):
  with pytest.raises(flags.IllegalFlagValueError, match="deprecated name of --cache"):
    parse("--cache=memory", "--cache_dataset=/tmp/c")
  args = parse("--backbone=x", f"--model_dir={tmp_path}", "--head=regression",
               "--cache_dataset=/tmp/c", "--cache=memory")
  with pytest.raises(ConfigError, match="--cache_dataset=/tmp/c and --cache=memory "
                     "disagree"):
    et_flags.flags_to_config(args)
  args = parse("--backbone=x", f"--model_dir={tmp_path}", "--head=regression",
               "--cache_dataset=memory", "--cache=memory")
  assert et_flags.flags_to_config(args).input.cache == "memory"
