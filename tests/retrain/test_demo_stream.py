"""scripts/demo_stream.py end to end (the `make demo-stream` script), small."""
import os
import subprocess
import sys

from conftest import ROOT


def test_demo_stream_rounds_and_a_rejected_round(demo_assets, tmp_path):
  backbone = os.path.join(demo_assets["backbone"], "keras_model.h5")
  result = subprocess.run(
      [sys.executable, "scripts/demo_stream.py", f"--work_dir={tmp_path / 'stream'}",
       f"--backbone={backbone}", "--scale=0.3",
       "--max_regression=0.1"],
      cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True,
      text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  table = [line.split() for line in result.stdout.splitlines() if line[:1].isdigit()]
  assert [row[0] for row in table] == ["1", "2", "3", "4", "5", "6"], result.stdout
  decisions = {row[0]: row for row in table}
  # The mislabeled round is rejected and the served version stays what it was.
  assert "rejected" in decisions["5"] and "(unchanged)" in decisions["5"], result.stdout
  assert "published" in decisions["1"] and "published" in decisions["6"], result.stdout
  assert "et-retrain stopped with exit code 0" in result.stdout
