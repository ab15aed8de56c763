"""Benchmark, ours vs Keras fit: `python scripts/benchmark.py [--quick] [--only=ROW,...]`.

Rows (scripts/bench_rows.py, scripts/bench_rows_workflow.py), each written to
docs/results/bench_<row>.json and shown in the README's Benchmark section
(`python scripts/results_tables.py --write`):

  train      frozen and full fine-tuning examples/s vs Keras fit; the
             forward-pass limit (plain TF2 tf.function, same pipeline)
  cached     --freeze=all --cache_features, 20 epochs end to end vs Keras fit
  topblock   --freeze=last:N --cache_features at 224 px, 10 epochs vs Keras fit
  eval       the demo run with --eval_every_steps vs Keras fit with
             validation_data and a checkpoint every N steps, and without
  cache      JPEG TFRecords from the second epoch with --cache=auto vs in memory
  startup    seconds from process start to the first step, and where they go
  serving    p50/p99 latency of the image-bytes export vs a Keras SavedModel
  retrain    scripts/bench_retrain.py (continuous retraining round latency)
  knobs      our examples/s with --xla, --mixed_precision, --cache=memory vs defaults

The rules that make a number hold (bench_stats): every figure comes from a
timed window of at least 20 s or 300 steps (a shorter one is marked SHORT),
repeats alternate ours, peer, ours, peer... (5 by default), each figure is the
median with its min-max, a ratio is taken per repeat. --quick runs 2 repeats
(and fewer images where a row says so); its results file says `--quick`.
A row needing a feature today's et-train refuses reports "not available".
"""
import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time

import bench_data
import bench_rows
import bench_rows_workflow
import bench_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
# pylint: disable=wrong-import-position
import results_tables
from estimator_transfer import config as config_lib

ROWS = {"train": bench_rows.row_train, "cached": bench_rows.row_cached,
        "topblock": bench_rows.row_topblock, "eval": bench_rows_workflow.row_eval,
        "cache": bench_rows_workflow.row_cache, "startup": bench_rows_workflow.row_startup,
        "serving": bench_rows_workflow.row_serving,
        "retrain": bench_rows_workflow.row_retrain, "knobs": bench_rows.row_knobs}
QUICK_REPEATS = 2


def known_flags():
  """et-train's flags and their help, from the config settings (no TensorFlow)."""
  out = {}
  for field in dataclasses.fields(config_lib.ExperimentConfig):
    for _, meta in config_lib.section_settings(field.type):
      out[meta.flag] = meta.help
  return out


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="comma-separated rows: " + ", ".join(ROWS))
  parser.add_argument("--quick", action="store_true",
                      help=f"{QUICK_REPEATS} repeats, fewer images where a row says so")
  parser.add_argument("--repeats", type=int, default=0,
                      help=f"alternating repeats (default {bench_stats.MIN_REPEATS}, "
                           f"{QUICK_REPEATS} with --quick)")
  parser.add_argument("--results_dir", default=results_tables.RESULTS_DIR,
                      help="where bench_<row>.json files go")
  args = parser.parse_args(argv)
  names = [n for n in args.only.split(",") if n] or list(ROWS)
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    parser.error(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS)}")
  if args.repeats < 0:
    parser.error(f"--repeats={args.repeats} must be positive")
  args.names = names
  args.repeats = args.repeats or (QUICK_REPEATS if args.quick else bench_stats.MIN_REPEATS)
  return args


def command_text(argv):
  """The command as it was typed, for the results file."""
  return " ".join(["python scripts/benchmark.py", *argv])


def print_table(title, table):
  print(f"\n### {title}\n")
  for line in (table.columns, ["---"] * len(table.columns), *table.rows):
    print("| " + " | ".join(str(c) for c in line) + " |")
  if table.notes:
    print(f"\n{table.notes}")


def write(name, table, args, argv, load_before, seconds):
  notes = table.notes
  notes += (f" {args.repeats} alternating repeats{' (--quick)' if args.quick else ''}; "
            f"load average (1/5/15 min) {load_before} before, {bench_stats.load_text()} "
            f"after ({seconds:.0f} s).")
  if args.repeats < bench_stats.MIN_REPEATS:
    notes += f" Fewer than {bench_stats.MIN_REPEATS} repeats: a preview, not a result."
  return results_tables.write_result(f"bench_{name}", table.columns, table.rows,
                                     command_text(argv), notes.strip(), table.data,
                                     results_dir=args.results_dir)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  os.makedirs(bench_data.SCRATCH, exist_ok=True)
  ctx = bench_rows.Context(repeats=args.repeats, quick=args.quick, flags=known_flags(),
                           work=tempfile.mkdtemp(prefix="runs_", dir=bench_data.SCRATCH),
                           log=lambda text: print(f"benchmark: {text}", flush=True))
  try:
    for name in args.names:
      load, start = bench_stats.load_text(), time.time()
      table = ROWS[name](ctx)
      seconds = time.time() - start
      print_table(f"{name} ({seconds:.0f} s, {args.repeats} repeats)", table)
      path = write(name, table, args, argv, load, seconds)
      print(f"benchmark: wrote {os.path.relpath(path, ROOT)}", flush=True)
  finally:
    shutil.rmtree(ctx.work, ignore_errors=True)
  print("benchmark: python scripts/results_tables.py --write puts the tables in README.md")


if __name__ == "__main__":
  main()
