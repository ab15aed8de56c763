"""et-evaluate: full reports for the latest, best and named checkpoints and exports."""
import json
import os

import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_data, tiny_backbone):
  root = tmp_path_factory.mktemp("evaluate")
  args = [f"--backbone={tiny_backbone['h5']}", f"--train_data={tiny_data['train']}",
          f"--eval_data={tiny_data['eval']}", f"--model_dir={root / 'model'}",
          "--freeze=none", "--lr_values=0.05", "--batch_size=8", "--max_steps=12",
          "--save_checkpoints_steps=4", "--eval_every_steps=4",
          "--early_stopping_metric=accuracy", "--patience=10", "--seed=1"]
  result = run_cli("et-train", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  export = run_cli("et-export", f"--model_dir={root / 'model'}",
                   f"--export_dir={root / 'export'}")
  assert export.returncode == 0, export.stderr[-3000:]
  return {"root": root, "model_dir": str(root / "model"), "export_dir": str(root / "export"),
          "eval": tiny_data["eval"]}


def _report(path):
  with open(os.path.join(path, "eval_results.json")) as f:
    return json.load(f)


def test_latest_checkpoint_report_has_per_class_numbers(model):
  result = run_cli("et-evaluate", f"--model_dir={model['model_dir']}")
  assert result.returncode == 0, result.stderr[-2000:]
  report = _report(model["model_dir"])
  assert report["global_step"] == 12 and report["checkpoint"].endswith("model.ckpt-12")
  assert report["num_examples"] == 24
  assert set(report["per_class"]) == {"red", "green", "blue"}
  assert sum(r["support"] for r in report["per_class"].values()) == 24
  matrix = report["confusion_matrix"]
  assert sum(map(sum, matrix)) == 24
  # accuracy from the streaming metric equals the confusion matrix's diagonal
  assert report["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(3)) / 24)
  assert 0.0 <= report["top_2_accuracy"] <= 1.0
  assert report["top_2_accuracy"] >= report["accuracy"]
  assert os.path.getsize(os.path.join(model["model_dir"], "confusion_matrix.png")) > 100
  assert "precision" in result.stdout and "et-evaluate: accuracy" in result.stdout


@pytest.mark.parametrize("which", ["best", "named"])
def test_best_and_named_checkpoints(model, tmp_path, which):
  value = "best" if which == "best" else os.path.join(model["model_dir"], "model.ckpt-4")
  out = str(tmp_path / which)
  result = run_cli("et-evaluate", f"--model_dir={model['model_dir']}",
                   f"--checkpoint_path={value}", f"--eval_output_dir={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  report = _report(out)
  if which == "named":
    assert report["global_step"] == 4
  else:
    assert "best" in report["checkpoint"]
  assert report["num_examples"] == 24


def test_export_report_matches_checkpoint_report(model, tmp_path):
  checkpoint_out = str(tmp_path / "ckpt")
  run_cli("et-evaluate", f"--model_dir={model['model_dir']}",
          f"--eval_output_dir={checkpoint_out}")
  result = run_cli("et-evaluate", f"--export_path={model['export_dir']}",
                   f"--eval_data={model['eval']}", f"--eval_output_dir={tmp_path / 'exp'}")
  assert result.returncode == 0, result.stderr[-2000:]
  exported, checkpoint = _report(str(tmp_path / "exp")), _report(checkpoint_out)
  assert exported["confusion_matrix"] == checkpoint["confusion_matrix"]
  assert exported["accuracy"] == pytest.approx(checkpoint["accuracy"])
  assert exported["loss"] == pytest.approx(checkpoint["loss"], rel=1e-3)
  assert exported["skipped_examples"] == 0


def test_export_without_eval_data_is_one_line(model):
  result = run_cli("et-evaluate", f"--export_path={model['export_dir']}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == \
      "et-evaluate: error: --eval_data is required to evaluate an export."
