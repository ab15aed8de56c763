"""The transfer-learning flags through et-train, as a user runs it."""
import json
import os

import tensorflow as tf

from conftest import run_cli


def test_et_train_with_the_transfer_flags(tmp_path, tiny_data, tiny_backbone):
  model_dir = tmp_path / "model"
  result = run_cli(
      "et-train", f"--backbone={tiny_backbone['h5']}", f"--train_data={tiny_data['train']}",
      f"--model_dir={model_dir}", "--batch_size=8", "--max_steps=8", "--seed=1",
      "--freeze=all", "--unfreeze_schedule=1e:until:bn1",
      "--lr_boundaries=1e", "--lr_values=0.05,0.01", "--warmup_steps=2",
      "--lr_multipliers=backbone/=0.5", "--optimizer=adamw", "--weight_decay=0.0001",
      "--ema_decay=0.9", "--label_smoothing=0.1", "--class_weights=balanced",
      "--head_hidden_units=8", "--dropout_rate=0.2", "--log_every_steps=4")
  assert result.returncode == 0, result.stderr[-3000:]
  # 48 examples at batch 8: 1 epoch is 6 steps (counted from the data).
  assert "freeze=all from step 0" in result.stderr
  assert "freeze=until:bn1 from step 6" in result.stderr
  assert "counted 48 training examples" in result.stderr
  with open(model_dir / "trainable_variables.json") as f:
    record = json.load(f)
  assert [s["start_step"] for s in record["stages"]] == [0, 6]
  assert record["lr_multipliers"]["backbone/conv2/kernel"] == 0.5
  with open(model_dir / "config.json") as f:
    saved = json.load(f)
  assert saved["schedule"]["boundaries"] == ["1e"]
  assert saved["optimizer"]["ema_decay"] == 0.9
  names = {n for n, _ in tf.train.list_variables(str(model_dir))}
  assert "head_hidden_0/kernel/ExponentialMovingAverage" in names


def test_bad_transfer_flag_is_a_one_line_error(tmp_path, tiny_data, tiny_backbone):
  # (The other messages are checked in-process: config validation is shared.)
  message = "--unfreeze_schedule entry '0:all,5' must look like STEP:SPEC"
  result = run_cli("et-train", f"--backbone={tiny_backbone['h5']}",
                   f"--train_data={tiny_data['train']}", f"--model_dir={tmp_path / 'm'}",
                   "--max_steps=1", "--unfreeze_schedule=0:all,5")
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("et-train: error: ")
  assert message in result.stderr
  assert not os.path.exists(tmp_path / "m" / "checkpoint")
