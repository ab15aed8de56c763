"""`make demo`: the whole product path on bundled data, offline.

1. builds the digits dataset (scripts/make_demo_data.py) if missing;
2. pretrains the demo backbone on digits 0-4 (scripts/make_demo_backbone.py)
   if missing;
3. fine-tunes it on 10 images per class of digits 5-9 with
   et-train --flagfile=flags/demo.flags, then et-evaluate and et-export;
4. trains the same architecture and head from scratch (random weights) with
   the same data and schedule, evaluates it;
5. loads the export back, runs its serving signature on held-out image files
   and prints the accuracies side by side.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
FLAGFILE = "--flagfile=flags/demo.flags"


def _run(*cmd):
  print("$", " ".join(cmd), flush=True)
  result = subprocess.run(list(cmd), cwd=ROOT)
  if result.returncode:
    sys.exit(f"demo: step failed (exit {result.returncode}): {' '.join(cmd)}")


def _tool(name):
  return os.path.join(BIN, name)


def _accuracy(model_dir):
  with open(os.path.join(ROOT, model_dir, "eval_results.json")) as f:
    return json.load(f)["accuracy"]


def _served_accuracy(export_dir, image_root):
  """Accuracy of the exported serving_default signature on PNG files."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  version = sorted(glob.glob(os.path.join(ROOT, export_dir, "[0-9]*")))[-1]
  serve = tf.saved_model.load(version).signatures["serving_default"]
  files = sorted(glob.glob(os.path.join(ROOT, image_root, "*", "*.png")))
  correct = 0
  for start in range(0, len(files), 32):
    batch = files[start:start + 32]
    blobs = tf.constant([open(p, "rb").read() for p in batch])
    names = serve(image_bytes=blobs)["class_names"].numpy()
    correct += sum(n.decode() == os.path.basename(os.path.dirname(p))
                   for n, p in zip(names, batch))
  return correct / len(files), len(files), version


def main():
  os.chdir(ROOT)
  if not os.path.exists("demo_data/finetune/train/labels.txt"):
    _run(sys.executable, "scripts/make_demo_data.py", "--output_dir=demo_data")
  if not os.path.exists("demo_backbone/saved_model/saved_model.pb"):
    _run(sys.executable, "scripts/make_demo_backbone.py", "--data_dir=demo_data",
         "--output_dir=demo_backbone")
  for path in ("runs/demo", "runs/demo_scratch", "exports/demo"):
    shutil.rmtree(path, ignore_errors=True)  # the demo's own outputs only

  _run(_tool("et-train"), FLAGFILE)
  _run(_tool("et-evaluate"), FLAGFILE)
  _run(_tool("et-export"), FLAGFILE)
  # The baseline is for comparison only: it never publishes to exports/demo.
  scratch = ["--backbone=demo_backbone/keras_model.h5", "--backbone_weights=none",
             "--model_dir=runs/demo_scratch", "--export_dir="]
  _run(_tool("et-train"), FLAGFILE, *scratch)
  _run(_tool("et-evaluate"), FLAGFILE, *scratch)

  transfer, baseline = _accuracy("runs/demo"), _accuracy("runs/demo_scratch")
  served, count, version = _served_accuracy("exports/demo", "demo_data/images/eval")
  print()
  print("Digits 5-9, 10 training images per class, same head, schedule and steps:")
  print(f"  fine-tuned from the backbone pretrained on 0-4   eval accuracy {transfer:.3f}")
  print(f"  same architecture from scratch (random weights)  eval accuracy {baseline:.3f}")
  print(f"  transfer gain                                    {transfer - baseline:+.3f}")
  print(f"  exported model {os.path.relpath(version, ROOT)} on {count} held-out PNG "
        f"files: accuracy {served:.3f}")


if __name__ == "__main__":
  main()
