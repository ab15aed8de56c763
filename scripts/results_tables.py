"""Measured tables: results files under docs/results/ and the README blocks made from them.

Every number the product measured that the README shows lives in one small
JSON file, `docs/results/NAME.json`, written by the script that measured it:

    {"name": NAME, "machine": "...", "date": "YYYY-MM-DD", "command": "...",
     "columns": [...], "rows": [[...], ...], "notes": "...", "data": {...}}

`rows` hold the cells as shown (strings); `data` holds the raw numbers. The
README shows each file between `<!-- results:NAME -->` and
`<!-- /results:NAME -->`; `--write` regenerates those blocks, `--check` (and
tests/test_results_tables.py) fails when a block and its file disagree.

    python scripts/results_tables.py --write   # after a measuring script ran
    python scripts/results_tables.py --check
"""
import argparse
import datetime
import json
import os
import platform
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "docs", "results")
README = os.path.join(ROOT, "README.md")
_BLOCK = re.compile(r"<!-- results:([\w.-]+) -->\n(.*?)<!-- /results:\1 -->", re.S)


def machine() -> str:
  """A one-line description of this machine: CPU model, cores, memory, OS."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  memory = ""
  try:
    with open("/proc/meminfo") as f:
      kib = int(f.readline().split()[1])
    memory = f", {kib / 2**20:.0f} GiB"
  except (OSError, ValueError, IndexError):
    pass
  return f"{cpu}, {os.cpu_count()} cores{memory}, {platform.system()}"


def write_result(name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                 command: str, notes: str = "", data: Optional[Dict[str, Any]] = None,
                 results_dir: str = RESULTS_DIR) -> str:
  """Writes docs/results/NAME.json (atomically) and returns its path.

  Args:
    name: the file's and the README block's name ([A-Za-z0-9_.-]).
    columns: the table's header.
    rows: one list of cells per row, as they are shown (converted with str).
    command: the command that measured it, as a user would type it.
    notes: one line shown under the table (optional).
    data: the raw numbers behind the cells (optional).
  """
  if not re.fullmatch(r"[\w.-]+", name):
    raise ValueError(f"results name {name!r}: use letters, digits, _, . and - only")
  for row in rows:
    if len(row) != len(columns):
      raise ValueError(f"results {name}: row {list(row)} has {len(row)} cells, "
                       f"the header {len(columns)}")
  result = {"name": name, "machine": machine(),
            "date": datetime.date.today().isoformat(), "command": command,
            "columns": [str(c) for c in columns],
            "rows": [[str(cell) for cell in row] for row in rows]}
  if notes:
    result["notes"] = notes
  if data is not None:
    result["data"] = data
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, f"{name}.json")
  temp = f"{path}.tmp-{os.getpid()}"
  with open(temp, "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(temp, path)
  return path


def render(result: Dict[str, Any]) -> str:
  """The README block body for one results file (a markdown table and its source)."""
  def line(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
  out = [line(result["columns"]), line(["---"] * len(result["columns"]))]
  out += [line(row) for row in result["rows"]]
  out.append("")
  if result.get("notes"):
    out += [result["notes"], ""]
  out.append(f"<sub>Measured on {result['machine']}, {result['date']}: "
             f"`{result['command']}` (docs/results/{result['name']}.json)</sub>")
  return "\n".join(out) + "\n"


def load_results(results_dir: str = RESULTS_DIR) -> Dict[str, Dict[str, Any]]:
  results = {}
  if os.path.isdir(results_dir):
    for filename in sorted(os.listdir(results_dir)):
      if filename.endswith(".json"):
        with open(os.path.join(results_dir, filename)) as f:
          result = json.load(f)
        results[result["name"]] = result
  return results


def problems(text: str, results: Dict[str, Dict[str, Any]]) -> List[str]:
  """Why the README's blocks and the results files disagree (empty: they agree)."""
  found = []
  blocks = {m.group(1): m.group(2) for m in _BLOCK.finditer(text)}
  for name, body in blocks.items():
    if name not in results:
      found.append(f"README block results:{name} has no docs/results/{name}.json")
    elif body != render(results[name]):
      found.append(f"README block results:{name} differs from docs/results/{name}.json; "
                   "run python scripts/results_tables.py --write")
  for name in results:
    if name not in blocks:
      found.append(f"docs/results/{name}.json is not shown in README.md: add "
                   f"<!-- results:{name} --> and <!-- /results:{name} --> lines")
  return found


def regenerate(text: str, results: Dict[str, Dict[str, Any]]) -> str:
  def replace(match):
    name = match.group(1)
    if name not in results:
      return match.group(0)
    return f"<!-- results:{name} -->\n{render(results[name])}<!-- /results:{name} -->"
  return _BLOCK.sub(replace, text)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--write", action="store_true", help="regenerate README blocks")
  group.add_argument("--check", action="store_true", help="exit 1 if they disagree")
  args = parser.parse_args(argv)
  with open(README) as f:
    text = f.read()
  results = load_results()
  if args.write:
    new = regenerate(text, results)
    if new != text:
      with open(README, "w") as f:
        f.write(new)
  found = problems(new if args.write else text, results)
  for problem in found:
    print(problem, file=sys.stderr)
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main())
