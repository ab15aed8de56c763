"""`make demo`: the transfer-learning strategies side by side on bundled digits, offline.

1. builds the digits dataset (scripts/make_demo_data.py) if missing;
2. pretrains the demo backbone on digits 0-4 (scripts/make_demo_backbone.py)
   if missing;
3. trains from scratch, feature extraction, fine-tuning of the top blocks,
   full fine-tuning and gradual unfreezing on 3 images per class of digits 5-9
   with the same head, data, steps and seed (scripts/demo_strategies.py),
   prints one table, writes demo/strategies.png and docs/results/demo.json,
   and says what to run next.

Usage: python scripts/demo.py [--seeds=3] [--seed=N] [--quick]  (flags of demo_strategies.py)
"""
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import demo_strategies  # noqa: E402  (scripts/demo_strategies.py)


def _build(script, *args):
  print(f"$ python scripts/{script} {' '.join(args)}", flush=True)
  if subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=ROOT).returncode:
    sys.exit(f"demo: scripts/{script} failed")


def main(argv=None):
  start = time.monotonic()
  args = demo_strategies.parse_args(argv)
  os.chdir(ROOT)
  if not os.path.exists(os.path.join(args.data_dir, "finetune", "train", "labels.txt")):
    _build("make_demo_data.py", f"--output_dir={args.data_dir}")
  if not os.path.exists(os.path.join(args.backbone_dir, "keras_model.h5")):
    _build("make_demo_backbone.py", f"--data_dir={args.data_dir}",
           f"--output_dir={args.backbone_dir}")
  closing = demo_strategies.run(args)
  print(f"demo: done in {time.monotonic() - start:.0f} s "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
  for line in closing:  # last: where the pictures are, what to run next
    print(line)


if __name__ == "__main__":
  main()
