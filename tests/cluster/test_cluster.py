"""TF_CONFIG parsing and checks, platform conventions, bool forms, exit codes."""
import errno
import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import ROOT, run_cli
from estimator_transfer.cluster import roles
from estimator_transfer.cluster import tf_config as cluster
from estimator_transfer.training import experiment as experiment_lib
from estimator_transfer.training import loop
from estimator_transfer.training import run_config as run_config_lib
from estimator_transfer.cli import common
from estimator_transfer.errors import ConfigError

CLUSTER = {"chief": ["h0:2222"], "worker": ["h1:2222", "h2:2222"], "ps": ["h3:2222"]}


def tf_config(task_type, index=0, cluster_spec=None, **extra):
  return json.dumps(dict({"cluster": CLUSTER if cluster_spec is None else cluster_spec,
                          "task": {"type": task_type, "index": index}}, **extra))


@pytest.mark.parametrize("task_type, index, chief, trains, num_trainers", [
    ("chief", 0, True, True, 3),
    ("worker", 1, False, True, 3),
    ("ps", 0, False, False, 3),
    ("evaluator", 0, False, False, 3),
])
def test_roles(task_type, index, chief, trains, num_trainers):
  task = cluster.parse_tf_config(tf_config(task_type, index))
  assert (task.task_type, task.index) == (task_type, index)
  assert (task.is_chief, task.trains, task.num_trainers, task.num_ps) == (
      chief, trains, num_trainers, 1)
  assert "evaluator" not in task.cluster


def test_evaluator_listed_in_cluster_is_dropped_from_what_estimator_sees():
  spec = dict(CLUSTER, evaluator=["h9:2222"])
  task = cluster.parse_tf_config(tf_config("worker", 0, spec))
  assert task.dropped_evaluator and "evaluator" not in task.tf_config()["cluster"]
  assert task.tf_config()["task"] == {"type": "worker", "index": 0}


def test_lone_chief_is_local_and_no_tf_config_is_local():
  assert cluster.parse_tf_config(tf_config("chief", 0, {"chief": ["h0:1"]})).is_local
  assert cluster.current_task({}).is_local
  assert not cluster.tf_config_present({"TF_CONFIG": " {} "})
  assert cluster.tf_config_present({"TF_CONFIG": tf_config("ps")})


@pytest.mark.parametrize("text, message", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (tf_config("worker", 0, {}), "TF_CONFIG has no 'cluster'"),
    (tf_config("boss"), "task type 'boss' is not one of"),
    (tf_config("worker", -1), "must be a non-negative integer"),
    (tf_config("worker", 2), "worker index 2 is out of range: the cluster lists 2"),
    (tf_config("evaluator", 1), "Estimator runs one evaluator, with index 0"),
    (tf_config("worker", 0, {"chief": ["h0:1"], "gpu": ["h1:1"]}), "job 'gpu' is unknown"),
    (tf_config("worker", 0, {"chief": ["h0:1"], "worker": ["h1"]}), "'h1' of job 'worker' is not host:port"),
    (tf_config("worker", 0, {"chief": ["h0:1"], "worker": ["h0:1"]}), "listed for both chief and worker"),
    (tf_config("worker", 0, {"worker": ["h1:1"], "ps": ["h2:1"]}), "has no chief task(s)"),
    (tf_config("worker", 0, {"chief": ["h0:1", "h1:1"], "worker": ["h2:1"]}), "has 2 chief task(s)"),
    (tf_config("worker", 0, {"chief": ["h0:1"], "master": ["h1:1"]}), "both a chief and a master"),
    (tf_config("evaluator", 0, dict(CLUSTER, evaluator=["a:1", "b:1"])), "several evaluator"),
])
def test_bad_tf_config_is_one_clear_sentence(text, message):
  with pytest.raises(ConfigError) as e:
    cluster.current_task({"TF_CONFIG": text})
  assert message in str(e.value)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec, distribution, message", [
    ({"chief": ["h0:1"], "worker": ["h1:1"]}, "none", "add ps tasks, or use"),
    ({"chief": ["h0:1"], "worker": ["h1:1"]}, "parameter_server", "needs ps tasks"),
    (CLUSTER, "multi_worker_mirrored", "remove the ps tasks"),
    (CLUSTER, "mirrored", "is for one machine"),
    ({"master": ["h0:1"], "worker": ["h1:1"]}, "multi_worker_mirrored", "'master' job"),
])
def test_distribution_must_fit_the_cluster(spec, distribution, message):
  task = cluster.parse_tf_config(tf_config("worker", 0, spec))
  with pytest.raises(ConfigError, match=message):
    cluster.check(task, distribution, "gs://bucket/run")


