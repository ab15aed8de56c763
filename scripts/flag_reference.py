"""Generates the README's flag reference from the flag definitions.

  python scripts/flag_reference.py           # print the markdown table
  python scripts/flag_reference.py --write   # replace the block in README.md

The block sits between `<!-- flags:start -->` and `<!-- flags:end -->`; a test
fails when README.md is out of date.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
START, END = "<!-- flags:start -->", "<!-- flags:end -->"


def render() -> str:
  """Markdown tables of every et-* flag (name, default, meaning), per module."""
  import glob  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  names = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(ROOT, "estimator_transfer", "cli", "*.py")))
  for name in names:
    module = importlib.import_module(f"estimator_transfer.cli.{name}")
    for attr in sorted(dir(module)):
      if attr.startswith("define") and attr.endswith("flags") and callable(getattr(module, attr)):
        try:
          getattr(module, attr)()
        except flags.DuplicateFlagError:
          pass  # a flag shared by several scripts is listed once
  out, seen = [], set()
  for module, module_flags in sorted(flags.FLAGS.flags_by_module_dict().items()):
    if not module.startswith("estimator_transfer"):
      continue
    rows = []
    for flag in sorted(module_flags, key=lambda f: f.name):
      if flag.name in seen:
        continue
      seen.add(flag.name)
      default = flag.default_as_str or ""
      default = default.strip("'") if default not in ("''", "None") else ""
      help_text = " ".join(flag.help.split()).replace("|", "\\|")
      rows.append(f"| `--{flag.name}` | {default} | {help_text} |")
    if rows:
      out += [f"**{module.rsplit('.', 1)[-1]}**", "", "| flag | default | meaning |",
              "|---|---|---|"] + rows + [""]
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
