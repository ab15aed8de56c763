"""Learning-rate schedules: one pure-Python function and its graph op twin.

Convention (the same in both): with boundaries [b0, b1, ...] and values
[v0, v1, v2, ...], the rate is v0 for steps < b0, v1 for b0 <= step < b1, and
so on; the new value applies *at* the boundary step. A linear warmup, when
set, scales the rate by (step + 1) / warmup_steps for step < warmup_steps, so
the very first update already moves the weights.

Boundaries may be given in epochs (`30e`): with E examples per epoch and batch
size B, epoch boundary e becomes the first step s with s * B >= e * E, i.e.
ceil(e * E / B) (the input repeats before batching, so batches straddle
epochs and an epoch is E / B steps, not a whole number).

Discriminative learning rates (`parse_multipliers`): `REGEX=FACTOR,...` scales
the rate of the variables whose qualified name (`backbone/<variable>` or
`head/<variable>`) matches REGEX (re.search; the first matching entry wins).
"""
import bisect
import math
import re
from typing import List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from estimator_transfer.config import ConfigError

Boundary = Union[int, str]
_EPOCHS_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)e$")
_MULTIPLIER_RE = re.compile(r"(.+?)=([-+0-9.eE]+)\s*(?:,\s*|$)", re.S)


# The op's name; the summary keeps the plain tag "learning_rate" (an op of that
# name would push the summary tag to "learning_rate_1").
LEARNING_RATE_OP = "current_learning_rate"


def piecewise_constant(step: int, boundaries: Sequence[int],
                       values: Sequence[float], warmup_steps: int = 0) -> float:
  """Learning rate at `step`, in pure Python (the reference for the graph op).

  Args:
    step: global step (0-based: the step about to be taken).
    boundaries: strictly increasing steps at which the next value starts.
    values: one more value than boundaries.
    warmup_steps: length of the linear warmup; 0 for none.

  Returns:
    The learning rate as a float.
  """
  rate = float(values[bisect.bisect_right(list(boundaries), step)])
  if warmup_steps and step < warmup_steps:
    rate *= (step + 1) / warmup_steps
  return rate


def piecewise_constant_op(global_step, boundaries: Sequence[int],
                          values: Sequence[float], warmup_steps: int = 0):
  """Graph op twin of `piecewise_constant`; returns a float32 scalar tensor."""
  step = tf.cast(global_step, tf.int64)
  values_t = tf.constant([float(v) for v in values], tf.float32)
  index = stage_index_op(step, boundaries)
  rate = tf.gather(values_t, index)
  if warmup_steps:
    frac = tf.minimum(tf.cast(step + 1, tf.float32) / float(warmup_steps), 1.0)
    rate = rate * frac
  return tf.identity(rate, name=LEARNING_RATE_OP)


def stage_index_op(global_step, boundaries: Sequence[int]):
  """int32 index of the interval of `boundaries` that `global_step` is in."""
  if not boundaries:
    return tf.constant(0, tf.int32)
  step = tf.cast(global_step, tf.int64)
  bounds = tf.constant([int(b) for b in boundaries], tf.int64)
  return tf.reduce_sum(tf.cast(step >= bounds, tf.int32))


def parse_boundary(value: Boundary) -> Tuple[str, float]:
  """`500` -> ("steps", 500); `"30e"` -> ("epochs", 30.0).

  Raises:
    ConfigError: neither a positive step nor `<number>e`.
  """
  text = str(value).strip()
  if text.isdigit() and int(text) > 0:
    return "steps", int(text)
  match = _EPOCHS_RE.match(text)
  if match and float(match.group(1)) > 0:
    return "epochs", float(match.group(1))
  raise ConfigError(f"--lr_boundaries value {text!r} must be a positive step "
                    "(e.g. 500) or a number of epochs (e.g. 30e).")


