"""Benchmark inputs, written once under bench/scratch/ (git-ignored) and reused.

jpeg_records: JPEG TFRecord shards of smooth random images (they compress like
  photos, not like noise; bench_workers.write_jpeg), 5 classes, for the throughput and fine-tuning rows.
demo: the `make demo` data and backbone (digits; scripts/make_demo_data.py and
  scripts/make_demo_backbone.py), for the evaluation-while-training row, which
  times the demo run. The backbone is pretrained for one epoch only: its
  weights change no timing, and the demo's own build takes minutes.
"""
import os
import subprocess
import sys

from bench_run import run_worker as bench_workers_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRATCH = os.path.join(ROOT, "bench", "scratch")
NUM_CLASSES = 5


def _quiet_env():
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def jpeg_records(count: int, source_size: int, num_shards: int = 4) -> str:
  """A directory of `count` JPEG records (source_size px); written when missing."""
  out_dir = os.path.join(SCRATCH, f"jpeg_{count}_{source_size}")
  if not os.path.exists(os.path.join(out_dir, "labels.txt")):
    # Written in a child process: the driver never imports TensorFlow, so its
    # memory and threads stay out of every timing.
    bench_workers_run({"kind": "write_jpeg", "out_dir": out_dir, "count": count,
                       "source_size": source_size, "num_shards": num_shards})
  return out_dir


def demo() -> dict:
  """Paths of the demo data and backbone (built when missing)."""
  data_dir = os.path.join(SCRATCH, "demo_data")
  backbone_dir = os.path.join(SCRATCH, "demo_backbone")
  if not os.path.exists(os.path.join(data_dir, "finetune", "eval", "labels.txt")):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_demo_data.py"),
                    f"--output_dir={data_dir}"], check=True, env=_quiet_env(),
                   capture_output=True)
  if not os.path.exists(os.path.join(backbone_dir, "keras_model.h5")):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_demo_backbone.py"),
                    f"--data_dir={data_dir}", f"--output_dir={backbone_dir}", "--epochs=1"],
                   check=True, env=_quiet_env(), capture_output=True)
  return {"train": os.path.join(data_dir, "finetune", "train"),
          "eval": os.path.join(data_dir, "finetune", "eval"),
          "saved_model": os.path.join(backbone_dir, "saved_model"),
          "keras_h5": os.path.join(backbone_dir, "keras_model.h5")}


