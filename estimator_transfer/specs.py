"""TF-free parsers and enums of the settings (a leaf: pure Python).

Everything `config.validate()` needs to check a setting without building a
graph lives here, so validating a config never imports TensorFlow:

- freeze specs and gradual-unfreezing schedules (`parse_spec`,
  `parse_schedule`; applied to a backbone's layers by `model.freezing`),
- learning-rate boundaries in steps or epochs, and per-variable multipliers
  (`resolve_boundaries`, `parse_multipliers`; `piecewise_constant` is the
  pure-Python reference of `model.schedules.piecewise_constant_op`),
- class weights, value ranges, flip modes and metric modes.

Schedule convention: with boundaries [b0, b1, ...] and values [v0, v1, ...],
the rate is v0 for steps < b0, v1 for b0 <= step < b1, and so on; the new
value applies *at* the boundary step. A linear warmup scales the rate by
(step + 1) / warmup_steps for step < warmup_steps, so the very first update
already moves the weights. An epoch boundary `30e`, with E examples per epoch
and batch size B, becomes ceil(30 * E / B).
"""
import bisect
import dataclasses
import math
import re
from typing import List, Optional, Sequence, Tuple, Union

from estimator_transfer.errors import ConfigError

# --- enums -------------------------------------------------------------------

# Input value ranges; the input pipeline always yields RGB floats in [0, 1].
VALUE_RANGES = ("zero_one", "minus_one_one", "zero_255", "caffe", "torch")

FLIP_MODES = ("none", "horizontal", "vertical", "both")

# --metric_mode values.
METRIC_MODES = ("auto", "max", "min")


def metric_mode(metric: str, mode: str = "auto") -> str:
  """`max` or `min`: whether a bigger `metric` is better.

  `auto` is `min` for losses and errors (names containing "loss", "error",
  "mse", "mae"), `max` for everything else (accuracy, auc, precision...).
  """
  if mode in ("max", "min"):
    return mode
  lowered = metric.lower()
  return "min" if any(k in lowered for k in ("loss", "error", "mse", "mae")) else "max"


def is_better(value: float, best: Optional[float], mode: str) -> bool:
  """Strictly better than `best` (None: nothing to beat); NaN never is."""
  if value is None or math.isnan(value):
    return False
  if best is None:
    return True
  return value > best if mode == "max" else value < best


# --- freeze specs ------------------------------------------------------------

_SPEC_RE = re.compile(r"^(all|none|first:\d+|last:\d+|until:.+|regex:.+)$", re.S)


# A schedule entry starts at a step ("500") or an epoch count ("2e", "0.5e").
_ENTRY_SPLIT_RE = re.compile(r",\s*(?=\d+(?:\.\d+)?e?:)")


_ENTRY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?e?):(.+)$", re.S)


_SPEC_HELP = ("use all, none, first:N (freeze the first N layers), last:N (train "
              "only the last N layers), until:<layer> (freeze up to and including "
              "that layer) or regex:<pattern> (freeze matching layers/variables)")


