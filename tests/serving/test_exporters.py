"""Best/latest exporters: a restart never publishes a worse model."""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.serving import saved_model
from estimator_transfer.serving import signatures
from estimator_transfer.serving import versions
from estimator_transfer.serving import exporters
from estimator_transfer.training import early_stopping
from estimator_transfer.training import experiment as runner
from estimator_transfer.errors import ConfigError
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import tfrecords
from estimator_transfer import specs

import conftest
import serving_util


def _write_mislabelled(out_dir, count=24):
  """Eval data on which a good model scores badly: every label is shifted."""
  rng = np.random.RandomState(9)
  os.makedirs(out_dir, exist_ok=True)
  examples = [tfrecords.make_example(conftest.encode(conftest.make_image(i % 3, rng)),
                                     (i % 3 + 1) % 3) for i in range(count)]
  tfrecords.write_shards(examples, out_dir, "shifted", 1)
  labels_lib.write_labels_file(os.path.join(out_dir, "labels.txt"), conftest.CLASS_NAMES)
  return out_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data, tiny_backbone):
  root = tmp_path_factory.mktemp("exporters")
  experiment = serving_util.trained_experiment(root, tiny_data, tiny_backbone)
  return {"root": root, "experiment": experiment,
          "mislabelled": _write_mislabelled(str(root / "mislabelled"))}


def _fresh_copy(trained, tmp_path, **overrides):
  """A new Experiment on a copy of the trained model_dir (tests may train on)."""
  model_dir = str(tmp_path / "model")
  shutil.copytree(trained["experiment"].config.run.model_dir, model_dir)
  cfg = trained["experiment"].config.replace(run__model_dir=model_dir, **overrides)
  return runner.Experiment(cfg)


def _options():
  return signatures.ExportOptions(image_size=conftest.IMAGE_SIZE,
                                  serving_inputs=("image_bytes",))


def _versions(export_dir):
  return [os.path.basename(v) for v in versions.list_versions(export_dir)]


@pytest.mark.parametrize("metric, mode, expected", [
    ("accuracy", "auto", "max"), ("loss", "auto", "min"), ("mean_squared_error", "auto", "min"),
    ("auc", "auto", "max"), ("loss", "max", "max"), ("accuracy", "min", "min"),
])
def test_metric_mode(metric, mode, expected):
  assert specs.metric_mode(metric, mode) == expected


@pytest.mark.parametrize("value, best, mode, better", [
    (0.9, None, "max", True), (0.9, 0.8, "max", True), (0.8, 0.8, "max", False),
    (0.7, 0.8, "max", False), (0.2, 0.3, "min", True), (0.3, 0.3, "min", False),
    (float("nan"), None, "max", False), (float("nan"), 0.5, "min", False),
])
def test_is_better_is_strict_and_never_nan(value, best, mode, better):
  assert specs.is_better(value, best, mode) is better


def test_restarted_exporter_does_not_publish_a_worse_model(trained, tmp_path):
  experiment = trained["experiment"]
  estimator = experiment.estimator
  checkpoint = tf.train.latest_checkpoint(experiment.config.run.model_dir)
  export_dir = str(tmp_path / "serving")
  good = experiment.evaluate()
  first = exporters.maybe_export_best(estimator, export_dir, good, checkpoint, _options(),
                                      metric="loss")
  assert _versions(export_dir) == [os.path.basename(first)]
  worse = experiment.evaluate(data=trained["mislabelled"])
  assert worse["loss"] > good["loss"]
  # Each call is a fresh exporter, as after a restart: the state is on disk.
  for result in (worse, good):  # worse, then a tie: neither is published
    assert exporters.maybe_export_best(estimator, export_dir, result, checkpoint,
                                       _options(), metric="loss") is None
    assert _versions(export_dir) == [os.path.basename(first)]
  exporter = exporters.BestExporter(_options(), "loss", export_dir=export_dir)
  better = dict(good, loss=good["loss"] / 2)
  second = exporter.export(estimator, "unused", checkpoint, better, False)
  assert second and "beats" in exporter.last_decision
  assert _versions(export_dir) == [os.path.basename(first), os.path.basename(second)]
  ledger = exporters.read_ledger(export_dir)
  assert [e["value"] for e in ledger] == pytest.approx([good["loss"], good["loss"] / 2])
  assert ledger[-1]["metrics"]["accuracy"] == pytest.approx(good["accuracy"])
  # The export records what it was chosen by, for the serving team.
  assert saved_model.read_metadata(second)["eval_metrics"]["loss"] == pytest.approx(
      good["loss"] / 2)


