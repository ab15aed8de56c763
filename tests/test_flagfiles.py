"""Every flagfile in flags/ runs on the demo data, as the README tells users.

The flagfiles use paths relative to the checkout (demo_data/, demo_backbone/,
runs/, exports/); the tests run them from a workspace that has those, with
only the run length shortened on the command line.
"""
import json
import os

import pytest
import tensorflow as tf

from conftest import ROOT, run_cli

SHORT = ["--max_steps=4", "--save_checkpoints_steps=2", "--eval_every_steps=2",
         "--log_every_steps=2"]


@pytest.fixture(scope="module")
def workspace(demo_assets, tmp_path_factory):
  root = tmp_path_factory.mktemp("workspace")
  os.symlink(demo_assets["data"], root / "demo_data")
  os.symlink(demo_assets["backbone"], root / "demo_backbone")
  os.symlink(os.path.join(ROOT, "flags"), root / "flags")
  return root


def _train(workspace, flagfile, *extra):
  result = run_cli("et-train", f"--flagfile=flags/{flagfile}", *SHORT, *extra,
                   cwd=str(workspace))
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _json(path):
  with open(path) as f:
    return json.load(f)


def test_every_flagfile_is_covered():
  tested = {"demo.flags", "feature_extraction.flags", "fine_tune_top_blocks.flags",
            "gradual_unfreeze.flags", "resume_after_crash.flags",
            "continue_on_new_data.flags", "export_for_serving.flags", "cluster_job.flags"}
  assert set(f for f in os.listdir(os.path.join(ROOT, "flags")) if f.endswith(".flags")) \
      <= tested


@pytest.fixture(scope="module")
def demo_run(workspace):
  _train(workspace, "demo.flags")
  return workspace / "runs" / "demo"


def test_demo(demo_run):
  assert tf.train.latest_checkpoint(str(demo_run)).endswith("model.ckpt-4")


@pytest.mark.parametrize("flagfile, frozen, trained", [
    ("feature_extraction.flags", 8, 0),
    ("fine_tune_top_blocks.flags", 4, 4),
])
def test_freezing_recipes(workspace, flagfile, frozen, trained):
  _train(workspace, flagfile)
  model_dir = workspace / "runs" / flagfile.replace(".flags", "")
  record = _json(model_dir / "trainable_variables.json")
  assert len(record["frozen_layers"]) == frozen
  assert len(record["trainable_layers"]) == trained
  assert tf.train.latest_checkpoint(str(model_dir)).endswith("model.ckpt-4")


def test_gradual_unfreeze(workspace):
  _train(workspace, "gradual_unfreeze.flags")
  saved = _json(workspace / "runs" / "gradual_unfreeze" / "config.json")
  assert saved["freeze"]["unfreeze_schedule"] == "0:all,100:last:4,200:none"


def test_resume_after_crash(workspace):
  _train(workspace, "resume_after_crash.flags")
  model_dir = str(workspace / "runs" / "resume_after_crash")
  names = dict(tf.train.list_variables(tf.train.latest_checkpoint(model_dir)))
  assert any("ExponentialMovingAverage" in n for n in names)  # --ema_decay
  assert any("Momentum" in n for n in names)  # optimizer slots are checkpointed
  again = _train(workspace, "resume_after_crash.flags", "--max_steps=6")
  assert "to step 6" in again.stdout
  assert tf.train.latest_checkpoint(model_dir).endswith("model.ckpt-6")


def test_continue_on_new_data(workspace):
  # The previous model knows digits 0-4.
  _train(workspace, "demo.flags", "--train_data=demo_data/pretrain/train",
         "--eval_data=demo_data/pretrain/eval", "--model_dir=runs/continual_old")
  _train(workspace, "continue_on_new_data.flags")
  saved = _json(workspace / "runs" / "continual_replay" / "config.json")
  assert saved["head"]["class_names"] == [str(d) for d in range(10)]


def test_export_for_serving(workspace, demo_run):
  result = run_cli("et-export", "--flagfile=flags/export_for_serving.flags",
                   cwd=str(workspace))
  assert result.returncode == 0, result.stderr[-3000:]
  # et-train already published its best model there; et-export adds a version.
  versions = sorted(int(d) for d in os.listdir(workspace / "exports" / "demo") if d.isdigit())
  assert len(versions) >= 1
  version = workspace / "exports" / "demo" / str(versions[-1])
  assert (version / "assets.extra" / "tf_serving_warmup_requests").exists()
  signatures = tf.saved_model.load(str(version)).signatures
  assert {"serving_default", "predict", "classify", "predict_images"} <= set(signatures)


def test_cluster_job_check(workspace):
  tf_config = json.dumps({"cluster": {"chief": ["localhost:2222"],
                                      "worker": ["localhost:2223"],
                                      "ps": ["localhost:2224"]},
                          "task": {"type": "worker", "index": 0}})
  result = run_cli("et-train", "--flagfile=flags/cluster_job.flags",
                   "--model_dir=runs/cluster", "--check_cluster", cwd=str(workspace),
                   env={"TF_CONFIG": tf_config})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "worker" in (result.stdout + result.stderr)
