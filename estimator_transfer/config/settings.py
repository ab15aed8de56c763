"""One setting, defined once: a config field that carries its flag.

A section dataclass declares each setting with `setting(...)`; the field's
metadata holds the flag name, the help text and the kind, from which
`estimator_transfer.cli` generates the absl flag, the flag -> config mapping
and the README's flag reference. Pure Python: no absl, no TensorFlow.
"""
import dataclasses
from typing import Any, Iterator, Optional, Tuple

from estimator_transfer.errors import ConfigError

# Scalar kinds map one flag value to one field value; list kinds take a
# comma-separated flag and store a tuple.
SCALAR_KINDS = ("string", "integer", "float", "bool", "enum")
LIST_KINDS = ("ints", "floats", "strings", "boundaries")
_METADATA_KEY = "setting"
_UNSET = object()


@dataclasses.dataclass(frozen=True)
class Setting:
  """How one config field appears on the command line.

  Attributes:
    flag: the flag name, without dashes.
    help: the flag's help text (also the README's "meaning" column).
    kind: one of SCALAR_KINDS or LIST_KINDS.
    choices: the allowed values of an `enum` flag.
    deprecated_flags: older names of the flag; they still work and warn.
    flag_default: the flag's default when it differs from the field's
      (e.g. None for a required flag whose field default is "").
  """
  flag: str
  help: str
  kind: str
  choices: Tuple[str, ...] = ()
  deprecated_flags: Tuple[str, ...] = ()
  flag_default: Any = _UNSET

  def default_for_flag(self, field_default: Any) -> Any:
    """The absl default: lists of strings for list kinds, else the field's."""
    if self.flag_default is not _UNSET:
      return self.flag_default
    if self.kind in LIST_KINDS:
      return [str(v) for v in field_default]
    return field_default

  def parse(self, value: Any) -> Any:
    """Converts a parsed flag value into the field's value.

    Raises:
      ConfigError: a list element is not a number of the expected type.
    """
    if self.kind == "ints":
      return _numbers(self.flag, value, int, "integers")
    if self.kind == "floats":
      return _numbers(self.flag, value, float, "numbers")
    if self.kind == "strings":
      return tuple(value)
    if self.kind == "boundaries":
      # Steps stay ints; epoch boundaries such as 30e stay strings.
      return tuple(int(v) if str(v).strip().isdigit() else str(v).strip() for v in value)
    return value


def _numbers(flag: str, values, cast, what: str) -> tuple:
  try:
    return tuple(cast(v) for v in values)
  except ValueError:
    raise ConfigError(f"--{flag}={','.join(values)} must be a comma-separated "
                      f"list of {what}.") from None


def setting(default: Any, flag: str, help: str, kind: Optional[str] = None,  # pylint: disable=redefined-builtin
            choices: Tuple[str, ...] = (), deprecated_flags: Tuple[str, ...] = (),
            flag_default: Any = _UNSET):
  """A dataclass field that is also a flag.

  Args:
    default: the field's default (a tuple for list kinds).
    flag: the flag name.
    help: the help text.
    kind: see `Setting`; inferred from `default` for str, int, float, bool.
    choices: for `enum`.
    deprecated_flags: older flag names that still work, with a warning.
    flag_default: the flag's default, when it is not the field's.

  Returns:
    A `dataclasses.field` with the `Setting` in its metadata.
  """
  if kind is None:
    kind = {bool: "bool", int: "integer", float: "float", str: "string"}[type(default)]
  if kind not in SCALAR_KINDS + LIST_KINDS:
    raise ValueError(f"unknown setting kind {kind!r} for --{flag}")
  meta = Setting(flag=flag, help=help, kind=kind, choices=tuple(choices),
                 deprecated_flags=tuple(deprecated_flags), flag_default=flag_default)
  return dataclasses.field(default=default, metadata={_METADATA_KEY: meta})


def setting_of(field: dataclasses.Field) -> Optional[Setting]:
  """The field's `Setting`, or None for a field without a flag."""
  return field.metadata.get(_METADATA_KEY)


def section_settings(section_cls) -> Iterator[Tuple[dataclasses.Field, Setting]]:
  """(field, Setting) of every flag-carrying field of a section, in field order."""
  for field in dataclasses.fields(section_cls):
    meta = setting_of(field)
    if meta is not None:
      yield field, meta


def first_doc_line(cls) -> str:
  """The first line of a class docstring (the section's one-line summary)."""
  return (cls.__doc__ or "").strip().splitlines()[0].strip()