def check_boundaries(boundaries: Sequence[Boundary]) -> None:
  """Validates boundaries as far as possible without knowing the epoch size.

  Raises:
    ConfigError: a malformed value, or same-unit values that do not increase.
  """
  parsed = [parse_boundary(b) for b in boundaries]
  for unit in ("steps", "epochs"):
    same = [v for u, v in parsed if u == unit]
    if any(a >= b for a, b in zip(same, same[1:])):
      raise ConfigError(f"--lr_boundaries must be strictly increasing, got "
                        f"{list(boundaries)}.")


def needs_epoch_size(boundaries: Sequence[Boundary]) -> bool:
  """Whether any boundary is given in epochs."""
  return any(parse_boundary(b)[0] == "epochs" for b in boundaries)


def epochs_to_step(epochs: float, steps_per_epoch: float) -> int:
  """First step at which `epochs` epochs have been consumed.

  ceil(epochs * steps_per_epoch), computed so that float noise on exact
  products (30 * 31.25 = 937.5000000001) does not add a step.
  """
  return int(math.ceil(round(epochs * steps_per_epoch, 6)))


def steps_per_epoch(train_size: int, batch_size: int) -> float:
  """E / B: an epoch in (fractional) steps."""
  return train_size / float(batch_size)


def resolve_boundaries(boundaries: Sequence[Boundary],
                       steps_per_epoch_value: Optional[float],
                       flag: str = "--lr_boundaries") -> List[int]:
  """Turns step/epoch boundaries into strictly increasing steps.

  Args:
    boundaries: ints (steps) or `"<epochs>e"` strings.
    steps_per_epoch_value: E / B, or None when unknown.
    flag: the flag named in errors.

  Returns:
    Steps, in the given order.

  Raises:
    ConfigError: epochs without a known epoch size, or the result does not
      strictly increase.
  """
  steps = []
  for value in boundaries:
    unit, amount = parse_boundary(value)
    if unit == "epochs":
      if not steps_per_epoch_value:
        raise ConfigError(f"{flag} uses epochs ({value}) but the epoch size is "
                          "unknown; set --train_size or give --train_data to count.")
      steps.append(epochs_to_step(amount, steps_per_epoch_value))
    else:
      steps.append(int(amount))
  if any(a >= b for a, b in zip(steps, steps[1:])) or any(s <= 0 for s in steps):
    raise ConfigError(f"{flag}={','.join(map(str, boundaries))} gives the steps "
                      f"{steps}, which must be positive and strictly increasing.")
  return steps


def parse_multipliers(text: str) -> List[Tuple[str, float]]:
  """Parses `--lr_multipliers=REGEX=FACTOR,...`.

  Args:
    text: e.g. `backbone/=0.1,head/=1`; empty for none.

  Returns:
    [(regex, factor)] in the given order.

  Raises:
    ConfigError: malformed entry, invalid regex or negative factor.
  """
  text = (text or "").strip()
  out, pos = [], 0
  while pos < len(text):
    match = _MULTIPLIER_RE.match(text, pos)
    try:
      factor = float(match.group(2)) if match else None
    except ValueError:
      factor = None
    if factor is None:
      raise ConfigError(f"--lr_multipliers={text} must look like REGEX=FACTOR,... "
                        "e.g. backbone/=0.1,head/=1.")
    pattern = match.group(1).strip()
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"--lr_multipliers: {pattern!r} is not a valid regular "
                        f"expression ({e}); fix the pattern.") from e
    if factor < 0:
      raise ConfigError(f"--lr_multipliers: the factor for {pattern!r} must not be "
                        f"negative, got {factor}.")
    out.append((pattern, factor))
    pos = match.end()
  return out


def multiplier_for(name: str, multipliers: Sequence[Tuple[str, float]]) -> float:
  """The factor of the first entry whose regex matches `name`; 1.0 if none."""
  for pattern, factor in multipliers:
    if re.search(pattern, name):
      return factor
  return 1.0
