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

`resolve` and `frozen_mask` apply one spec to (name, variable names) pairs;
`resolve_stages`, `stage_variables` and `union_trainable` apply a whole freeze
plan (one spec per unfreeze stage) to a backbone's `LayerGroup`s and hand back
the variable objects themselves.
"""
import dataclasses
import difflib
import re
from typing import List, Optional, Sequence, Tuple

from estimator_transfer.errors import ConfigError
from estimator_transfer import specs


@dataclasses.dataclass
class LayerGroup:
  """One freezable unit of a backbone, in forward order."""
  name: str
  variables: list
  layer: object = None  # the Keras layer, when there is one
  trainable_variables: Optional[list] = None  # those a freeze spec may train


@dataclasses.dataclass
class StageVariables:
  """The backbone's trainable set during one stage of a freeze plan."""
  start: int  # first global step of the stage
  spec: str
  frozen: List[bool]  # per group: frozen (inference mode) in this stage
  trainable_variables: list


@dataclasses.dataclass
class Resolution:
  """A spec applied to a backbone's layers.

  Attributes:
    frozen_layers: per layer, whether it is frozen (runs in inference mode).
    frozen_variables: per layer, per trainable variable, whether it is frozen.
  """
  frozen_layers: List[bool]
  frozen_variables: List[List[bool]]


def resolve(spec: specs.FreezeSpec, layers: Sequence[Tuple[str, Sequence[str]]]
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


def frozen_mask(spec: specs.FreezeSpec, layer_names: Sequence[str]) -> List[bool]:
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


def var_name(var) -> str:
  """A variable's name without the `:0` output suffix (what specs match)."""
  name = var.name
  return name[:-2] if name.endswith(":0") else name


def resolve_stages(stages: Sequence[specs.Stage], groups: Sequence[LayerGroup]
                   ) -> List[Resolution]:
  """Applies every stage's spec to the groups (by their own names).

  A group's `trainable_variables` may hold variables or, before the module is
  built (TF1 Hub), their names.
  """
  names = [(g.name, [var_name(v) if not isinstance(v, str) else v
                     for v in g.trainable_variables or []]) for g in groups]
  return [resolve(stage.spec, names) for stage in stages]


def stage_variables(stages: Sequence[specs.Stage], resolved: Sequence[Resolution],
                    groups: Sequence[LayerGroup]) -> List[StageVariables]:
  """Per stage, the variables of `groups` that train in it."""
  out = []
  for stage, r in zip(stages, resolved):
    variables = [v for g, flags in zip(groups, r.frozen_variables)
                 for v, frozen in zip(g.trainable_variables or [], flags) if not frozen]
    out.append(StageVariables(int(stage.start), str(stage.spec), list(r.frozen_layers),
                              variables))
  return out


def union_trainable(resolved: Sequence[Resolution], groups: Sequence[LayerGroup]) -> list:
  """Variables trained in at least one stage, in group order."""
  out = []
  for i, g in enumerate(groups):
    for j, v in enumerate(g.trainable_variables or []):
      if any(not r.frozen_variables[i][j] for r in resolved):
        out.append(v)
  return out
