"""The library never reads absl flags: only estimator_transfer/cli may import them."""
import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "estimator_transfer")


def _imports_absl_flags(tree) -> bool:
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      if any(a.name == "absl.flags" or a.name.startswith("absl.flags.") for a in node.names):
        return True
    if isinstance(node, ast.ImportFrom):
      if node.module == "absl" and any(a.name == "flags" for a in node.names):
        return True
      if node.module and node.module.startswith("absl.flags"):
        return True
  return False


def test_only_cli_imports_absl_flags():
  offenders, checked = [], 0
  for root, _, files in os.walk(PACKAGE):
    rel = os.path.relpath(root, PACKAGE)
    if rel == "cli" or rel.startswith("cli" + os.sep):
      continue
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        with open(path) as f:
          checked += 1
          if _imports_absl_flags(ast.parse(f.read(), path)):
            offenders.append(os.path.relpath(path, PACKAGE))
  assert checked >= 10
  assert not offenders, f"absl.flags imported outside cli/: {offenders}"


def test_detector_catches_both_import_forms():
  assert _imports_absl_flags(ast.parse("from absl import flags"))
  assert _imports_absl_flags(ast.parse("import absl.flags"))
  assert not _imports_absl_flags(ast.parse("from absl import logging"))
