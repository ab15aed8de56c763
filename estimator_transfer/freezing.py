"""Freeze specs: which backbone layers stay fixed during training.

A backbone is seen as an ordered list of layers (Keras layers, or for Hub
modules the groups of variables sharing a name prefix). A spec picks the
frozen ones:

  all        freeze every backbone layer (feature extraction)
  none       train everything (full fine-tuning)
  first:N    freeze the first N layers that hold weights, train the rest
  last:N     train only the last N layers that hold weights

Selection is by object identity on the layers, never by variable-name prefix:
in graph mode Keras variable names often carry no model prefix.
"""
import dataclasses
import re
from typing import List, Sequence

from estimator_transfer.config import ConfigError

_SPEC_RE = re.compile(r"^(all|none|first:\d+|last:\d+)$")


@dataclasses.dataclass(frozen=True)
class FreezeSpec:
  kind: str  # all | none | first | last
  count: int = 0


def parse_spec(spec: str) -> FreezeSpec:
  """Parses a freeze spec string.

  Raises:
    ConfigError: the spec is not one of the supported forms.
  """
  spec = (spec or "").strip()
  if not _SPEC_RE.match(spec):
    raise ConfigError(
        f"--freeze={spec!r} is not a freeze spec; use all, none, first:N "
        "(freeze the first N layers) or last:N (train only the last N layers).")
  if ":" in spec:
    kind, count = spec.split(":")
    return FreezeSpec(kind, int(count))
  return FreezeSpec(spec)


def frozen_mask(spec: FreezeSpec, layer_names: Sequence[str]) -> List[bool]:
  """Returns, per weighted layer (in order), whether it is frozen.

  Raises:
    ConfigError: N is larger than the number of weighted layers.
  """
  n = len(layer_names)
  if spec.kind == "all":
    return [True] * n
  if spec.kind == "none":
    return [False] * n
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