@pytest.mark.parametrize("spec, distribution", [
    (CLUSTER, "none"), (CLUSTER, "parameter_server"),
    ({"chief": ["h0:1"], "worker": ["h1:1"]}, "multi_worker_mirrored"),
])
def test_fitting_distributions_pass(spec, distribution):
  task = cluster.parse_tf_config(tf_config("worker", 0, spec))
  assert cluster.check(task, distribution, "gs://bucket/run") == []


def test_model_dir_must_agree_and_local_dirs_on_many_hosts_warn():
  task = cluster.parse_tf_config(tf_config("worker", 0, model_dir="gs://b/run"))
  assert cluster.check(task, "none", "gs://b/run/") == []
  with pytest.raises(ConfigError, match="TF_CONFIG's model_dir gs://b/run differs"):
    cluster.check(task, "none", "/tmp/other")
  plain = cluster.parse_tf_config(tf_config("worker", 0))
  (warning,) = cluster.check(plain, "none", "/tmp/run")
  assert "local path but the cluster spans 4 hosts" in warning


def test_tf_config_env_shows_the_normalised_config_then_restores():
  original = tf_config("worker", 1, dict(CLUSTER, evaluator=["h9:1"]))
  environ = {"TF_CONFIG": original}
  task = cluster.current_task(environ)
  with cluster.tf_config_env(task, environ):
    seen = json.loads(environ["TF_CONFIG"])
    assert "evaluator" not in seen["cluster"] and seen["task"]["index"] == 1
  with cluster.tf_config_env(cluster.Task(), environ):
    assert "TF_CONFIG" not in environ
  assert environ["TF_CONFIG"] == original


@pytest.mark.parametrize("task_type, filters", [
    ("chief", ["/job:ps", "/job:chief"]),
    ("worker", ["/job:ps", "/job:worker/task:1"]),
])
def test_session_config_filters_devices_and_shares_them_with_functions(task_type, filters):
  task = cluster.parse_tf_config(tf_config(task_type, 1 if task_type == "worker" else 0))
  config = cluster.session_config(task, "none", intra_op_threads=2)
  assert list(config.device_filters) == filters
  assert config.experimental.share_cluster_devices_in_session
  assert config.intra_op_parallelism_threads == 2
  local = cluster.session_config(cluster.Task(), "none")
  assert not local.device_filters and not local.experimental.share_cluster_devices_in_session


def test_platform_fallbacks_first_set_wins_and_only_defined_flags():
  environ = {"AIP_MODEL_DIR": "gs://b/model", "SM_MODEL_DIR": "/opt/ml/model",
             "AIP_CHECKPOINT_DIR": "gs://b/ckpt", "AIP_TENSORBOARD_LOG_DIR": "gs://b/tb",
             "SM_CHANNEL_TRAINING": "/opt/ml/input/data/training",
             "SM_CHANNEL_VALIDATION": "/opt/ml/input/data/validation"}
  args = cluster.platform_fallback_args(environ)
  assert args == ["--model_dir=gs://b/ckpt", "--export_dir=gs://b/model",
                  "--summary_dir=gs://b/tb", "--train_data=/opt/ml/input/data/training",
                  "--eval_data=/opt/ml/input/data/validation"]
  assert cluster.platform_fallback_args({"SM_MODEL_DIR": "/opt/ml/model"},
                                        defined=["export_dir"]) == ["--export_dir=/opt/ml/model"]
  assert cluster.platform_fallback_args(environ, defined=["max_steps"]) == []


