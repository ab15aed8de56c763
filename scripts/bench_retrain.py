"""Benchmark: et-retrain's round latency, and round cost as the history grows.

Ten rounds of the same amount of new data (digits 0-9, bundled with
scikit-learn) land one after another in a watched folder; for each round the
ledger gives the seconds from the shard's arrival to its version being
served, and the time spent training, evaluating and exporting. The steps of
a round follow the new data only (replay is mixed into the same batches), so
the training cost must stay flat while the replay pool grows.

  python scripts/bench_retrain.py [--rounds=10] [--per_round=100]

Writes docs/results/retrain_bench.json (the README block `retrain_bench`).
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=wrong-import-position
import demo_stream  # noqa: E402
import results_tables  # noqa: E402
# pylint: enable=wrong-import-position

COLUMNS = ["round", "examples seen before", "new examples", "steps", "train s", "eval s",
           "export s", "data->serving s"]


def _examples(pools, number, per_round):
  """`per_round` examples spread over all ten digits, different in every round."""
  out = []
  per_digit = per_round // 10
  for digit, pool in pools.items():
    start = (number * per_digit) % max(1, len(pool) - per_digit)
    out += [(png, digit) for png in pool[start:start + per_digit]]
  return out


def _run(args):
  work = args.work_dir
  shutil.rmtree(work, ignore_errors=True)  # the benchmark's own outputs only
  incoming, validation_dir = os.path.join(work, "incoming"), os.path.join(work, "validation")
  os.makedirs(incoming)
  pools, validation = demo_stream._split_digits()  # pylint: disable=protected-access
  demo_stream.labels_lib.write_labels_file(os.path.join(incoming, "labels.txt"),
                                           demo_stream.NAMES)
  demo_stream.labels_lib.write_labels_file(os.path.join(validation_dir, "labels.txt"),
                                           demo_stream.NAMES)
  demo_stream._write(os.path.join(validation_dir, "validation.tfrecord"), validation)  # pylint: disable=protected-access
  command = demo_stream._retrain_command(args, incoming, validation_dir)  # pylint: disable=protected-access
  command += [f"--min_new_examples={args.per_round}", "--max_regression=1"]
  log = open(os.path.join(work, "et-retrain.log"), "w")
  process = subprocess.Popen(command, cwd=demo_stream.ROOT, stdout=log,
                             stderr=subprocess.STDOUT)
  try:
    for number in range(1, args.rounds + 1):
      demo_stream._write(os.path.join(incoming, f"batch-{number:02d}.tfrecord"),  # pylint: disable=protected-access
                         _examples(pools, number, args.per_round))
      while len(demo_stream._ledger(work)) < number:  # pylint: disable=protected-access
        if process.poll() is not None:
          sys.exit(f"bench_retrain: et-retrain exited ({process.returncode})")
        time.sleep(0.2)
      print(f"bench_retrain: round {number} done", flush=True)
  finally:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
  return demo_stream._ledger(work)  # pylint: disable=protected-access


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work_dir", default="runs/bench_retrain")
  parser.add_argument("--backbone", default="demo_backbone/keras_model.h5")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--per_round", type=int, default=100)
  args = parser.parse_args()
  args.max_regression, args.epochs_per_round = 1.0, 3
  os.chdir(demo_stream.ROOT)
  demo_stream._ensure_backbone(args)  # pylint: disable=protected-access
  load_before = os.getloadavg()
  ledger = _run(args)
  load_after = os.getloadavg()
  rows, seen = [], 0
  for line in ledger:
    t = line["timings"]
    rows.append([line["round"], seen, line["new_examples"], line["steps"],
                 f"{t.get('train_secs', 0):.1f}", f"{t.get('eval_secs', 0):.1f}",
                 f"{t.get('export_secs', 0):.1f}", f"{line['data_to_serving_secs']:.1f}"])
    seen += line["new_examples"]
  for row in [COLUMNS] + rows:
    print("  ".join(str(c).ljust(10) for c in row))
  first, last = ledger[0]["timings"], ledger[-1]["timings"]
  notes = (f"training: {first.get('train_secs', 0):.1f} s in round 1, "
           f"{last.get('train_secs', 0):.1f} s in round {len(ledger)} with "
           f"{seen - ledger[-1]['new_examples']} earlier examples in the replay pool; "
           "steps follow the new data only. Load average (1/5/15 min) "
           f"{'/'.join(f'{v:.1f}' for v in load_before)} before, "
           f"{'/'.join(f'{v:.1f}' for v in load_after)} after (other programs share "
           "the machine).")
  results_tables.write_result(
      "retrain_bench", COLUMNS, rows,
      "python scripts/bench_retrain.py " + " ".join(sys.argv[1:]),
      notes=notes, data={"ledger": ledger})


if __name__ == "__main__":
  main()
