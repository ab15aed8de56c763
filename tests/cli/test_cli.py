"""The console scripts as a user runs them: real subprocesses, real files."""
import json
import os

import pytest
import tensorflow as tf

from conftest import run_cli


def _one_error_line(result, prog):
  assert result.returncode == 1, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert "Traceback" not in result.stderr
  errors = [l for l in lines if f"{prog}: error:" in l]
  # Exactly one error sentence, and it is the last thing printed.
  assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
  assert errors[0].startswith(f"{prog}: error: ")
  return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data, tiny_backbone):
  """et-train driven by a flagfile, as `make demo` does."""
  root = tmp_path_factory.mktemp("cli")
  flagfile = root / "run.flags"
  flagfile.write_text("\n".join([
      "# a comment, as in flags/*.flags",
      f"--backbone={tiny_backbone['saved_model']}",
      f"--train_data={tiny_data['train']}",
      f"--eval_data={tiny_data['eval']}",
      f"--model_dir={root / 'model'}",
      f"--export_dir={root / 'export'}",
      "--freeze=first:2",
      "--lr_boundaries=4", "--lr_values=0.05,0.01",
      "--optimizer=momentum", "--batch_size=8", "--max_steps=8",
      "--save_checkpoints_steps=4", "--log_every_steps=4", "--seed=3",
  ]) + "\n")
  result = run_cli("et-train", f"--flagfile={flagfile}")
  assert result.returncode == 0, result.stderr[-3000:]
  return {"root": root, "flagfile": str(flagfile), "train": result,
          "model_dir": str(root / "model"), "export_dir": str(root / "export")}


def test_train_writes_checkpoints_and_config(trained):
  assert "trained to step 8" in trained["train"].stdout
  assert tf.train.latest_checkpoint(trained["model_dir"]).endswith("model.ckpt-8")
  with open(os.path.join(trained["model_dir"], "config.json")) as f:
    saved = json.load(f)
  assert saved["freeze"]["spec"] == "first:2"
  assert saved["head"]["class_names"] == ["red", "green", "blue"]  # from labels.txt
  assert saved["backbone"]["image_size"] == 16  # read from the backbone
  # Progress lines: step/max_steps, loss, lr, examples/s.
  assert "step 8/8" in trained["train"].stderr
  assert "examples/s" in trained["train"].stderr


def test_rerun_resumes_and_stops_at_max_steps(trained):
  result = run_cli("et-train", f"--flagfile={trained['flagfile']}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "trained to step 8" in result.stdout


def test_evaluate_with_only_model_dir(trained):
  result = run_cli("et-evaluate", f"--model_dir={trained['model_dir']}")
  assert result.returncode == 0, result.stderr[-2000:]
  with open(os.path.join(trained["model_dir"], "eval_results.json")) as f:
    metrics = json.load(f)
  assert metrics["global_step"] == 8
  assert 0.0 <= metrics["accuracy"] <= 1.0
  assert f"accuracy {metrics['accuracy']:.4f}" in result.stdout


def test_export_writes_serving_layout(trained):
  result = run_cli("et-export", f"--model_dir={trained['model_dir']}",
                   f"--export_dir={trained['export_dir']}")
  assert result.returncode == 0, result.stderr[-2000:]
  versions = [d for d in os.listdir(trained["export_dir"]) if not d.startswith(".")]
  assert versions and all(v.isdigit() for v in versions), versions
  assert os.path.exists(os.path.join(trained["export_dir"], versions[0], "saved_model.pb"))


@pytest.mark.parametrize("args, message", [
    (["--no_such_flag=1"], "no_such_flag"),
    (["--max_steps=abc"], "max_steps"),
    (["positional"], "unexpected argument 'positional'"),
    (["--freeze=half"], "--freeze='half' is not a freeze spec"),
    (["--lr_values=0.1,fast"], "--lr_values=0.1,fast must be a comma-separated list"),
    (["--train_data=/nonexistent/train-*"], "no TFRecord files found at /nonexistent"),
    (["--backbone=/nonexistent/model.h5"], "does not exist"),
])
def test_bad_input_is_one_line_and_leaves_model_dir_alone(trained, args, message):
  before = {f: os.path.getmtime(os.path.join(trained["model_dir"], f))
            for f in os.listdir(trained["model_dir"])}
  result = run_cli("et-train", f"--flagfile={trained['flagfile']}", *args)
  line = _one_error_line(result, "et-train")
  assert message in line
  after = {f: os.path.getmtime(os.path.join(trained["model_dir"], f))
           for f in os.listdir(trained["model_dir"])}
  assert after == before


def test_missing_model_dir_is_clear(tiny_data):
  result = run_cli("et-train", f"--train_data={tiny_data['train']}", "--backbone=x")
  assert "--model_dir is required" in _one_error_line(result, "et-train")


def test_evaluate_without_checkpoint_is_clear(tmp_path, tiny_data, tiny_backbone):
  result = run_cli("et-evaluate", f"--model_dir={tmp_path / 'missing'}",
                   f"--backbone={tiny_backbone['h5']}", f"--eval_data={tiny_data['eval']}")
  assert "does not exist" in _one_error_line(result, "et-evaluate")
  (tmp_path / "empty").mkdir()
  result = run_cli("et-evaluate", f"--model_dir={tmp_path / 'empty'}",
                   f"--backbone={tiny_backbone['h5']}", f"--eval_data={tiny_data['eval']}")
  assert "holds no trained model" in _one_error_line(result, "et-evaluate")
