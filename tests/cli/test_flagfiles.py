"""Every flagfile in flags/ runs on the demo data, as the README tells users.

The flagfiles use paths relative to the checkout (demo_data/, demo_backbone/,
runs/, exports/); the tests run them from a workspace that has those, with
only the run length shortened on the command line.
"""
import ast
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


def _runners_of(flagfile):
  """Tests and fixtures of this module that name `flagfile` (decorators included)."""
  with open(__file__) as f:
    tree = ast.parse(f.read())
  names = []
  for node in tree.body:
    if not isinstance(node, ast.FunctionDef) or node.name == "test_every_flagfile_is_covered":
      continue
    is_fixture = any("fixture" in ast.dump(d) for d in node.decorator_list)
    strings = [n.value for n in ast.walk(node)
               if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    if (node.name.startswith("test_") or is_fixture) and any(
        s == flagfile or f"flags/{flagfile}" in s for s in strings):
      names.append(node.name)
  return names


def test_every_flagfile_is_covered():
  # Whatever flags/ holds (a new flagfile included) must be run by a test here.
  flagfiles = sorted(f for f in os.listdir(os.path.join(ROOT, "flags"))
                     if f.endswith(".flags"))
  assert len(flagfiles) >= 8, flagfiles
  untested = [f for f in flagfiles if not _runners_of(f)]
  assert not untested, f"no test in {__file__} runs {untested}"


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
  exports = workspace / "exports" / "demo"

  def versions():
    return sorted(int(d) for d in os.listdir(exports) if d.isdigit())

  # et-train already published its best model there; et-export adds one
  # version, newer than all, and keeps at most --exports_to_keep=5.
  before = versions()
  assert before, "et-train --flagfile=flags/demo.flags published no version"
  result = run_cli("et-export", "--flagfile=flags/export_for_serving.flags",
                   cwd=str(workspace))
  assert result.returncode == 0, result.stderr[-3000:]
  after = versions()
  new = sorted(set(after) - set(before))
  assert len(new) == 1 and new[0] > before[-1] and after[-1] == new[0], (before, after)
  assert len(after) == min(len(before) + 1, 5), (before, after)
  version = exports / str(new[0])
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
  lines = [line.strip() for line in result.stdout.splitlines()]
  # What only a worker's check prints: its task, and a trainer's plan without
  # the chief's duties (max_steps=300 and distribution=none from the flagfile).
  assert lines[0] == "et-train --check_cluster: TF_CONFIG: ok", lines
  assert "this task: worker 0 at localhost:2223" in lines, lines
  assert "will: trains until global step 300; no checkpoints, summaries or exports " \
      "(the chief's job)" in lines, lines
  assert any(line.startswith("distribution: none:") for line in lines), lines
  assert not (workspace / "runs" / "cluster").exists()  # a check writes nothing
