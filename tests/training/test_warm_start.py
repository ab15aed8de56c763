"""Warm start from a checkpoint, a model_dir or an export: every model variable equal
to the source (BatchNorm statistics and EMA too), class rows merged by name, changed
shapes skipped and recorded."""
import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.training import experiment as runner
from estimator_transfer.training import warm_start
from estimator_transfer.errors import ConfigError

from continual_helpers import (CaptureAfterRestoreHook, ckpt_path, read_checkpoint,
                               tiny_config)

EMA = "/ExponentialMovingAverage"


@pytest.fixture(scope="module")
def source(tiny_data, tiny_backbone, tmp_path_factory):
  """A trained source run (BatchNorm statistics moved, EMA on) and its export."""
  root = tmp_path_factory.mktemp("warm_source")
  cfg = tiny_config(tiny_data, tiny_backbone, root / "model", optimizer__ema_decay=0.9)
  experiment = runner.Experiment(cfg)
  experiment.train()
  export = experiment.export(export_dir=str(root / "export"))
  return {"config": cfg, "model_dir": cfg.run.model_dir, "export": export,
          "checkpoint": ckpt_path(cfg.run.model_dir, 6)}


def _warm(tiny_data, tiny_backbone, tmp_path, source_path, **overrides):
  cfg = tiny_config(tiny_data, tiny_backbone, tmp_path / "model", run__max_steps=1,
                    optimizer__ema_decay=0.9, continual__warm_start_from=source_path,
                    **overrides)
  capture = CaptureAfterRestoreHook()
  experiment = runner.Experiment(cfg)
  experiment.train(hooks=[capture])
  with open(os.path.join(cfg.run.model_dir, warm_start.RECORD_FILENAME)) as f:
    record = json.load(f)
  return cfg, capture.values, record


@pytest.mark.parametrize("kind", ["checkpoint", "model_dir", "export"])
def test_warm_start_restores_every_model_variable(tiny_data, tiny_backbone, tmp_path,
                                                  source, kind):
  path = source[kind]
  values_path = os.path.join(path, "variables", "variables") if kind == "export" \
      else source["checkpoint"]
  expected = read_checkpoint(values_path)
  # Training moved the backbone away from the pretrained file, so equality
  # below cannot come from the pretrained init_fn.
  assert not np.array_equal(expected["bn1/moving_mean"],
                            tiny_backbone["values"]["bn1/moving_mean"])
  cfg, values, record = _warm(tiny_data, tiny_backbone, tmp_path, path)
  model_vars = [n for n in expected if n != "global_step" and "/Momentum" not in n]
  assert {"conv1/kernel", "bn2/moving_variance", "head_logits/kernel"} <= set(model_vars)
  for name in model_vars:
    np.testing.assert_array_equal(values[name], expected[name], err_msg=name)
  if kind == "export":
    # An export holds no EMA shadows: they start at the source's weights.
    np.testing.assert_array_equal(values["conv1/kernel" + EMA], expected["conv1/kernel"])
    assert "conv1/kernel" + EMA in record["ema_from_source_weight"]
  else:
    assert "bn1/gamma" + EMA in record["restored"]
  # A warm start begins a new run: step 0, fresh optimizer state.
  assert values["global_step"] == 0
  assert not np.any(values["head_logits/kernel/Momentum"])
  assert "head_logits/kernel/Momentum" in record["not_warm_started_optimizer_state"]
  assert record["skipped_shape_changed"] == {} and record["reinitialized_not_in_source"] == []
  if kind == "model_dir":
    # Resuming this run must not warm-start again over its own checkpoint.
    trained = read_checkpoint(ckpt_path(cfg.run.model_dir, 1))
    capture = CaptureAfterRestoreHook()
    runner.Experiment(cfg.replace(run__max_steps=2)).train(hooks=[capture])
    np.testing.assert_array_equal(capture.values["conv1/kernel"], trained["conv1/kernel"])


def test_new_classes_keep_old_head_rows_by_name(tiny_data, tiny_backbone, tmp_path, source):
  # Old classes red, green, blue; the new model: blue, yellow, red, green (the
  # data's labels are mapped onto these names as they are read).
  names = ("blue", "yellow", "red", "green")
  _, values, record = _warm(tiny_data, tiny_backbone, tmp_path, source["model_dir"],
                            head__num_classes=4, head__class_names=names)
  old = read_checkpoint(source["checkpoint"])
  for var in ("head_logits/kernel", "head_logits/bias", "head_logits/kernel" + EMA):
    for new_i, old_j in ((0, 2), (2, 0), (3, 1)):
      np.testing.assert_array_equal(values[var][..., new_i], old[var][..., old_j],
                                    err_msg=f"{var} row {names[new_i]}")
    assert var in record["merged_class_rows"]
  # The new class's row starts fresh (Glorot kernel, zero bias).
  assert not any(np.array_equal(values["head_logits/kernel"][:, 1],
                                old["head_logits/kernel"][:, j]) for j in range(3))
  assert values["head_logits/bias"][1] == 0
  np.testing.assert_array_equal(values["conv2/kernel"], old["conv2/kernel"])