def test_without_ledger_past_eval_results_decide(trained, tmp_path):
  experiment = _fresh_copy(trained, tmp_path)
  model_dir = experiment.config.run.model_dir
  export_dir = str(tmp_path / "serving")
  good = experiment.evaluate()  # step 6, into model_dir/eval events
  exporters.maybe_export_best(experiment.estimator, export_dir, good,
                              tf.train.latest_checkpoint(model_dir), _options(), "loss")
  os.remove(os.path.join(export_dir, exporters.LEDGER_FILENAME))
  experiment = runner.Experiment(experiment.config.replace(run__max_steps=9))
  experiment.train()
  worse = experiment.evaluate(data=trained["mislabelled"])  # step 9
  history = early_stopping.eval_history(model_dir, "loss")
  assert history[6] == pytest.approx(good["loss"]) and history[9] == pytest.approx(worse["loss"])
  before = _versions(export_dir)
  checkpoint = tf.train.latest_checkpoint(model_dir)
  assert exporters.maybe_export_best(experiment.estimator, export_dir, worse, checkpoint,
                                     _options(), "loss") is None
  assert _versions(export_dir) == before
  # Where nothing was ever published, the result is exported: it is the best
  # model that directory can have.
  empty_dir = str(tmp_path / "new_serving")
  assert exporters.maybe_export_best(experiment.estimator, empty_dir, worse, checkpoint,
                                     _options(), "loss")


def test_unknown_best_metric_names_the_choices(trained, tmp_path):
  with pytest.raises(ConfigError, match=r"--best_metric=auc is not an eval metric; "
                     r"choose one of accuracy, loss"):
    exporters.maybe_export_best(trained["experiment"].estimator, str(tmp_path / "s"),
                                {"accuracy": 0.5, "loss": 1.0, "global_step": 6},
                                "unused", _options(), metric="auc")


def test_exporters_run_inside_train_and_evaluate(trained, tmp_path):
  experiment = _fresh_copy(trained, tmp_path, run__max_steps=9,
                           export__export_dir=str(tmp_path / "serving"),
                           export__serving_inputs=("image_bytes",))
  cfg = experiment.config
  eval_spec = tf.estimator.EvalSpec(
      experiment.input_fn(cfg.input.eval_data, training=False), steps=None,
      exporters=exporters.build_exporters(cfg, experiment.image_size),
      start_delay_secs=0, throttle_secs=0)
  tf.estimator.train_and_evaluate(
      experiment.estimator,
      tf.estimator.TrainSpec(experiment.input_fn(cfg.input.train_data, training=True),
                             max_steps=9), eval_spec)
  (best,) = versions.list_versions(cfg.export.export_dir)
  latest = versions.list_versions(os.path.join(cfg.run.model_dir, "export", "latest"))
  assert latest and saved_model.read_metadata(latest[-1])["global_step"] == 9
  assert saved_model.read_metadata(best)["global_step"] == 9
  assert exporters.read_ledger(cfg.export.export_dir)[-1]["metrics"]["global_step"] == 9


def test_et_train_restart_keeps_the_better_published_model(tiny_data, tiny_backbone,
                                                           trained, tmp_path):
  model_dir, export_dir = str(tmp_path / "model"), str(tmp_path / "serving")
  common = [f"--backbone={tiny_backbone['h5']}", f"--train_data={tiny_data['train']}",
            f"--model_dir={model_dir}", f"--export_dir={export_dir}", "--freeze=none",
            "--batch_size=8", "--save_checkpoints_steps=3", "--seed=3",
            "--serving_inputs=image_bytes", "--export_latest"]
  # Evaluating every 3 steps, the loop publishes as it goes (step 3 first).
  first = serving_util.run_tool("et-train", *common, "--max_steps=6", "--eval_every_steps=3",
                                f"--eval_data={tiny_data['eval']}")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "best export:" in first.stdout
  published = _versions(export_dir)
  ledger = exporters.read_ledger(export_dir)
  assert ledger[0]["metrics"]["global_step"] == 3
  assert [str(e["version"]) for e in ledger] == published
  # The "restart": more steps, judged on data the model gets wrong.
  second = serving_util.run_tool("et-train", *common, "--max_steps=9",
                                 f"--eval_data={trained['mislabelled']}")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "best export: kept the published model: accuracy" in second.stdout
  assert _versions(export_dir) == published
  latest = versions.list_versions(os.path.join(model_dir, "export", "latest"))
  # --export_latest: every evaluated checkpoint (3, 6) and the final one (9).
  assert [saved_model.read_metadata(p)["global_step"] for p in latest] == [3, 6, 9]
  assert exporters.read_ledger(export_dir) == ledger
