"""Generates the README's flag reference from the config fields and the scripts.

  python scripts/flag_reference.py           # print the markdown
  python scripts/flag_reference.py --write   # replace the block in README.md

The block sits between `<!-- flags:start -->` and `<!-- flags:end -->`; a test
fails when README.md is out of date. It has one table per config section (the
settings, saved in config.json; the section's docstring says what it is),
then the script flags: those of every et-* script that are not settings.
"""
import dataclasses
import glob
import importlib
import os
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

# pylint: disable=g-import-not-at-top,wrong-import-position
from estimator_transfer.cli import flags as et_flags  # noqa: E402
from estimator_transfer.config import ExperimentConfig, section_settings  # noqa: E402
from estimator_transfer.config.settings import first_doc_line  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

START, END = "<!-- flags:start -->", "<!-- flags:end -->"
_PACKAGE = "estimator_transfer"
_SHARED = f"{_PACKAGE}.cli.flags"
_TABLE = ["| flag | default | meaning |", "|---|---|---|"]


def _row(flag, default=None) -> str:
  if default is None:
    default = flag.default_as_str or ""
    default = default.strip("'") if default not in ("''", "None") else ""
  help_text = " ".join(flag.help.split()).replace("|", "\\|")
  return f"| `--{flag.name}` | {default} | {help_text} |"


def _section_tables(flag_values) -> list:
  """One table per config section, rows in field order, old names after their flag."""
  out = []
  for section in dataclasses.fields(ExperimentConfig):
    section_cls = type(section.default)
    rows = []
    for _, meta in section_settings(section_cls):
      rows.append(_row(flag_values[meta.flag]))
      rows += [_row(flag_values[old], default="") for old in meta.deprecated_flags]
    out += [f"**{section.name}**: {first_doc_line(section_cls)}", ""] + _TABLE + rows + [""]
  return out


def _script_modules() -> list:
  names = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(ROOT, _PACKAGE, "cli", "*.py")))
  return [importlib.import_module(f"{_PACKAGE}.cli.{name}") for name in names
          if name not in ("__init__", "flags")]


def _own_flags(module, flag_values) -> list:
  """The flags `module`'s define*flags functions define themselves.

  Every package flag is removed first, so that flags of the same name in
  two scripts (--num_shards, --export_dir) each show their own script's help.
  """
  for name in [f.name for mod, fl in flag_values.flags_by_module_dict().items()
               if mod.startswith(_PACKAGE) for f in fl]:
    delattr(flag_values, name)
  for attr in sorted(dir(module)):
    if attr.startswith("define") and attr.endswith("flags") and callable(getattr(module, attr)):
      try:
        getattr(module, attr)()
      except flags.DuplicateFlagError:
        pass  # defined by another define function of the same script
  return sorted(flag_values.get_flags_for_module(module.__name__), key=lambda f: f.name)


def render() -> str:
  """Markdown tables of every et-* flag (name, default, meaning)."""
  et_flags.define_flags()
  out = _section_tables(flags.FLAGS)
  setting_flags = {meta.flag for _, _, meta in et_flags.settings()}
  setting_flags |= {old for _, _, meta in et_flags.settings() for old in meta.deprecated_flags}
  shared = [f for f in sorted(flags.FLAGS.get_flags_for_module(_SHARED), key=lambda f: f.name)
            if f.name not in setting_flags]
  out += ["**script flags**: not settings: they steer one run of a script and are not "
          "saved in config.json.", "", "*et-train, et-evaluate, et-export, et-predict*", ""]
  out += _TABLE + [_row(f) for f in shared] + [""]
  for module in _script_modules():
    own = _own_flags(module, flags.FLAGS)
    if own:
      prog = "et-" + module.__name__.rsplit(".", 1)[-1].replace("_", "-")
      out += [f"*{prog}*", ""] + _TABLE + [_row(f) for f in own] + [""]
  return "\n".join(out).rstrip()


def update_readme(path: str = os.path.join(ROOT, "README.md")) -> bool:
  """Rewrites the flag block of README.md; returns True when it changed."""
  with open(path) as f:
    text = f.read()
  if START not in text or END not in text:
    raise SystemExit(f"{path} has no {START} ... {END} block")
  head, rest = text.split(START, 1)
  _, tail = rest.split(END, 1)
  new = f"{head}{START}\n{render()}\n{END}{tail}"
  if new != text:
    with open(path, "w") as f:
      f.write(new)
  return new != text


if __name__ == "__main__":
  if "--write" in sys.argv:
    print("README.md updated" if update_readme() else "README.md already up to date")
  else:
    print(render())