@pytest.mark.parametrize("argv, expected", [
    (["--export_features", "True", "--max_steps", "5"], ["--export_features=true", "--max_steps", "5"]),
    (["--export_features", "false"], ["--export_features=false"]),
    (["--export_features", "yes"], ["--export_features=true"]),
    (["--export_features=True"], ["--export_features=True"]),
    (["--export_features", "--max_steps=5"], ["--export_features", "--max_steps=5"]),
    (["--model_dir", "True"], ["--model_dir", "True"]),  # not a boolean flag
])
def test_sagemaker_bool_form_is_joined_for_boolean_flags_only(argv, expected):
  assert cluster.join_bool_values(argv, ["export_features"]) == expected


@pytest.mark.parametrize("error, transient", [
    (tf.errors.UnavailableError(None, None, "ps unreachable"), True),
    (tf.errors.DeadlineExceededError(None, None, "slow"), True),
    (tf.errors.AbortedError(None, None, "aborted"), True),
    (ConnectionResetError("reset"), True),
    (OSError(errno.ETIMEDOUT, "timed out"), True),
    (FileNotFoundError(errno.ENOENT, "missing"), False),
    (tf.errors.InvalidArgumentError(None, None, "bad"), False),
    (ConfigError("bad flag"), False),
])
def test_transient_errors_are_recognised(error, transient):
  assert common.is_transient(error) == transient
  assert common.EXIT_TRANSIENT >= 128 > common.EXIT_CONFIG_ERROR == 1


def test_transient_failure_exits_retryable_with_one_line(tmp_path):
  script = ("from estimator_transfer.cli import common\n"
            "import tensorflow as tf\n"
            "def main(argv):\n"
            "  raise tf.errors.UnavailableError(None, None, 'Socket closed by ps-0')\n"
            "common.run_main('et-x', lambda: None, main)\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode == common.EXIT_TRANSIENT, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      "et-x: transient error: Socket closed by ps-0; exiting 138")


def test_check_cluster_with_platform_env_and_sagemaker_bools(tiny_data, tiny_backbone,
                                                             tmp_path):
  env = {"TF_CONFIG": tf_config("worker", 1),
         "SM_MODEL_DIR": str(tmp_path / "sm_model"),
         "AIP_CHECKPOINT_DIR": str(tmp_path / "from_env"),
         "SM_CHANNEL_TRAINING": tiny_data["train"]}
  model_dir = tmp_path / "given"
  result = run_cli("et-train", "--check_cluster", f"--backbone={tiny_backbone['h5']}",
                   f"--model_dir={model_dir}",  # the command line beats AIP_CHECKPOINT_DIR
                   "--export_features", "True", "--max_steps", "30", env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  assert "this task: worker 1 at h2:2222" in out
  assert "asynchronous between-graph replication, variables on 1 ps" in out
  assert "trains until global step 30; no checkpoints" in out
  assert f"model_dir: {model_dir}" in out and "local path but the cluster spans" in out
  assert not model_dir.exists()  # checked, not trained
  chief = run_cli("et-train", "--check_cluster", f"--backbone={tiny_backbone['h5']}",
                  env=dict(env, TF_CONFIG=tf_config("chief")))
  assert chief.returncode == 0, chief.stderr[-2000:]
  assert f"model_dir: {tmp_path / 'from_env'}" in chief.stdout  # AIP_CHECKPOINT_DIR
  assert f"exports to {tmp_path / 'sm_model'} at the end" in chief.stdout  # SM_MODEL_DIR


def test_bad_tf_config_exits_1_with_one_line(tiny_data, tiny_backbone, tmp_path):
  result = run_cli("et-train", f"--backbone={tiny_backbone['h5']}",
                   f"--train_data={tiny_data['train']}", f"--model_dir={tmp_path / 'm'}",
                   env={"TF_CONFIG": tf_config("worker", 0, {"worker": ["h1:1"]})})
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      "et-train: error: TF_CONFIG's cluster has no chief task(s)")
  assert not (tmp_path / "m").exists()


def test_cluster_flagfile_and_job_specs_fit_et_train(tiny_data, tiny_backbone, tmp_path):
  for spec in ("docs/tfjob.yaml", "docs/vertex_job.yaml"):
    with open(os.path.join(ROOT, spec)) as f:
      assert "flags/cluster_job.flags" in f.read(), spec
  # The flagfile as a chief of a TFJob-shaped cluster would read it.
  result = run_cli("et-train", "--flagfile=flags/cluster_job.flags", "--check_cluster",
                   f"--backbone={tiny_backbone['saved_model']}",
                   f"--train_data={tiny_data['train']}", f"--eval_data={tiny_data['eval']}",
                   f"--model_dir={tmp_path / 'm'}", env={"TF_CONFIG": tf_config("chief")})
  assert result.returncode == 0, result.stderr[-2000:]
  assert "distribution: none: asynchronous between-graph replication" in result.stdout
  assert "trains until global step 300" in result.stdout


def test_local_train_and_evaluate_with_mirrored_strategy(make_config):
  """--distribution=mirrored without TF_CONFIG: in-graph replication, the one loop."""
  cfg = make_config(cluster__distribution="mirrored", cluster__eval_throttle_secs=0,
                    guards__eval_every_steps=2)
  run_config = run_config_lib.build_run_config(cfg, cluster.Task())
  assert isinstance(run_config.train_distribute, tf.compat.v1.distribute.MirroredStrategy)
  assert run_config.save_checkpoints_steps == cfg.run.save_checkpoints_steps
  # The one RunConfig builder: no graph.pbtxt / .meta per checkpoint, locally
  # and in every cluster role.
  assert run_config_lib.build_run_config(cfg)._checkpoint_save_graph_def is False
  assert run_config._checkpoint_save_graph_def is False
  experiment = experiment_lib.Experiment(cfg)
  outcome = loop.TrainingLoop(experiment, cluster.Task()).run()
  assert outcome.role == "local" and outcome.local_steps == cfg.run.max_steps
  assert outcome.global_step == cfg.run.max_steps
  assert outcome.metrics["global_step"] == cfg.run.max_steps  # the final checkpoint
  assert outcome.last_eval["step"] == cfg.run.max_steps
  # The per-task step record is a cluster file: a local run writes none.
  assert outcome.record == ""
  assert not os.path.exists(os.path.join(cfg.run.model_dir, roles.TASKS_DIRNAME))


def test_cluster_refuses_restore_best_at_start_up(tiny_data, tiny_backbone, tmp_path):
  """What a cluster cannot do is one sentence at start-up, before anything is written."""
  model_dir = tmp_path / "m"
  result = run_cli("et-train", f"--backbone={tiny_backbone['h5']}",
                   f"--train_data={tiny_data['train']}", f"--eval_data={tiny_data['eval']}",
                   f"--model_dir={model_dir}", "--early_stopping_metric=loss",
                   "--regression_tolerance=0.5", env={"TF_CONFIG": tf_config("chief")})
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "et-train: error: --regression_tolerance restores the best checkpoint in "
      "single-machine runs only; drop it for a cluster (TF_CONFIG) job.")
  assert not model_dir.exists()


