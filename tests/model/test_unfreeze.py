"""Gradual unfreezing: the trainable set follows the global step, in one run and across restarts.

How it works (optimizers.build_train_op, backbone_types.ResolvedBackbone.instantiate): one graph
holds one apply step per stage, picked by tf.switch_case on the stage index
read from the global step; BatchNorm layers get a per-stage training-mode
tensor, so a layer frozen in the current stage normalizes with, and keeps,
its moving statistics.
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.errors import ConfigError
from estimator_transfer.model import model_fn as model_fn_lib

from transfer_helpers import checkpoint_at, hub_name, tf1_module, train  # noqa: F401

BACKBONE = ("conv1/kernel", "conv1/bias", "bn1/gamma", "bn1/beta", "bn1/moving_mean",
            "bn1/moving_variance", "conv2/kernel", "conv2/bias", "bn2/gamma", "bn2/beta",
            "bn2/moving_mean", "bn2/moving_variance")
FIRST = BACKBONE[:6]   # conv1, bn1
SECOND = BACKBONE[6:]  # conv2, bn2


def _same(values, reference, names):
  return {n: bool(np.array_equal(values[n], reference[n])) for n in names}


def test_stages_switch_within_one_run_and_refreezing_stops_momentum(make_config,
                                                                    tiny_backbone):
  cfg = make_config(freeze__spec="all", freeze__unfreeze_schedule="2:first:2,4:none,6:all",
                    optimizer__name="momentum", run__max_steps=8,
                    run__save_checkpoints_steps=2)
  train(cfg)
  pretrained = tiny_backbone["values"]
  at = {step: checkpoint_at(cfg.run.model_dir, step) for step in (2, 4, 6, 8)}
  # Steps 0-1, all frozen: nothing of the backbone moved, statistics included.
  assert all(_same(at[2], pretrained, BACKBONE).values())
  # Steps 2-3, first:2: conv1/bn1 still bit-identical, conv2/bn2 trained.
  assert all(_same(at[4], pretrained, FIRST).values())
  assert not any(_same(at[4], pretrained, SECOND).values())
  # Steps 4-5, none: everything trains, bn1 statistics now move too.
  assert not any(_same(at[6], at[4], FIRST).values())
  # Steps 6-7, all again: frozen although the momentum accumulators are not
  # zero; the head keeps training.
  assert all(_same(at[8], at[6], BACKBONE).values())
  assert not np.array_equal(at[8]["head_logits/kernel"], at[6]["head_logits/kernel"])


def test_stage_follows_the_global_step_across_restarts(make_config, tiny_backbone):
  cfg = make_config(freeze__spec="all", freeze__unfreeze_schedule="4:none",
                    run__max_steps=3, run__save_checkpoints_steps=100)
  first = train(cfg)
  assert first["global_step"] == 3
  assert all(_same(first, tiny_backbone["values"], BACKBONE).values())
  # The restart resumes at step 3: one more frozen step, then step 4 on trains.
  resumed = train(cfg.replace(run__max_steps=6))
  assert resumed["global_step"] == 6
  assert not any(_same(resumed, tiny_backbone["values"], BACKBONE).values())
  with open(os.path.join(cfg.run.model_dir, model_fn_lib.VARIABLES_FILENAME)) as f:
    record = json.load(f)
  assert [(s["start_step"], s["spec"]) for s in record["stages"]] == [(0, "all"), (4, "none")]
  assert record["stages"][0]["trainable"] == ["head_logits/kernel:0", "head_logits/bias:0"]


def test_hub_tf2_module_unfreezes_at_an_epoch_boundary(make_config, tiny_backbone):
  # 16 examples per epoch at batch 8: "1e" is step 2 (ceil(1 * 16 / 8)).
  cfg = make_config(backbone__handle=tiny_backbone["saved_model"], freeze__spec="all",
                    freeze__unfreeze_schedule="1e:none", schedule__train_size=16,
                    run__max_steps=4, run__save_checkpoints_steps=2)
  final = train(cfg)
  pretrained = tiny_backbone["values"]
  assert all(_same(checkpoint_at(cfg.run.model_dir, 2), pretrained, BACKBONE).values())
  # Whole module trainable from step 2: kernels train and, in training mode
  # (a stage tensor, not a Python bool), the BatchNorm statistics move.
  assert not any(_same(final, pretrained, BACKBONE).values())


def test_tf1_module_stages_switch_its_variable_sets(make_config, tf1_module):
  cfg = make_config(backbone__handle=tf1_module["path"], freeze__spec="all",
                    freeze__unfreeze_schedule="2:until:bn1", run__max_steps=4,
                    run__save_checkpoints_steps=2)
  final = train(cfg)
  exported = tf1_module["values"]
  at2 = checkpoint_at(cfg.run.model_dir, 2)

  def same(values, leaf):
    return np.array_equal(values[hub_name(values, leaf)], exported[leaf])

  assert all(same(at2, leaf) for leaf in ("conv1/kernel", "conv2/kernel", "bn2/gamma"))
  assert same(final, "conv1/kernel") and same(final, "bn1/gamma")
  assert not same(final, "conv2/kernel") and not same(final, "bn2/gamma")
  # Something is frozen in every stage: the inference variant, statistics fixed.
  assert same(final, "bn2/moving_mean") and same(final, "bn1/moving_variance")


@pytest.mark.parametrize("schedule, message", [
    ("0:all,3:regex:^nothing", "matches no layer or variable"),
    ("2e:none", "no --train_data to count; set --train_size"),
])
def test_bad_schedule_is_clear_error_when_the_train_graph_is_built(make_config, schedule,
                                                                   message):
  cfg = make_config(freeze__unfreeze_schedule=schedule, input__train_data="")
  model_fn = model_fn_lib.build_model_fn(cfg)
  with tf.Graph().as_default(), pytest.raises(ConfigError, match=message):
    model_fn({"image": tf.zeros([2, 16, 16, 3])}, tf.constant([0, 1]),
             tf.estimator.ModeKeys.TRAIN)
