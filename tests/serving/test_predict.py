"""et-predict: batch inference from an export or a model_dir into CSV/JSONL."""
import csv
import json
import os
import shutil

import numpy as np
import pytest

from estimator_transfer.serving import exporters
from estimator_transfer.serving import predictor as predict
from estimator_transfer.errors import ConfigError

import conftest
import serving_util


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data, tiny_backbone):
  root = tmp_path_factory.mktemp("predict")
  experiment = serving_util.trained_experiment(root, tiny_data, tiny_backbone)
  export_dir = str(root / "serving")
  experiment.export(export_dir=export_dir)
  # A folder of photos as a batch job gets it: nested, mixed formats, one
  # corrupt file and one file that is not an image.
  photos = root / "photos"
  shutil.copytree(tiny_data["images"], photos)
  (photos / "red" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  (photos / "notes.txt").write_text("ignored")
  images, labels = serving_util.mixed_size_images()
  records = serving_util.write_records(str(root / "batch.tfrecord"), images, labels)
  return {"experiment": experiment, "export_dir": export_dir, "photos": str(photos),
          "records": records, "root": root}


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_export_predictions_equal_estimator_predict(trained):
  expected = serving_util.estimator_predict(trained["experiment"], trained["records"])
  predictor = predict.Predictor.from_saved_model(trained["export_dir"])
  try:
    rows = list(predict.predict_rows(predictor, predict.iter_items(trained["records"]),
                                     batch_size=4, top_k=2))
  finally:
    predictor.close()
  assert [r["path"] for r in rows] == [f"{trained['records']}:{i}" for i in range(6)]
  for row, want in zip(rows, expected):
    assert row["class_id"] == want["classes"]
    assert row["class"] == want["class_names"].decode()
    assert row["probability"] == pytest.approx(float(np.max(want["probabilities"])), abs=1e-6)
    order = np.argsort(-want["probabilities"])[:2]
    assert [t["class"] for t in row["top_k"]] == [conftest.CLASS_NAMES[c] for c in order]


def test_et_predict_folder_from_export_to_csv(trained, tmp_path):
  output = str(tmp_path / "out" / "predictions.csv")
  result = serving_util.run_tool("et-predict", f"--export_dir={trained['export_dir']}",
                                 f"--predict_data={trained['photos']}",
                                 f"--output={output}", "--batch_size=4", "--top_k=3")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = _read_csv(output)
  assert "et-predict: wrote 19 rows" in result.stdout and "(1 errors)" in result.stdout
  assert len(rows) == 19  # 18 images + the corrupt one; notes.txt is not an image
  (broken,) = [r for r in rows if r["error"]]
  assert broken["path"].endswith("broken.jpg") and "cannot decode image" in broken["error"]
  good = [r for r in rows if not r["error"]]
  for row in good:
    top = [t.split(":") for t in row["top_k"].split(";")]
    assert len(top) == 3 and top[0][0] == row["class"] in conftest.CLASS_NAMES
    assert float(top[0][1]) == pytest.approx(float(row["probability"]), abs=1e-6)
    assert [float(p) for _, p in top] == sorted((float(p) for _, p in top), reverse=True)
  # The images are coloured by class: a trained model gets most folders right.
  right = sum(os.path.basename(os.path.dirname(r["path"])) == r["class"] for r in good)
  assert right >= len(good) // 2
  assert not os.path.exists(output + ".tmp")
  assert os.listdir(os.path.dirname(output)) == ["predictions.csv"]  # no temporary left


def test_et_predict_model_dir_to_jsonl_matches_export(trained, tmp_path):
  output = str(tmp_path / "p.jsonl")
  model_dir = trained["experiment"].config.run.model_dir
  result = serving_util.run_tool("et-predict", f"--model_dir={model_dir}",
                                 f"--predict_data={trained['records']}",
                                 f"--output={output}", "--num_shards=2", "--shard_index=1")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(output) as f:
    rows = [json.loads(line) for line in f]
  assert [r["path"] for r in rows] == [f"{trained['records']}:{i}" for i in (1, 3, 5)]
  predictor = predict.Predictor.from_saved_model(trained["export_dir"])
  try:
    served = list(predict.predict_rows(predictor, predict.shard(
        predict.iter_items(trained["records"]), 1, 2)))
  finally:
    predictor.close()
  for row, want in zip(rows, served):
    assert row["class"] == want["class"]
    assert row["probability"] == pytest.approx(want["probability"], abs=1e-6)


def test_in_memory_checkpoint_predictor_equals_export(trained):
  experiment = trained["experiment"]
  options = exporters.export_options(experiment.config, experiment.image_size,
                                     with_warmup=False)
  predictors = [predict.Predictor.from_estimator(experiment.estimator, options,
                                                 experiment.config.head.class_names),
                predict.Predictor.from_saved_model(trained["export_dir"])]
  images, _ = serving_util.mixed_size_images()
  outputs = [p(images) for p in predictors]
  for p in predictors:
    p.close()
  np.testing.assert_allclose(outputs[0]["probabilities"], outputs[1]["probabilities"],
                             rtol=1e-6, atol=1e-7)


def test_bad_arguments_are_one_line_errors(trained, tmp_path):
  with pytest.raises(ConfigError, match="must end in .csv or .jsonl"):
    predict.output_format("out.txt")
  with pytest.raises(ConfigError, match="no images"):
    list(predict.iter_items(str(tmp_path)))
  result = serving_util.run_tool("et-predict", f"--predict_data={trained['photos']}",
                                 f"--output={tmp_path / 'x.csv'}")
  assert "give --export_dir" in serving_util.one_error_line(result, "et-predict")
  assert not os.path.exists(tmp_path / "x.csv")


def test_interrupted_write_leaves_the_previous_output(tmp_path):
  output = str(tmp_path / "p.jsonl")
  assert predict.write_predictions(iter([{"path": "a", "error": "x"}]), output) == \
      {"rows": 1, "errors": 1}
  before = open(output).read()

  def rows():
    yield {"path": "b", "class_id": 0, "class": "red", "probability": 1.0, "top_k": []}
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError, match="killed"):
    predict.write_predictions(rows(), output)
  assert open(output).read() == before and os.listdir(tmp_path) == ["p.jsonl"]