@dataclasses.dataclass(frozen=True)
class FreezeSpec:
  """A parsed freeze spec."""
  kind: str  # all | none | first | last | until | regex
  count: int = 0
  pattern: str = ""

  def __str__(self) -> str:
    if self.kind in ("first", "last"):
      return f"{self.kind}:{self.count}"
    if self.kind in ("until", "regex"):
      return f"{self.kind}:{self.pattern}"
    return self.kind


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a freeze plan: `spec` applies from global step `start`."""
  start: object  # int step, or "<epochs>e" before `resolve_plan_steps`
  spec: FreezeSpec


def parse_spec(spec: str) -> FreezeSpec:
  """Parses a freeze spec string.

  Args:
    spec: e.g. `all`, `first:3`, `until:block_5_add`, `regex:^block_1[0-6]`.

  Returns:
    A FreezeSpec.

  Raises:
    ConfigError: the spec is not one of the supported forms, or its regex does
      not compile.
  """
  spec = (spec or "").strip()
  if not _SPEC_RE.match(spec):
    raise ConfigError(f"--freeze={spec!r} is not a freeze spec; {_SPEC_HELP}.")
  if ":" not in spec:
    return FreezeSpec(spec)
  kind, rest = spec.split(":", 1)
  if kind in ("first", "last"):
    return FreezeSpec(kind, int(rest))
  if kind == "regex":
    try:
      re.compile(rest)
    except re.error as e:
      raise ConfigError(f"--freeze=regex:{rest} is not a valid regular expression "
                        f"({e}); fix the pattern.") from e
  return FreezeSpec(kind, pattern=rest)


def parse_schedule(text: str, base: str = "all") -> List[Stage]:
  """Parses `--unfreeze_schedule` into stages, the first starting at step 0.

  Args:
    text: `STEP:SPEC,...` with increasing STEPs (ints, or `<epochs>e`); empty
      for no schedule.
    base: the `--freeze` spec, used before the first scheduled step.

  Returns:
    Stages in order; one stage (`base` from step 0) when `text` is empty.

  Raises:
    ConfigError: an entry is malformed or the steps do not increase.
  """
  stages = [Stage(0, parse_spec(base))]
  text = (text or "").strip()
  if not text:
    return stages
  for entry in _ENTRY_SPLIT_RE.split(text):
    match = _ENTRY_RE.match(entry)
    if not match:
      raise ConfigError(
          f"--unfreeze_schedule entry {entry.strip()!r} must look like STEP:SPEC, "
          "e.g. 0:all,500:last:20,1500:none.")
    try:
      spec = parse_spec(match.group(2).strip())
    except ConfigError as e:
      if "not a freeze spec" not in str(e):
        raise
      raise ConfigError(f"--unfreeze_schedule entry {entry.strip()!r} must look like "
                        f"STEP:SPEC; {_SPEC_HELP}.") from None
    start = match.group(1)
    start = start if start.endswith("e") else int(start)
    if start in (0, "0e"):
      stages[0] = Stage(0, spec)
    else:
      stages.append(Stage(start, spec))
  steps = [s.start for s in stages]
  if all(isinstance(s, int) for s in steps) and any(
      a >= b for a, b in zip(steps, steps[1:])):
    raise ConfigError(f"--unfreeze_schedule={text}: the steps {steps[1:]} must be "
                      "positive and strictly increasing.")
  return stages


def resolve_plan_steps(stages: Sequence[Stage], steps_per_epoch: Optional[float]
                       ) -> List[Stage]:
  """Turns `<epochs>e` stage starts into steps (see `epochs_to_step`).

  Raises:
    ConfigError: an epoch start without a known epoch size, or starts that do
      not increase.
  """
  starts = resolve_boundaries([s.start for s in stages[1:]], steps_per_epoch,
                                        flag="--unfreeze_schedule")
  return [stages[0]] + [Stage(b, s.spec) for b, s in zip(starts, stages[1:])]


# --- learning-rate schedules -------------------------------------------------

Boundary = Union[int, str]


_EPOCHS_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)e$")


_MULTIPLIER_RE = re.compile(r"(.+?)=([-+0-9.eE]+)\s*(?:,\s*|$)", re.S)


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


# --- class weights -----------------------------------------------------------

BALANCED = "balanced"


def parse_class_weights(text: str, num_classes: int = 0
                        ) -> Union[None, str, List[float]]:
  """Parses `--class_weights`: empty, `balanced`, or one weight per class.

  Raises:
    ConfigError: not numbers, negative, or the wrong count.
  """
  text = (text or "").strip()
  if not text:
    return None
  if text.lower() == BALANCED:
    return BALANCED
  try:
    weights = [float(w) for w in text.split(",")]
  except ValueError:
    raise ConfigError(f"--class_weights={text} must be 'balanced' or one number "
                      "per class, e.g. 1,1,4.") from None
  if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
    raise ConfigError(f"--class_weights={text} must be non-negative with at least "
                      "one positive weight.")
  if num_classes and len(weights) != num_classes:
    raise ConfigError(f"--class_weights has {len(weights)} weights for "
                      f"{num_classes} classes; give one weight per class.")
  return weights
