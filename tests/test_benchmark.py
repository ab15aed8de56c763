"""The benchmark harness (scripts/benchmark.py and its bench_*.py modules), not its numbers.

Statistics and alternation by hand-computed values; the results file and the
argument handling of the driver; one tiny real run of each child kind that
times training (et-train's main, a Keras fit peer) on the tiny data. No timed
assertion: a benchmark measures speed, tests check that it measures it right.
"""
import json
import os
import sys

import pytest

from conftest import IMAGE_SIZE, ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import benchmark  # noqa: E402  # pylint: disable=wrong-import-position
import bench_rows  # noqa: E402  # pylint: disable=wrong-import-position
import bench_run  # noqa: E402  # pylint: disable=wrong-import-position
import bench_stats  # noqa: E402  # pylint: disable=wrong-import-position


def test_statistics_alternation_and_windows():
  # median of 5 values is the 3rd sorted one; the range is min-max.
  assert bench_stats.summary([3.0, 1.0, 2.0, 10.0, 4.0]) == {
      "median": 3.0, "min": 1.0, "max": 10.0, "n": 5}
  assert bench_stats.cell([352.4, 340.0, 363.9]) == "352 (340-364)"
  assert bench_stats.cell([1234.0]) == "1234" and bench_stats.cell([]) == "n/a"
  # Ratios pair the runs of one repeat: (2/1, 6/3) -> 2, 2; never median/median.
  assert bench_stats.ratios([2.0, 6.0], [1.0, 3.0]) == [2.0, 2.0]
  with pytest.raises(ValueError, match="pair"):
    bench_stats.ratios([1.0], [1.0, 2.0])
  order, lines = [], []
  runners = {name: (lambda i, n=name: order.append((i, n)) or {"x": float(i)})
             for name in ("ours", "peer")}
  results = bench_stats.alternate(runners, 3, lines.append)
  assert order == [(0, "ours"), (0, "peer"), (1, "ours"), (1, "peer"), (2, "ours"),
                   (2, "peer")]
  assert [r["x"] for r in results["peer"]] == [0.0, 1.0, 2.0] and len(lines) == 6
  assert bench_stats.window_ok(20.0, 10) and bench_stats.window_ok(3.0, 300)
  assert not bench_stats.window_ok(19.9, 299)
  assert bench_stats.window_text([{"window_s": 25.0, "window_steps": 300},
                                  {"window_s": 21.0, "window_steps": 310}]) == \
      ">= 21 s / 300 steps"
  assert bench_stats.window_text([{"window_s": 5.0, "window_steps": 40}]).endswith("(SHORT)")


def test_rows_report_a_refused_side_as_not_available():
  ours = [{"unavailable": "et-train: --cache_features needs a frozen backbone"}] * 2
  peer = [{"wall_s": 30.0, "window_s": 30.0}, {"wall_s": 34.0, "window_s": 34.0}]
  row = bench_rows.figure_row("top blocks", ours, peer, "wall_s")
  assert row[1].startswith("not available (et-train: --cache_features")
  assert row[2] == "32 (30-34)" and row[3] == "not available"
  # A crashed run is shown with its error; ratios pair only the repeats where both ran.
  row = bench_rows.figure_row("eval", [{"wall_s": 40.0}, {"failed": "RuntimeError: boom"}],
                              peer, "wall_s")
  assert row[1] == "40; 1 of 2 runs failed: RuntimeError: boom" and row[3] == "1.33"
  calls = []
  ctx = bench_rows.Context(repeats=3, quick=True, work="", flags={}, log=lambda _: None)
  results = bench_rows.run_sides(ctx, {
      "ours": lambda i: calls.append(i) or {"unavailable": "refused"},
      "peer": lambda i: {"wall_s": 1.0}})
  assert calls == [0] and len(results["ours"]) == 3  # refused once, not run again

  def crash(i):
    raise bench_run.WorkerError(f"worker failed\nTraceback ...\nValueError: bad {i}")

  results = bench_rows.run_sides(ctx, {"ours": crash})
  assert results["ours"] == [{"failed": f"ValueError: bad {i}"} for i in range(3)]


def test_arguments_results_file_and_known_flags(tmp_path):
  args = benchmark.parse_args(["--quick", "--only=train,eval"])
  assert args.names == ["train", "eval"] and args.repeats == benchmark.QUICK_REPEATS
  assert benchmark.parse_args([]).repeats == bench_stats.MIN_REPEATS
  assert benchmark.parse_args(["--repeats=7"]).repeats == 7
  for bad in (["--only=nope"], ["--repeats=-1"]):
    with pytest.raises(SystemExit) as e:
      benchmark.parse_args(bad)
    assert e.value.code == 2
  assert "eval_every_steps" in benchmark.known_flags()
  argv = ["--quick", "--only=train", f"--results_dir={tmp_path}"]
  table = bench_rows.Table(bench_rows.COLUMNS, [["m", "1", "2", "0.5", ">= 21 s"]], "n.",
                           {"ours": [1.0]})
  path = benchmark.write("train", table, benchmark.parse_args(argv), argv, "1.0/1.0/1.0", 3)
  with open(path) as f:
    saved = json.load(f)
  assert saved["name"] == "bench_train" and saved["data"] == {"ours": [1.0]}
  assert saved["command"] == "python scripts/benchmark.py " + " ".join(argv)
  assert "2 alternating repeats (--quick)" in saved["notes"] and "a preview" in saved["notes"]


def test_a_tiny_real_run_of_ours_and_of_the_keras_peer(tiny_data, tiny_backbone, tmp_path):
  os.makedirs(bench_run.SCRATCH, exist_ok=True)
  argv = bench_rows.ours_argv(tiny_data["train"], str(tmp_path / "m"), 6, freeze="all",
                              backbone=tiny_backbone["h5"], size=IMAGE_SIZE)
  ours = bench_run.run_worker({"kind": "cli", "argv": argv, "batch": 32, "warmup": 2})
  assert ours["exit_code"] == 0 and ours["steps"] == 6, ours
  # Steps 3..6 after the 2 warm-up steps: a window of 3 step intervals.
  assert ours["window_steps"] == 3 and ours["examples_per_s"] > 0
  assert 0 < ours["import_s"] < ours["first_step_s"] < ours["wall_s"]
  assert ours["graph_s"] > 0 and ours["session_s"] > 0
  keras = bench_run.run_worker({"kind": "keras", "backbone": tiny_backbone["h5"],
                                "size": IMAGE_SIZE, "freeze": "last:2", "batch": 8,
                                "data": tiny_data["train"], "steps_per_epoch": 3,
                                "epochs": 2, "warmup": 1})
  assert keras["steps"] == 6 and keras["window_steps"] == 4 and keras["first_step_s"] > 0