def test_changed_shapes_are_skipped_and_recorded(tiny_data, tiny_backbone, tmp_path,
                                                  source, caplog):
  caplog.set_level(logging.INFO, logger="estimator_transfer")
  _, values, record = _warm(tiny_data, tiny_backbone, tmp_path, source["model_dir"],
                            head__hidden_units=(5,))
  old = read_checkpoint(source["checkpoint"])
  assert record["skipped_shape_changed"] == {
      "head_logits/kernel": "[8, 3] -> [5, 3]",
      "head_logits/kernel" + EMA: "[8, 3] -> [5, 3]"}
  assert record["reinitialized_not_in_source"] == sorted(
      ["head_hidden_0/kernel", "head_hidden_0/bias", "head_hidden_0/kernel" + EMA,
       "head_hidden_0/bias" + EMA])
  np.testing.assert_array_equal(values["bn2/moving_mean"], old["bn2/moving_mean"])
  # Same shape, so still restored: the logits bias.
  np.testing.assert_array_equal(values["head_logits/bias"], old["head_logits/bias"])
  assert "skipped (shape changed), re-initialized: head_logits/kernel [8, 3] -> [5, 3]" \
      in caplog.text


def test_missing_or_unrelated_source_is_a_clear_error(tiny_data, tiny_backbone, tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    warm_start.resolve_source(str(tmp_path / "nowhere"))
  # A plain Keras SavedModel stores object-based names: nothing matches.
  cfg = tiny_config(tiny_data, tiny_backbone, tmp_path / "model",
                    continual__warm_start_from=tiny_backbone["saved_model"])
  with pytest.raises(ConfigError, match="shares no variable"):
    runner.Experiment(cfg).train()


# Another framework's run of the tiny CNN: its own scopes, a 5-class logits
# layer, an auxiliary tower this model lacks, an optimizer slot and a step.
_FOREIGN = {"net/block1/conv/kernel": (3, 3, 3, 4), "net/block1/conv/bias": (4,),
            "net/block1/bn/gamma": (4,), "net/block1/bn/beta": (4,),
            "net/block1/bn/moving_mean": (4,), "net/block1/bn/moving_variance": (4,),
            "net/block2/conv/kernel": (3, 3, 4, 8), "net/block2/conv/bias": (8,),
            "net/logits/kernel": (8, 5), "net/logits/bias": (5,),
            "net/aux/kernel": (8, 2), "net/block1/conv/kernel/Momentum": (3, 3, 3, 4)}
_MAP = ("net/block1/conv/=conv1/,net/block1/bn/=bn1/,net/block2/conv/=conv2/,"
        "net/logits/=head_logits/,net/aux/=aux/")


def _foreign_checkpoint(path):
  """A real TF checkpoint written under the other framework's variable names."""
  rng = np.random.RandomState(4)
  values = {name: rng.uniform(0.5, 1.5, shape).astype(np.float32)
            for name, shape in _FOREIGN.items()}
  with tf.Graph().as_default():
    variables = [tf.compat.v1.Variable(v, name=n) for n, v in values.items()]
    variables.append(tf.compat.v1.train.get_or_create_global_step())
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      prefix = tf.compat.v1.train.Saver(variables).save(sess, str(path))
  return prefix, values


def test_warm_start_map_renames_a_foreign_checkpoint_and_reports_every_variable(
    tiny_data, tiny_backbone, tmp_path, caplog):
  prefix, old = _foreign_checkpoint(tmp_path / "foreign" / "ckpt")
  with caplog.at_level(logging.INFO, logger="estimator_transfer"):
    _, values, record = _warm(tiny_data, tiny_backbone, tmp_path, prefix,
                              continual__warm_start_map=_MAP)
  pairs = {"conv1/kernel": "net/block1/conv/kernel", "conv1/bias": "net/block1/conv/bias",
           "bn1/gamma": "net/block1/bn/gamma", "bn1/moving_mean": "net/block1/bn/moving_mean",
           "bn1/moving_variance": "net/block1/bn/moving_variance",
           "conv2/kernel": "net/block2/conv/kernel", "conv2/bias": "net/block2/conv/bias"}
  for new, src in pairs.items():
    np.testing.assert_array_equal(values[new], old[src], err_msg=new)
    assert record["renamed_by_warm_start_map"][new] == src
  # EMA shadows start at the renamed source weights.
  np.testing.assert_array_equal(values["conv1/kernel" + EMA], old["net/block1/conv/kernel"])
  # Not in the source under any name: keeps its pretrained value.
  np.testing.assert_array_equal(values["bn2/gamma"], tiny_backbone["values"]["bn2/gamma"])
  assert "bn2/gamma" in record["reinitialized_not_in_source"]
  assert record["skipped_shape_changed"]["head_logits/kernel"] == "[8, 5] -> [8, 3]"
  assert record["source_not_used"] == {
      "net/logits/kernel": "shape or dtype changed (head_logits/kernel: [8, 5] -> [8, 3])",
      "net/logits/bias": "shape or dtype changed (head_logits/bias: [5] -> [3])",
      "net/aux/kernel": "renamed to aux/kernel, which this model does not have",
      "net/block1/conv/kernel/Momentum":
          "optimizer state or step (a warm start starts them fresh)",
      "global_step": "optimizer state or step (a warm start starts them fresh)"}
  assert "matched through --warm_start_map" in caplog.text
  assert "net/aux/kernel (renamed to aux/kernel" in caplog.text


@pytest.mark.parametrize("overrides,message", [
    (dict(continual__warm_start_map="net/=x/"), "set --warm_start_from too"),
    (dict(continual__warm_start_from="/some/ckpt", continual__warm_start_map="net/=,junk"),
     "entry 'junk' is not OLD_PREFIX=NEW_PREFIX"),
])
def test_warm_start_map_is_validated(tiny_data, tiny_backbone, tmp_path, overrides, message):
  cfg = tiny_config(tiny_data, tiny_backbone, tmp_path / "model", **overrides)
  with pytest.raises(ConfigError, match=message):
    cfg.validate()
  assert warm_start.parse_name_map(" a/=b/ , =c/,d=") == [("a/", "b/"), ("", "c/"), ("d", "")]
