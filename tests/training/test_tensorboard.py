"""TensorBoard: the event files load with TensorBoard's own reader."""
import glob
import os

from tensorboard.backend.event_processing import event_accumulator

from estimator_transfer.training import experiment as runner


def _load(path):
  acc = event_accumulator.EventAccumulator(
      path, size_guidance={event_accumulator.IMAGES: 0, event_accumulator.TENSORS: 0,
                           event_accumulator.SCALARS: 0})
  acc.Reload()
  return acc


def test_training_and_eval_summaries(make_config):
  cfg = make_config(run__max_steps=6, run__log_every_steps=3, run__save_checkpoints_steps=3)
  experiment = runner.Experiment(cfg)
  experiment.train()
  experiment.evaluate()
  model_dir = cfg.run.model_dir
  assert glob.glob(os.path.join(model_dir, "events.out.tfevents.*"))
  train = _load(model_dir)
  tags = train.Tags()
  for scalar in ("loss", "learning_rate", "examples_per_sec", "bad_records"):
    assert scalar in tags["scalars"] or scalar in tags["tensors"], (scalar, tags)
  assert "learning_rate" in tags["scalars"], tags
  lr = train.Scalars("learning_rate")
  assert lr and abs(lr[-1].value - 0.05) < 1e-6
  assert any("input_images" in t for t in tags["images"]), tags["images"]
  image = train.Images([t for t in tags["images"] if "input_images" in t][0])[-1]
  assert image.width == 16 and image.height == 16
  assert any("input_labels" in t for t in tags["tensors"]), tags["tensors"]
  # The training graph and its meta graph (written on a thread at session
  # start) for TensorBoard's graph view: the real graph, with the train op.
  assert tags["graph"] and tags["meta_graph"], tags
  nodes = {n.name for n in train.Graph().node}
  assert "global_step" in nodes and len(nodes) > 100, len(nodes)
  assert train.MetaGraph().saver_def.filename_tensor_name
  evaluation = _load(os.path.join(model_dir, "eval"))
  assert "accuracy" in evaluation.Tags()["scalars"]
  assert evaluation.Scalars("accuracy")[-1].step == 6
  # The bad-record count: exactly one tag, `bad_records`, in train and eval
  # (TensorBoard draws them on one chart); no records here are bad.
  eval_tags = evaluation.Tags()
  for where, found in (("train", tags), ("eval", eval_tags)):
    assert "bad_records" in found["scalars"], (where, found["scalars"])
    assert [t for t in found["scalars"] + found["tensors"] if "bad_records" in t] == \
        ["bad_records"], (where, found)
  assert [e.value for e in train.Scalars("bad_records")] and \
      {e.value for e in train.Scalars("bad_records")} == {0.0}
  assert evaluation.Scalars("bad_records")[-1].value == 0.0
  assert evaluation.Scalars("bad_records")[-1].step == 6
