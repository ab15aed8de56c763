"""Freeze specs: which backbone layers stay fixed during training.

A backbone is seen as an ordered list of layers (Keras layers with weights, or
for Hub modules the groups of variables sharing a name prefix, named by the
module's own variable names). A spec picks the frozen ones:

  all              freeze every backbone layer (feature extraction)
  none             train everything (full fine-tuning)
  first:N          freeze the first N layers that hold weights, train the rest
  last:N           train only the last N layers that hold weights
  until:<layer>    freeze every layer up to and including <layer>
  regex:<pattern>  freeze the layers whose name matches <pattern> (re.search),
                   and the single trainable variables whose name matches it
                   (e.g. regex:/gamma$ freezes only the BatchNorm scales)

A layer counts as frozen when none of its trainable variables train; frozen
layers run in inference mode (BatchNorm uses and keeps its moving statistics).

Gradual unfreezing (`parse_schedule`) switches specs at global steps:
`0:all,500:last:20,1500:none`.

Selection is by object identity on the layers, never by variable-name prefix:
in graph mode Keras variable names often carry no model prefix. Names are only
used to *read* a spec (until:, regex:), matched against each layer's own name.
"""
import dataclasses
import difflib
import re
from typing import List, Optional, Sequence, Tuple

from estimator_transfer.config import ConfigError

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


@dataclasses.dataclass
class Resolution:
  """A spec applied to a backbone's layers.

  Attributes:
    frozen_layers: per layer, whether it is frozen (runs in inference mode).
    frozen_variables: per layer, per trainable variable, whether it is frozen.
  """
  frozen_layers: List[bool]
  frozen_variables: List[List[bool]]


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
  """Turns `<epochs>e` stage starts into steps (see schedules.epochs_to_step).

  Raises:
    ConfigError: an epoch start without a known epoch size, or starts that do
      not increase.
  """
  from estimator_transfer import schedules  # pylint: disable=g-import-not-at-top
  starts = schedules.resolve_boundaries([s.start for s in stages[1:]], steps_per_epoch,
                                        flag="--unfreeze_schedule")
  return [stages[0]] + [Stage(b, s.spec) for b, s in zip(starts, stages[1:])]


def resolve(spec: FreezeSpec, layers: Sequence[Tuple[str, Sequence[str]]]
            ) -> Resolution:
  """Applies `spec` to a backbone's layers.

  Args:
    spec: a parsed spec.
    layers: in forward order, (layer name, names of its trainable variables).

  Returns:
    A Resolution.

  Raises:
    ConfigError: the spec does not fit the backbone (N too large, unknown
      layer, a regex that matches nothing).
  """
  names = [name for name, _ in layers]
  if spec.kind == "regex":
    pattern = re.compile(spec.pattern)
    frozen_vars = []
    for name, variables in layers:
      layer_hit = bool(pattern.search(name))
      frozen_vars.append([layer_hit or bool(pattern.search(v)) for v in variables])
    # A layer without trainable variables (e.g. a bare normalization) only
    # freezes when named: it has nothing else to go by.
    layer_mask = [bool(pattern.search(name)) or (bool(f) and all(f))
                  for (name, _), f in zip(layers, frozen_vars)]
    if not any(pattern.search(n) for n in names) and not any(
        any(f) for f in frozen_vars):
      examples = ", ".join(names[:3] + [v for _, vs in layers[:1] for v in vs[:1]])
      raise ConfigError(
          f"--freeze=regex:{spec.pattern} matches no layer or variable of the "
          f"backbone (names look like: {examples}); fix the pattern.")
    return Resolution(layer_mask, frozen_vars)
  mask = frozen_mask(spec, names)
  return Resolution(mask, [[f] * len(v) for f, (_, v) in zip(mask, layers)])


def frozen_mask(spec: FreezeSpec, layer_names: Sequence[str]) -> List[bool]:
  """Returns, per weighted layer (in order), whether it is frozen.

  Raises:
    ConfigError: N is larger than the number of weighted layers, or the
      until: layer does not exist. (regex: needs variable names: `resolve`.)
  """
  n = len(layer_names)
  if spec.kind == "all":
    return [True] * n
  if spec.kind == "none":
    return [False] * n
  if spec.kind == "regex":
    return resolve(spec, [(name, ()) for name in layer_names]).frozen_layers
  if spec.kind == "until":
    if spec.pattern not in layer_names:
      close = difflib.get_close_matches(spec.pattern, layer_names, n=5, cutoff=0.5)
      hint = (f"similar names: {', '.join(close)}" if close else
              f"the layers run from {layer_names[0] if n else '?'} to "
              f"{layer_names[-1] if n else '?'}")
      raise ConfigError(f"--freeze=until:{spec.pattern} names no layer with weights "
                        f"in the backbone ({hint}); use one of its layer names.")
    last = layer_names.index(spec.pattern)
    return [i <= last for i in range(n)]
  if spec.count > n:
    raise ConfigError(
        f"--freeze={spec.kind}:{spec.count} asks for {spec.count} layers but "
        f"the backbone has {n} layers with weights; use a number up to {n}.")
  if spec.kind == "first":
    return [i < spec.count for i in range(n)]
  # last:N trains only the last N layers.
  if spec.count == 0:
    raise ConfigError("--freeze=last:0 leaves nothing of the backbone trainable; "
                      "use --freeze=all for a frozen backbone.")
  return [i < n - spec.count for i in range(n)]
