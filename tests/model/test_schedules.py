"""Learning-rate schedules: hand-computed values, the graph op at its boundaries, epochs."""
import numpy as np
import pytest
import tensorflow as tf

from estimator_transfer.model import schedules
from estimator_transfer.model import training_setup
from estimator_transfer.errors import ConfigError
from estimator_transfer import specs

from transfer_helpers import checkpoint_at, train

BOUNDARIES = (10, 20)
VALUES = (0.1, 0.01, 0.001)
WARMUP = 4

# step -> rate, by hand: warmup scales 0.1 by (step + 1) / 4 for steps 0-3;
# 0.1 until step 9; 0.01 from step 10 (the boundary) to 19; 0.001 from 20.
EXPECTED = {0: 0.025, 1: 0.05, 2: 0.075, 3: 0.1, 4: 0.1, 9: 0.1, 10: 0.01, 11: 0.01,
            19: 0.01, 20: 0.001, 21: 0.001, 1000: 0.001}


@pytest.mark.parametrize("step, rate", sorted(EXPECTED.items()))
def test_piecewise_constant_hand_computed(step, rate):
  assert specs.piecewise_constant(step, BOUNDARIES, VALUES, WARMUP) == \
      pytest.approx(rate, rel=1e-12)


def test_graph_op_equals_python_at_every_boundary_step():
  with tf.Graph().as_default():
    step = tf.compat.v1.placeholder(tf.int64, [])
    rate = schedules.piecewise_constant_op(step, BOUNDARIES, VALUES, WARMUP)
    with tf.compat.v1.Session() as sess:
      for s in sorted(EXPECTED):
        assert sess.run(rate, {step: s}) == pytest.approx(EXPECTED[s], rel=1e-6), s
  assert specs.piecewise_constant(5, (), (0.3,)) == 0.3


@pytest.mark.parametrize("epochs, size, batch, step", [
    (30, 1000, 32, 938),   # 30 * 1000 / 32 = 937.5 -> the first step with >= 30 epochs
    (60, 1000, 32, 1875),  # exactly 1875.0: no extra step from float noise
    (1, 48, 8, 6),
    (0.5, 48, 8, 3),
    (2, 50, 8, 13),        # 12.5 -> 13
])
def test_epoch_boundaries_to_steps(epochs, size, batch, step):
  assert specs.epochs_to_step(epochs, specs.steps_per_epoch(size, batch)) == step


def test_resolve_boundaries_mixes_steps_and_epochs():
  assert specs.resolve_boundaries([100, "30e", "60e"], 31.25) == [100, 938, 1875]
  with pytest.raises(ConfigError, match="epoch size is unknown"):
    specs.resolve_boundaries(["30e"], None)
  with pytest.raises(ConfigError, match="strictly increasing"):
    specs.resolve_boundaries([2000, "30e"], 31.25)


@pytest.mark.parametrize("boundaries, message", [
    (("x",), "must be a positive step .* or a number of epochs"),
    ((0,), "must be a positive step"),
    (("30e", "20e"), "strictly increasing"),
])
def test_bad_boundaries_are_clear_errors(make_config, boundaries, message):
  cfg = make_config(schedule__boundaries=boundaries,
                    schedule__values=(0.1,) * (len(boundaries) + 1))
  with pytest.raises(ConfigError, match=message):
    cfg.validate()


def test_multipliers_parse_and_first_match_wins():
  parsed = specs.parse_multipliers("backbone/conv1=0, backbone/=0.1,^z{1,3}$=2e-1")
  assert parsed == [("backbone/conv1", 0.0), ("backbone/", 0.1), ("^z{1,3}$", 0.2)]
  assert specs.multiplier_for("backbone/conv1/kernel", parsed) == 0.0
  assert specs.multiplier_for("backbone/bn1/gamma", parsed) == 0.1
  assert specs.multiplier_for("head/head_logits/kernel", parsed) == 1.0
  for bad in ("backbone", "backbone/=x", "(=1", "head/=-1"):
    with pytest.raises(ConfigError, match="--lr_multipliers"):
      specs.parse_multipliers(bad)


def test_epoch_boundaries_counted_from_the_training_data(make_config):
  # tiny_data has 48 training examples, batch 8: 1 epoch = 6 steps, 1.5e = 9.
  cfg = make_config(schedule__boundaries=("1e", "1.5e"), schedule__values=(0.1, 0.0, 0.0))
  setup = training_setup.TrainingSetup(cfg)
  assert setup.lr_boundaries() == [6, 9]
  total, counts = training_setup.count_training_data(cfg)
  assert (total, counts) == (48, [16, 16, 16])
  given = training_setup.TrainingSetup(cfg.replace(schedule__train_size=16))
  assert given.lr_boundaries() == [2, 3]


def test_training_follows_an_epoch_boundary(make_config):
  # 16 examples per epoch at batch 8: lr 0.1 for steps 0-1, then 0 ("1e" = 2).
  cfg = make_config(schedule__boundaries=("1e",), schedule__values=(0.1, 0.0),
                    schedule__train_size=16, optimizer__name="sgd", freeze__spec="all",
                    run__max_steps=4, run__save_checkpoints_steps=2)
  final = train(cfg)
  at2 = checkpoint_at(cfg.run.model_dir, 2)
  np.testing.assert_array_equal(final["head_logits/kernel"], at2["head_logits/kernel"])
  at0 = checkpoint_at(cfg.run.model_dir, 0)  # saved when the session starts
  assert not np.array_equal(at0["head_logits/kernel"], at2["head_logits/kernel"])
