"""The transfer-learning strategies of the user stories side by side (what `make demo` runs).

Each strategy is one `et-train` run on the same data (demo_data/finetune: a few
images per class of digits 5-9), with the same head, optimizer, step budget
and --seed; they differ only in what the pretrained demo backbone (digits 0-4)
contributes and what trains:

  from scratch          the same architecture with random weights
  feature extraction    backbone frozen, head trained from cached features
  fine-tune top blocks  the last blocks train at 0.1x the head's rate
  full fine-tune        everything trains, the backbone at 0.1x
  gradual unfreezing    head only, then the top blocks, then everything

Every run evaluates every --eval_every steps; the curves and the best run's
confusion matrix go to <out_dir>/strategies.png, the table to stdout and to
docs/results/demo.json (README block `results:demo`).

Usage: python scripts/demo_strategies.py [--seeds=3] [--quick]
"""
import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import results_tables  # noqa: E402  (scripts/results_tables.py)
import tensorflow as tf  # noqa: E402

from estimator_transfer.evaluation import plots  # noqa: E402
from estimator_transfer.training import early_stopping  # noqa: E402

tf.get_logger().setLevel("ERROR")  # no deprecation notes between the demo's lines

NEXT_COMMAND = ("et-prepare-data --image_dir=~/photos --output_dir=data "
                "--validation_percent=10 --test_percent=10")


@dataclasses.dataclass(frozen=True)
class Strategy:
  name: str      # the table's row
  key: str       # its model_dir under --runs_dir
  flags: tuple   # what it adds to the common flags ({cache}, {a}, {b} filled in)


STRATEGIES = (
    Strategy("from scratch (random weights)", "scratch",
             ("--backbone_weights=none", "--freeze=none")),
    Strategy("feature extraction (frozen, cached)", "feature_extraction",
             ("--freeze=all", "--cache_features={cache}")),
    Strategy("fine-tune top blocks, backbone lr x0.1", "top_blocks",
             ("--freeze=last:4", "--lr_multipliers=backbone/=0.1")),
    Strategy("full fine-tune, backbone lr x0.1", "full_fine_tune",
             ("--freeze=none", "--lr_multipliers=backbone/=0.1")),
    Strategy("gradual unfreezing (all, last:4, none)", "gradual_unfreezing",
             ("--unfreeze_schedule=0:all,{a}:last:4,{b}:none",
              "--lr_multipliers=backbone/=0.1")),
)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="demo_data")
  parser.add_argument("--backbone_dir", default="demo_backbone")
  parser.add_argument("--runs_dir", default="runs/demo_strategies")
  parser.add_argument("--out_dir", default="demo", help="where strategies.png goes")
  parser.add_argument("--results_dir", default="",
                      help="where demo.json goes (default docs/results; --quick: out_dir)")
  parser.add_argument("--seed", type=int, default=1, help="first seed")
  parser.add_argument("--seeds", type=int, default=1, help="seeds to run (spread min-max)")
  parser.add_argument("--max_steps", type=int, default=30)
  parser.add_argument("--eval_every", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--jobs", type=int, default=1,
                      help="seeds trained at the same time (their seconds then include the "
                      "others' load)")
  parser.add_argument("--quick", action="store_true",
                      help="a few steps only (tests): checks the plumbing, not the numbers")
  args = parser.parse_args(argv)
  if args.quick:
    args.max_steps, args.eval_every = 4, 2
  if args.seeds < 1 or args.max_steps < 1 or args.eval_every < 1:
    parser.error("--seeds, --max_steps and --eval_every must be positive")
  return args


def _model_dir(args, strategy: Strategy, seed: int) -> str:
  return os.path.join(args.runs_dir, f"seed{seed}", strategy.key)


