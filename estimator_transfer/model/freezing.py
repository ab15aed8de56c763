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
from typing import List, Sequence, Tuple

from estimator_transfer.errors import ConfigError
from estimator_transfer import specs


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
