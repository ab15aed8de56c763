"""`make demo-stream`: the served model keeps learning while digits arrive.

et-retrain watches a folder; this script plays the data producer, writing
TFRecord shards of scikit-learn's bundled digits into it round by round
(each shard under a temporary name, then renamed, as a producer should):

  1. digits 0-4            the first model
  2. digits 5-6            new classes: the head grows by name
  3. digits 7-8            new classes
  4. digit 9               a new class
  5. 0-9, mislabeled       every label shifted by one: must be rejected
  6. 0-9, more of the same

and prints the round table from et-retrain's ledger: old/new-class accuracy
of champion and challenger, the decision, the published TF Serving version
and the seconds from a shard's arrival to its model being served. The
validation data (a fixed 30% of every digit) is the same in every round.

  python scripts/demo_stream.py [--work_dir=runs/demo_stream] [--write_results]
"""
import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=wrong-import-position
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
import tensorflow as tf  # noqa: E402

from estimator_transfer.data import labels as labels_lib  # noqa: E402
from estimator_transfer.data import tfrecords  # noqa: E402
import results_tables  # noqa: E402
# pylint: enable=wrong-import-position

NAMES = [str(d) for d in range(10)]
# (digits, share of each digit's training pool, mislabeled)
ROUNDS = [((0, 1, 2, 3, 4), (0.0, 0.5), False), ((5, 6), (0.0, 0.5), False),
          ((7, 8), (0.0, 0.5), False), ((9,), (0.0, 0.5), False),
          (tuple(range(10)), (0.5, 0.6), True), (tuple(range(10)), (0.6, 0.75), False)]
COLUMNS = ["round", "data", "new", "steps", "champion old", "challenger old",
           "challenger new", "decision", "version", "data->serving s"]


def _png(pixels, size=16) -> bytes:
  gray = Image.fromarray(np.uint8(np.clip(pixels * 16.0, 0, 255)), "L")
  buf = io.BytesIO()
  gray.resize((size, size), Image.BILINEAR).convert("RGB").save(buf, format="PNG")
  return buf.getvalue()


def _split_digits():
  """{digit: [png]} training pools and the fixed validation examples."""
  digits = load_digits()
  pools, validation = {d: [] for d in range(10)}, []
  for index, (pixels, digit) in enumerate(zip(digits.images, digits.target)):
    if index % 10 < 3:
      validation.append((_png(pixels), int(digit)))
    else:
      pools[int(digit)].append(_png(pixels))
  return pools, validation


def _write(path: str, examples) -> None:
  """A TFRecord shard under a temporary name, then renamed into place."""
  temp = path + ".tmp"
  with tf.io.TFRecordWriter(temp) as writer:
    for encoded, label in examples:
      writer.write(tfrecords.make_example(encoded, label).SerializeToString())
  os.replace(temp, path)


def _round_examples(pools, digits, share, wrong, scale=1.0):
  out = []
  for d in digits:
    pool = pools[d]
    start = int(share[0] * len(pool))
    chosen = pool[start:start + int(scale * (share[1] - share[0]) * len(pool))]
    out += [(png, (d + 1) % 10 if wrong else d) for png in chosen]
  return out


def _retrain_command(args, incoming, validation_dir):
  work = args.work_dir
  return [os.path.join(os.path.dirname(sys.executable), "et-retrain"),
          f"--train_data={incoming}", f"--eval_data={validation_dir}",
          f"--model_dir={work}/model", f"--export_dir={work}/export",
          f"--backbone={args.backbone}", "--freeze=none", "--optimizer=momentum",
          "--momentum=0.9", "--lr_values=0.02", "--batch_size=32", "--shuffle_buffer=512",
          "--save_checkpoints_steps=100", "--log_every_steps=100", "--seed=1",
          "--min_new_examples=10", f"--epochs_per_round={args.epochs_per_round}",
          "--replay_ratio=0.5",
          f"--max_regression={args.max_regression}", "--settle_secs=1", "--poll_secs=0.5"]