@pytest.mark.parametrize("task_type, flags, message", [
    ("evaluator", {"eval_data": ""}, "the evaluator task needs --eval_data."),
    ("worker", {"train_data": ""}, "--train_data is required for the worker task."),
    ("ps", {"regression_tolerance": 1.0}, "--regression_tolerance restores"),
    ("chief", {"regression_tolerance": 1.0}, "--regression_tolerance restores"),
])
def test_role_refusals_from_a_real_tf_config(make_config, task_type, flags, message):
  task = cluster.parse_tf_config(tf_config(task_type))
  cfg = make_config(**{("guards__" if k == "regression_tolerance" else "input__") + k: v
                       for k, v in flags.items()})
  with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
    roles.check_role(task, cfg)
  roles.check_role(cluster.Task(), cfg)  # a local run does all of it


def test_evaluator_role_records_its_evaluations(make_config):
  """The evaluator task through the one loop, from a real TF_CONFIG, in-process."""
  cfg = make_config()
  experiment_lib.Experiment(cfg).train()  # what the chief left: model.ckpt-6
  task = cluster.parse_tf_config(tf_config("evaluator"))
  outcome = loop.TrainingLoop(experiment_lib.Experiment(cfg), task).run()
  assert outcome.role == "evaluator-0" and outcome.local_steps == 0
  assert outcome.metrics["global_step"] == cfg.run.max_steps and outcome.step == 6
  with open(outcome.record) as f:
    record = json.load(f)
  assert record["final"] and record["last"] == outcome.metrics
  assert record["evaluations"] == 1
  assert os.path.exists(os.path.join(cfg.run.model_dir, "eval_results.json"))
