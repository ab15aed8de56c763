"""The README's measured tables are generated from docs/results/*.json and agree with them."""
import importlib.util
import json
import os

import pytest

from conftest import ROOT


def _tool():
  spec = importlib.util.spec_from_file_location(
      "results_tables", os.path.join(ROOT, "scripts", "results_tables.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_readme_blocks_agree_with_results_files():
  tool = _tool()
  with open(tool.README) as f:
    text = f.read()
  assert tool.problems(text, tool.load_results()) == []


def test_each_results_file_says_machine_date_and_command():
  for name, result in _tool().load_results().items():
    for key in ("machine", "date", "command", "columns", "rows"):
      assert result.get(key), (name, key)


def test_write_render_and_a_disagreement_is_found(tmp_path):
  tool = _tool()
  path = tool.write_result("demo_x", ["strategy", "accuracy"], [["scratch", "0.41"]],
                           "make demo", notes="one seed", data={"scratch": 0.4123},
                           results_dir=str(tmp_path))
  with open(path) as f:
    saved = json.load(f)
  assert saved["rows"] == [["scratch", "0.41"]] and saved["data"] == {"scratch": 0.4123}
  results = tool.load_results(str(tmp_path))
  text = "intro\n<!-- results:demo_x -->\nold\n<!-- /results:demo_x -->\nend\n"
  assert len(tool.problems(text, results)) == 1  # stale block
  new = tool.regenerate(text, results)
  assert "| scratch | 0.41 |" in new and "make demo" in new and new.endswith("end\n")
  assert tool.problems(new, results) == []
  edited = new.replace("0.41", "0.52")
  assert any("differs" in p for p in tool.problems(edited, results))
  assert any("not shown" in p for p in tool.problems("no blocks\n", results))


def test_a_row_of_the_wrong_width_is_refused(tmp_path):
  with pytest.raises(ValueError, match="2 cells"):
    _tool().write_result("x", ["a"], [["1", "2"]], "cmd", results_dir=str(tmp_path))