def _ensure_backbone(args) -> None:
  if os.path.exists(args.backbone):
    return
  for cmd in ([sys.executable, "scripts/make_demo_data.py", "--output_dir=demo_data"],
              [sys.executable, "scripts/make_demo_backbone.py", "--data_dir=demo_data",
               "--output_dir=demo_backbone"]):
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def _ledger(work) -> list:
  path = os.path.join(work, "model", "ledger.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _feed(args, process, pools, incoming) -> None:
  for number, (digits, share, wrong) in enumerate(ROUNDS, start=1):
    examples = _round_examples(pools, digits, share, wrong, args.scale)
    what = f"digits {digits[0]}-{digits[-1]}" if len(digits) > 1 else f"digit {digits[0]}"
    print(f"demo-stream: round {number}: writing {len(examples)} examples of {what}"
          f"{' (mislabeled)' if wrong else ''}", flush=True)
    _write(os.path.join(incoming, f"batch-{number:02d}.tfrecord"), examples)
    deadline = time.monotonic() + args.round_timeout
    while len(_ledger(args.work_dir)) < number:
      if process.poll() is not None:
        sys.exit(f"demo-stream: et-retrain exited ({process.returncode}) in round {number}")
      if time.monotonic() > deadline:
        sys.exit(f"demo-stream: round {number} took over {args.round_timeout} s")
      time.sleep(0.2)


def _cell(value) -> str:
  return "-" if value is None else f"{value:.3f}"


def table(ledger) -> list:
  rows = []
  for line, (digits, _, wrong) in zip(ledger, ROUNDS):
    challenger, champion = line.get("challenger") or {}, line.get("champion") or {}
    data = ("mislabeled " if wrong else "") + ",".join(map(str, digits))
    seconds = line.get("data_to_serving_secs")
    rows.append([line["round"], data, line["new_examples"], line["steps"],
                 _cell(champion.get("old_class_accuracy")),
                 _cell(challenger.get("old_class_accuracy")),
                 _cell(challenger.get("new_class_accuracy")), line["decision"],
                 line["version"] if line["version"] is not None else "(unchanged)",
                 f"{seconds:.1f}" if seconds is not None else "-"])
  return rows


def _print_table(rows) -> None:
  widths = [max(len(str(c)) for c in column) for column in zip(COLUMNS, *rows)]
  for row in [COLUMNS] + rows:
    print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work_dir", default="runs/demo_stream")
  parser.add_argument("--backbone", default="demo_backbone/keras_model.h5")
  parser.add_argument("--max_regression", type=float, default=0.05)
  parser.add_argument("--round_timeout", type=float, default=300)
  parser.add_argument("--scale", type=float, default=1.0,
                      help="share of each round's digits to send (the tests send less)")
  parser.add_argument("--epochs_per_round", type=float, default=10)
  parser.add_argument("--write_results", action="store_true",
                      help="write docs/results/retrain_demo.json")
  args = parser.parse_args()
  os.chdir(ROOT)
  _ensure_backbone(args)
  shutil.rmtree(args.work_dir, ignore_errors=True)  # the demo's own outputs only
  incoming, validation_dir = (os.path.join(args.work_dir, d) for d in ("incoming", "validation"))
  os.makedirs(incoming)
  pools, validation = _split_digits()
  labels_lib.write_labels_file(os.path.join(incoming, "labels.txt"), NAMES)
  labels_lib.write_labels_file(os.path.join(validation_dir, "labels.txt"), NAMES)
  _write(os.path.join(validation_dir, "validation.tfrecord"), validation)
  start = time.monotonic()
  log = open(os.path.join(args.work_dir, "et-retrain.log"), "w")
  process = subprocess.Popen(_retrain_command(args, incoming, validation_dir), cwd=ROOT,
                             stdout=log, stderr=subprocess.STDOUT)
  try:
    _feed(args, process, pools, incoming)
  finally:
    process.send_signal(signal.SIGTERM)  # a clean stop: exit 0
    code = process.wait(timeout=120)
  print(f"demo-stream: et-retrain stopped with exit code {code} "
        f"(log {args.work_dir}/et-retrain.log)")
  rows = table(_ledger(args.work_dir))
  _print_table(rows)
  print(f"demo-stream: {time.monotonic() - start:.0f} s in all")
  if args.write_results:
    results_tables.write_result(
        "retrain_demo", COLUMNS, rows, "python scripts/demo_stream.py " + " ".join(sys.argv[1:]),
        notes="old/new: accuracy on the validation digits of the classes the champion "
        "knew / of the round's new classes; a rejected round leaves the served "
        "version unchanged.", data={"ledger": _ledger(args.work_dir)})
  if code != 0:
    sys.exit(1)


if __name__ == "__main__":
  main()
