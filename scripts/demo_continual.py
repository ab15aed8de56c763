"""Continued training on new data, with and without replay of the old data (seed 000).

1. builds the digits dataset and the demo backbone if missing (as `make demo`);
2. trains the "previous model": the demo backbone with a head for digits 0-4,
   on demo_data/pretrain (runs/continual_old);
3. continues it on digits 5-9 (demo_data/finetune: 10 images per class) with
   et-train --flagfile=flags/continue_on_new_data.flags: warm start, classes
   merged by name (0-9), the old shards replayed in every batch
   (runs/continual_replay);
4. the same without --replay_data (runs/continual_noreplay);
5. evaluates every model on the held-out old digits (0-4) and new digits (5-9)
   and prints the accuracies side by side: without replay the model forgets
   the old classes; with replay it keeps them and learns the new ones.

Usage: python scripts/demo_continual.py
"""
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILE = "--flagfile=flags/continue_on_new_data.flags"
OLD_EVAL = "demo_data/pretrain/eval"
NEW_EVAL = "demo_data/finetune/eval"
RUNS = ("runs/continual_old", "runs/continual_replay", "runs/continual_noreplay")


def _run(tool, *args):
  cmd = [sys.executable, "-m", f"estimator_transfer.cli.{tool}", *args]
  print("$ et-" + tool, " ".join(args), flush=True)
  result = subprocess.run(cmd, cwd=ROOT)
  if result.returncode:
    sys.exit(f"demo_continual: step failed (exit {result.returncode}): et-{tool} "
             f"{' '.join(args)}")


def _accuracy(model_dir, data):
  _run("evaluate", f"--model_dir={model_dir}", f"--eval_data={data}")
  with open(os.path.join(ROOT, model_dir, "eval_results.json")) as f:
    return json.load(f)["accuracy"]


def main():
  os.chdir(ROOT)
  if not os.path.exists("demo_data/finetune/train/labels.txt"):
    subprocess.run([sys.executable, "scripts/make_demo_data.py",
                    "--output_dir=demo_data"], check=True)
  if not os.path.exists("demo_backbone/saved_model/saved_model.pb"):
    subprocess.run([sys.executable, "scripts/make_demo_backbone.py",
                    "--data_dir=demo_data", "--output_dir=demo_backbone"], check=True)
  for path in RUNS:
    shutil.rmtree(path, ignore_errors=True)  # the demo's own outputs only

  # The previous model: digits 0-4.
  _run("train", "--backbone=demo_backbone/saved_model",
       "--train_data=demo_data/pretrain/train", "--model_dir=runs/continual_old",
       "--freeze=none", "--lr_values=0.01", "--batch_size=32", "--max_steps=150",
       "--save_checkpoints_steps=150", "--log_every_steps=50", "--seed=1")
  # New data arrives: digits 5-9. With and without replay of the old shards.
  _run("train", FLAGFILE)
  _run("train", FLAGFILE, "--model_dir=runs/continual_noreplay", "--replay_data=")

  rows = [("previous model (trained on 0-4)", "runs/continual_old"),
          ("continued on 5-9 with replay of 0-4", "runs/continual_replay"),
          ("continued on 5-9, no replay", "runs/continual_noreplay")]
  results = []
  for label, model_dir in rows:
    old = _accuracy(model_dir, OLD_EVAL)
    new = _accuracy(model_dir, NEW_EVAL) if model_dir != "runs/continual_old" else None
    results.append((label, old, new))
  print()
  print("Held-out accuracy, same backbone, head merged by class name (0-9):")
  print(f"  {'':40s} {'old digits 0-4':>15s} {'new digits 5-9':>15s}")
  for label, old, new in results:
    new_text = f"{new:15.3f}" if new is not None else f"{'-':>15s}"
    print(f"  {label:40s} {old:15.3f} {new_text}")
  replay_old, noreplay_old = results[1][1], results[2][1]
  print(f"  replay keeps {replay_old - noreplay_old:+.3f} accuracy on the old digits")


if __name__ == "__main__":
  main()
