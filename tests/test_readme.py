"""README: the two commands first, and a flag reference that matches the code."""
import dataclasses
import os
import subprocess
import sys

from conftest import ROOT
from estimator_transfer.config import ExperimentConfig, section_settings
from estimator_transfer.config.settings import first_doc_line


def test_readme_opens_with_the_two_commands():
  with open(os.path.join(ROOT, "README.md")) as f:
    lines = [l.strip() for l in f.read().splitlines()]
  fence = lines.index("```")
  assert lines[fence + 1:fence + 4] == ["make demo", "make test", "```"]


def test_flag_reference_is_current():
  script = ("import sys; sys.path.insert(0, 'scripts'); import flag_reference as r; "
            "print(r.render())")
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  block = readme.split("<!-- flags:start -->")[1].split("<!-- flags:end -->")[0].strip()
  assert block == result.stdout.strip(), (
      "README.md's flag reference is stale: run python scripts/flag_reference.py --write")
  assert "`--freeze`" in block and "`--model_dir`" in block
  _assert_grouped_by_config_section(block)


def _assert_grouped_by_config_section(block):
  """One table per config section, headed by its docstring's first line."""
  groups = block.split("\n**")
  for section in dataclasses.fields(ExperimentConfig):
    section_cls = type(section.default)
    heading = f"{section.name}**: {first_doc_line(section_cls)}"
    group = next((g for g in groups if g.lstrip("*").startswith(heading)), None)
    assert group is not None, f"no README group for config section {section.name}"
    for _, meta in section_settings(section_cls):
      assert f"| `--{meta.flag}` |" in group, (section.name, meta.flag)
  assert "\n**script flags**: " in block and "| `--label_map` |" in block