def _flags(args, strategy: Strategy, seed: int) -> List[str]:
  model_dir = _model_dir(args, strategy, seed)
  fill = {"cache": os.path.join(args.runs_dir, "feature_cache"),
          "a": max(1, args.max_steps // 4), "b": max(2, args.max_steps // 2)}
  return [
      f"--backbone={args.backbone_dir}/keras_model.h5",
      f"--train_data={args.data_dir}/finetune/train",
      f"--eval_data={args.data_dir}/finetune/eval",
      f"--model_dir={model_dir}", "--export_dir=",
      "--optimizer=momentum", "--momentum=0.9", f"--lr_values={args.lr}",
      f"--batch_size={args.batch_size}", f"--max_steps={args.max_steps}",
      f"--eval_every_steps={args.eval_every}", f"--save_checkpoints_steps={args.eval_every}",
      f"--log_every_steps={args.eval_every}", f"--seed={seed}",
      *(flag.format(**fill) for flag in strategy.flags)]


def _trained_parameters(model_dir: str) -> int:
  """Parameters trained in some stage, counted from the checkpoint's shapes."""
  with open(os.path.join(model_dir, "trainable_variables.json")) as f:
    names = [n.split(":")[0] for n in json.load(f)["trained_in_some_stage"]]
  shapes = dict(tf.train.list_variables(model_dir))
  return int(sum(np.prod(shapes[n]) for n in names if n in shapes))


def _children_cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def run_strategy(args, strategy: Strategy, seed: int) -> Dict:
  """Trains one strategy with one seed; returns its numbers and eval curve."""
  cmd = [sys.executable, "-m", "estimator_transfer.cli.train", *_flags(args, strategy, seed)]
  model_dir = _model_dir(args, strategy, seed)
  shutil.rmtree(model_dir, ignore_errors=True)  # the demo's own output only
  start, cpu = time.monotonic(), _children_cpu()
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  seconds, cpu = time.monotonic() - start, _children_cpu() - cpu
  if result.returncode:
    sys.exit(f"demo: {strategy.name} failed (exit {result.returncode}):\n"
             f"$ et-train {' '.join(cmd[3:])}\n{result.stderr[-3000:]}")
  rates = [float(r) for r in re.findall(r"([\d.]+) examples/s", result.stderr + result.stdout)]
  with open(os.path.join(model_dir, "eval_results.json")) as f:
    report = json.load(f)
  curve = sorted(early_stopping.eval_history(model_dir, "accuracy").items())
  print(f"demo: seed {seed} {strategy.name:40s} accuracy {report['accuracy']:.3f} "
        f"({seconds:.0f} s)", flush=True)
  return {"accuracy": float(report["accuracy"]), "seconds": seconds, "cpu_seconds": cpu,
          "examples_per_s": float(np.median(rates)) if rates else None,
          "parameters": _trained_parameters(model_dir), "curve": curve,
          "report": report, "model_dir": model_dir}


def _cell(values: Sequence[float], fmt: str) -> str:
  """One number, or mean and spread `0.912 (0.90-0.93)` over seeds."""
  if len(values) == 1:
    return format(values[0], fmt)
  return f"{format(np.mean(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def summarise(runs: Dict[str, List[Dict]]):
  """The table (columns, rows), the best transfer strategy and the gain per seed."""
  columns = ["strategy", "accuracy", "train s", "examples/s", "trained parameters"]
  rows = []
  for strategy in STRATEGIES:
    results = runs[strategy.key]
    rates = [r["examples_per_s"] for r in results if r["examples_per_s"]]
    rows.append([strategy.name, _cell([r["accuracy"] for r in results], ".3f"),
                 _cell([r["seconds"] for r in results], ".0f"),
                 _cell(rates, ".0f") if rates else "-",
                 f"{results[0]['parameters']:,}"])
  transfer = [s for s in STRATEGIES if s.key != "scratch"]
  best = max(transfer, key=lambda s: np.mean([r["accuracy"] for r in runs[s.key]]))
  gains = [b["accuracy"] - s["accuracy"] for b, s in zip(runs[best.key], runs["scratch"])]
  return columns, rows, best, gains


def _print_table(columns, rows) -> None:
  widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
  for row in [columns, ["-" * w for w in widths], *rows]:
    print("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths))))


def write_picture(args, runs, best: Strategy) -> str:
  """demo/strategies.png: every strategy's eval curve (first seed) and best's matrix."""
  curves = {s.name: runs[s.key][0]["curve"] for s in STRATEGIES}
  report = runs[best.key][0]["report"]
  png = plots.strategies_png(
      curves, np.asarray(report["confusion_matrix"]), report["class_names"],
      f"validation accuracy, digits 5-9, seed {args.seed}",
      f"{best.name}\n{plots.confusion_title(report['accuracy'], report.get('global_step'))}")
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, "strategies.png")
  with open(path, "wb") as f:
    f.write(png)
  return path


def run(args) -> List[str]:
  """Trains every strategy for every seed, prints the table, writes picture and results.

  Returns:
    The closing lines (where the pictures are, what to run next), for the caller
    to print last.
  """
  os.chdir(ROOT)
  # A fresh feature cache: the first feature-extraction run pays for it, as a
  # user's first run would; later seeds train from it.
  shutil.rmtree(os.path.join(args.runs_dir, "feature_cache"), ignore_errors=True)
  seeds = list(range(args.seed, args.seed + args.seeds))
  with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
    per_seed = list(pool.map(
        lambda seed: [run_strategy(args, strategy, seed) for strategy in STRATEGIES], seeds))
  runs = {s.key: [results[i] for results in per_seed] for i, s in enumerate(STRATEGIES)}
  columns, rows, best, gains = summarise(runs)
  seed_text = f"seeds {seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"
  title = (f"Digits 5-9 from {_count_images(os.path.join(args.data_dir, 'images', 'train'))} "
           f"training images, backbone pretrained on digits 0-4, {args.max_steps} steps of "
           f"batch {args.batch_size}, {seed_text}")
  gain = (f"best transfer strategy ({best.name}) beats scratch by "
          f"{_cell([100 * g for g in gains], '+.1f')} accuracy points")
  print(f"\n{title}:")
  _print_table(columns, rows)
  print(f"  {gain}{' (mean (min-max) over the seeds)' if len(seeds) > 1 else ''}")
  picture = write_picture(args, runs, best)
  results = _write_results(args, columns, rows, seeds, runs, gains, f"{title}; {gain}.")
  return [f"Results: {results} (README block: python scripts/results_tables.py --write)",
          f"Pictures: {picture} (accuracy curves + confusion matrix of the best); per run "
          f"{args.runs_dir}/seed{seeds[0]}/<strategy>/confusion_matrix.png; "
          f"tensorboard --logdir={args.runs_dir}",
          "Next, on your own images (one sub-folder per class), start the tour:",
          f"  {NEXT_COMMAND}"]


def main(argv=None) -> None:
  for line in run(parse_args(argv)):
    print(line)


def _count_images(folder: str) -> int:
  return sum(len(files) for _, _, files in os.walk(folder))


def _write_results(args, columns, rows, seeds, runs, gains, notes) -> str:
  """docs/results/demo.json (--quick: into out_dir); returns its path."""
  results_dir = args.results_dir or (args.out_dir if args.quick else results_tables.RESULTS_DIR)
  command = "make demo" if len(seeds) == 1 else f"python scripts/demo.py --seeds={len(seeds)}"
  if args.jobs > 1:
    command += f" --jobs={args.jobs}"
  if args.quick:
    command = "python scripts/demo.py --quick"
  data = {"seeds": seeds, "jobs": args.jobs, "max_steps": args.max_steps,
          "batch_size": args.batch_size,
          "gain_points": [100 * g for g in gains],
          "accuracy": {k: [r["accuracy"] for r in v] for k, v in runs.items()},
          "seconds": {k: [r["seconds"] for r in v] for k, v in runs.items()},
          # Children's CPU time is per process, not per thread: exact with --jobs=1 only.
          "cpu_seconds": {k: [r["cpu_seconds"] for r in v] for k, v in runs.items()}
                         if args.jobs == 1 else None,
          "load_average_1min": os.getloadavg()[0]}
  path = results_tables.write_result("demo", columns, rows, command, notes=notes, data=data,
                                     results_dir=results_dir)
  return os.path.relpath(path, ROOT)


if __name__ == "__main__":
  main()
