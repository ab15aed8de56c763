"""Benchmarks: `python scripts/benchmark.py [--only=input] [--quick]`.

Sections are functions in SECTIONS (name -> function(args) -> list of result
rows); each prints a markdown table and is stored in bench/results.json under
its name (other sections' results are kept), with the machine it ran on.

input: images/s of the JPEG TFRecord input_fn (training mode: shuffle, decode,
  resize, batch) with and without augmentation, at the demo size (32 px,
  sources 32 px) and at 224 px (sources 256 px); and the ratio of training
  throughput (Estimator steps, same backbone, same batch) when fed from JPEG
  TFRecords vs from an in-memory tensor batch. Target: ratio >= 0.85, i.e. the
  input pipeline is not the bottleneck. --quick measures the training ratio
  at the demo size only, with fewer steps.
features: feature-cache mode (--cache_features) at the demo size and 224 px:
  one feature-extraction pass vs 20 epochs of head training from the cache
  (target <= 1.5x) and vs 20 epochs of ordinary frozen training (target:
  cached >= 8x faster). See section_features.
train, startup, serving, knobs, summary: ours vs a Keras `fit` script (frozen
  and full fine-tuning), vs the backbone's pure inference and the machine's
  fp32 matmul peak, process start to first step, serving latency vs a plain
  Keras SavedModel, the performance flags, and the table of targets; each
  measurement in a child process. See scripts/bench_peers.py.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RESULTS_PATH = os.path.join(ROOT, "bench", "results.json")
AUGMENT = dict(random_flip="horizontal", random_crop=True, brightness=0.2,
               contrast=0.2, saturation=0.2, rotation_degrees=10.0)


# --- shared helpers -------------------------------------------------------------


def print_table(title, rows):
  """Prints rows (dicts with the same keys) as a markdown table."""
  if not rows:
    return
  keys = list(rows[0])
  print(f"\n### {title}\n")
  print("| " + " | ".join(keys) + " |")
  print("|" + "|".join("---" for _ in keys) + "|")
  for row in rows:
    cells = [f"{v:.3g}" if isinstance(v, float) and abs(v) < 10 else
             (f"{v:.0f}" if isinstance(v, float) else str(v)) for v in row.values()]
    print("| " + " | ".join(cells) + " |")


def machine():
  info = {"cpus": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version()}
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    info["cpu"] = names[0] if names else platform.processor()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    info["tensorflow"] = tf.__version__
    info["load_average_1min"] = os.getloadavg()[0]
  except (OSError, ImportError):
    pass
  return info


def save_results(section, rows, args):
  os.makedirs(os.path.dirname(RESULTS_PATH), exist_ok=True)
  results = {}
  if os.path.exists(RESULTS_PATH):
    with open(RESULTS_PATH) as f:
      results = json.load(f)
  results[section] = {"rows": rows, "quick": args.quick, "machine": machine(),
                      "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
  with open(RESULTS_PATH + ".tmp", "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  os.replace(RESULTS_PATH + ".tmp", RESULTS_PATH)


# --- section: input -----------------------------------------------------------------


def _write_jpeg_records(out_dir, count, source_size, num_shards=4, num_classes=5, seed=0):
  """JPEG TFRecords of smooth random images (compress like photos, not noise)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import labels as labels_lib  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import tfrecords  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(seed)
  distinct = min(count, 64)  # encode a few, repeat them: writing is not measured
  encoded = []
  for _ in range(distinct):
    small = rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
    image = tf.image.resize(small[None], [source_size, source_size], "bicubic")[0]
    image += rng.normal(0, 8, image.shape)
    encoded.append(tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8),
                                     quality=90).numpy())
  examples = (tfrecords.make_example(encoded[i % distinct], i % num_classes,
                                     image_format="jpeg") for i in range(count))
  tfrecords.write_shards(examples, out_dir, "bench", num_shards)
  labels_lib.write_labels_file(os.path.join(out_dir, "labels.txt"),
                               [f"c{i}" for i in range(num_classes)])
  return out_dir


def _pipeline_rate(data, size, augment, batch, batches, seed=1):
  """Images/s of the training input_fn iterated eagerly (after warm-up)."""
  from estimator_transfer.config import InputConfig  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import pipeline  # pylint: disable=g-import-not-at-top
  config = InputConfig(batch_size=batch, shuffle_buffer=1024, **(AUGMENT if augment else {}))
  iterator = iter(pipeline.build_input_fn(config, data, size, training=True, seed=seed,
                                           num_classes=5)())
  for _ in range(5):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch / (time.perf_counter() - start)


def _best_pipeline_rate(data, size, augment, batch, batches, repeats):
  return max(_pipeline_rate(data, size, augment, batch, batches) for _ in range(repeats))


class _StepTimer:
  """SessionRunHook: wall time between global step `warmup` and the last step."""

  def __init__(self, warmup):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    class Hook(tf.compat.v1.train.SessionRunHook):
      def __init__(hook):  # pylint: disable=no-self-argument
        hook.steps = 0
        hook.t_start = hook.t_end = None

      def after_run(hook, run_context, run_values):  # pylint: disable=no-self-argument
        del run_context, run_values
        hook.steps += 1
        now = time.perf_counter()
        if hook.steps == warmup:
          hook.t_start = now
        hook.t_end = now

    self.hook = Hook()
    self.warmup = warmup

  def steps_per_second(self):
    return (self.hook.steps - self.warmup) / (self.hook.t_end - self.hook.t_start)


def _demo_backbone(size, work):
  """A Keras .h5 of the demo CNN (the demo's own pretrained one at 32 px)."""
  pretrained = os.path.join(ROOT, "demo_backbone", "keras_model.h5")
  if size == 32 and os.path.exists(pretrained):
    return pretrained
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  from make_demo_backbone import build_demo_cnn  # pylint: disable=g-import-not-at-top
  tf.keras.utils.set_random_seed(0)
  path = os.path.join(work, f"demo_cnn_{size}.h5")
  build_demo_cnn(size).save(path)
  return path


def _training_rate(data, size, backbone, batch, steps, work, in_memory):
  """Examples/s of Estimator training on the backbone (fine-tuning everything)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_transfer import config as config_lib  # pylint: disable=g-import-not-at-top
  from estimator_transfer.training import experiment as runner  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import pipeline  # pylint: disable=g-import-not-at-top
  model_dir = tempfile.mkdtemp(dir=work)
  cfg = config_lib.ExperimentConfig(
      backbone=config_lib.BackboneConfig(handle=backbone, image_size=size),
      head=config_lib.HeadConfig(num_classes=5),
      freeze=config_lib.FreezeConfig("none"),
      input=config_lib.InputConfig(train_data=data, batch_size=batch, shuffle_buffer=1024),
      run=config_lib.RunConfig(model_dir=model_dir, max_steps=steps,
                               save_checkpoints_steps=10 * steps, log_every_steps=10 * steps,
                               seed=1))
  experiment = runner.Experiment(cfg)
  if in_memory:
    # The ideal input: one decoded batch already in memory, repeated.
    images = next(iter(pipeline.build_input_fn(cfg.input, data, size, training=True,
                                                seed=1)()))[0]["image"].numpy()
    labels = np.arange(batch, dtype=np.int32) % 5

    def input_fn():
      ds = tf.data.Dataset.from_tensors(({"image": images}, labels)).repeat()
      return ds.prefetch(2)
  else:
    input_fn = experiment.input_fn(data, training=True)
  warmup = max(3, steps // 5)
  timer = _StepTimer(warmup)
  experiment.estimator.train(input_fn, max_steps=steps, hooks=[timer.hook])
  shutil.rmtree(model_dir, ignore_errors=True)
  return timer.steps_per_second() * batch


def section_input(args):
  """Input pipeline images/s and the JPEG-vs-in-memory training ratio."""
  work = tempfile.mkdtemp(prefix="et_bench_")
  rows = []
  try:
    sizes = [("demo", 32, 32), ("224px", 224, 256)]
    data = {}
    for name, size, source in sizes:
      count = 512 if size == 32 else 256
      data[name] = _write_jpeg_records(os.path.join(work, name), count, source)
    for name, size, _ in sizes:
      batches = (30 if size == 32 else 8) * (1 if args.quick else 3)
      for augment in (False, True):
        rate = _best_pipeline_rate(data[name], size, augment, 32, batches, args.repeats)
        rows.append({"measure": f"JPEG TFRecord input_fn images/s, {name}"
                                f"{' + augmentation' if augment else ''}",
                     "value": rate})
        print(f"benchmark: {rows[-1]['measure']}: {rate:.0f}", flush=True)
    ratio_sizes = sizes[:1] if args.quick else sizes
    for name, size, _ in ratio_sizes:
      steps = (60 if size == 32 else 10) * (1 if args.quick else 2)
      backbone = _demo_backbone(size, work)
      rates = {True: 0.0, False: 0.0}
      ratios = []
      # Alternating runs: each TFRecord run is compared with the in-memory run
      # just before it (the same load from others on a shared machine), and
      # the median of those ratios is reported, with the best rate of each.
      for _ in range(args.repeats):
        pair = {}
        for in_memory in (True, False):
          pair[in_memory] = _training_rate(data[name], size, backbone, 32, steps, work,
                                           in_memory)
          rates[in_memory] = max(rates[in_memory], pair[in_memory])
          print(f"benchmark: training {name} from "
                f"{'memory' if in_memory else 'JPEG TFRecords'}: {pair[in_memory]:.0f} "
                "examples/s", flush=True)
        ratios.append(pair[False] / pair[True])
      rows.append({"measure": f"training examples/s from memory, demo CNN, {name} (best)",
                   "value": rates[True]})
      rows.append({"measure": f"training examples/s from JPEG TFRecords, demo CNN, {name} "
                              "(best)", "value": rates[False]})
      rows.append({"measure": f"ratio TFRecords/memory, {name}, median of "
                              f"{len(ratios)} pairs (target >= 0.85)",
                   "value": sorted(ratios)[len(ratios) // 2]})
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return rows


# --- section: features ----------------------------------------------------------------


def _demo_digits(work, per_class):
  """The digits demo data (scripts/make_demo_data.py) in `work`: finetune/train."""
  import subprocess  # pylint: disable=g-import-not-at-top
  out = os.path.join(work, "demo_data")
  subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_demo_data.py"),
                  f"--output_dir={out}", f"--train_per_class={per_class}"],
                 check=True, capture_output=True,
                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  return os.path.join(out, "finetune", "train")


def _frozen_config(data, backbone, size, weights, model_dir, steps, batch, cache=""):
  from estimator_transfer import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.ExperimentConfig(
      backbone=config_lib.BackboneConfig(handle=backbone, weights=weights, image_size=size),
      head=config_lib.HeadConfig(num_classes=5),
      freeze=config_lib.FreezeConfig("all"),
      input=config_lib.InputConfig(train_data=data, batch_size=batch, shuffle_buffer=1024,
                                   cache_features=cache),
      run=config_lib.RunConfig(model_dir=model_dir, max_steps=steps,
                               save_checkpoints_steps=10 * steps,
                               log_every_steps=10 * steps, seed=1))


def _timed_training(cfg, warmup):
  """(wall seconds of Experiment(cfg).train(), steady-state steps/s)."""
  from estimator_transfer.training import experiment as runner  # pylint: disable=g-import-not-at-top
  timer = _StepTimer(warmup)
  start = time.perf_counter()
  runner.Experiment(cfg).train(hooks=[timer.hook])
  return time.perf_counter() - start, timer.steps_per_second()


def section_features(args):
  """Feature-cache mode: extraction pass, 20 epochs of head training, speedup.

  Per case (demo: digits at 32 px through the demo CNN; 224px: JPEG
  TFRecords through mobilenet_v2(alpha=0.35) with random weights), all in
  this one process: the wall time of one cold feature-extraction pass
  (FeatureCache.prepare: hashing, snapshot, extraction, writing); of 20
  epochs of head training from the warm cache (Experiment.train, Estimator
  setup included); and of 20 epochs of ordinary frozen training (same
  config without the cache). Targets: head training <= 1.5x the extraction
  pass; ordinary / cached >= 8x. --quick trains the ordinary 224 px model
  for 3 epochs and extrapolates (its wall time + the remaining steps at its
  steady-state rate).
  """
  import math  # pylint: disable=g-import-not-at-top
  from estimator_transfer.model import backbones  # pylint: disable=g-import-not-at-top
  from estimator_transfer.feature_cache import cache as feature_cache  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import labels as labels_lib  # pylint: disable=g-import-not-at-top
  work = tempfile.mkdtemp(prefix="et_bench_features_")
  rows = []
  epochs, batch = 20, 32
  try:
    cases = [("demo", _demo_digits(work, 150), _demo_backbone(32, work), 32, "", None),
             ("224px", _write_jpeg_records(os.path.join(work, "jpeg224"),
                                           256 if args.quick else 512, 256),
              "mobilenet_v2(alpha=0.35)", 224, "none", 3 if args.quick else None)]
    for name, data, backbone, size, weights, ordinary_epochs in cases:
      cache_dir = os.path.join(work, f"cache_{name}")
      cfg = _frozen_config(data, backbone, size, weights, os.path.join(work, f"m_{name}"),
                           1, batch, cache=cache_dir)
      resolved = backbones.resolve(cfg.backbone)
      start = time.perf_counter()
      cache = feature_cache.FeatureCache(cfg, resolved)
      # The label map the Experiment passes too (its text labels need it).
      cached = cache.prepare(data, True, labels_lib.class_names_for(data) or ())
      extraction = time.perf_counter() - start
      cache.close()
      count = cached.num_examples
      steps = epochs * math.ceil(count / batch)
      print(f"benchmark: {name}: extraction pass over {count} images: {extraction:.2f}s",
            flush=True)
      cached_cfg = _frozen_config(data, backbone, size, weights,
                                  os.path.join(work, f"cached_{name}"), steps, batch,
                                  cache=cache_dir)
      head_time, head_rate = _timed_training(cached_cfg, warmup=max(3, steps // 10))
      print(f"benchmark: {name}: {epochs} epochs ({steps} steps) of head training from "
            f"the cache: {head_time:.2f}s ({head_rate:.0f} steps/s)", flush=True)
      ordinary_steps = (ordinary_epochs or epochs) * math.ceil(count / batch)
      ordinary_cfg = _frozen_config(data, backbone, size, weights,
                                    os.path.join(work, f"ordinary_{name}"),
                                    ordinary_steps, batch)
      ordinary_time, ordinary_rate = _timed_training(
          ordinary_cfg, warmup=max(3, ordinary_steps // 10))
      extrapolated = ""
      if ordinary_steps < steps:
        ordinary_time += (steps - ordinary_steps) / ordinary_rate
        extrapolated = f" (extrapolated from {ordinary_epochs} epochs)"
      print(f"benchmark: {name}: {epochs} epochs of ordinary frozen training: "
            f"{ordinary_time:.2f}s{extrapolated} ({ordinary_rate:.1f} steps/s)", flush=True)
      rows += [
          {"measure": f"{name}: extraction pass, {count} images (s)", "value": extraction},
          {"measure": f"{name}: extraction images/s (after the backbone graph is built)",
           "value": count / max(cached.compute_seconds, 1e-9)},
          {"measure": f"{name}: head training from cache, {epochs} epochs (s)",
           "value": head_time},
          {"measure": f"{name}: ratio head training / extraction (target <= 1.5)",
           "value": head_time / extraction},
          {"measure": f"{name}: ordinary frozen training, {epochs} epochs (s){extrapolated}",
           "value": ordinary_time},
          {"measure": f"{name}: speedup ordinary / cached head training (target >= 8)",
           "value": ordinary_time / head_time},
          {"measure": f"{name}: speedup ordinary / (extraction + cached head training)",
           "value": ordinary_time / (extraction + head_time)},
          {"measure": f"{name}: steps/s cached vs ordinary (steady state)",
           "value": f"{head_rate:.0f} vs {ordinary_rate:.1f}"},
      ]
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return rows


# --- sections against peers (scripts/bench_peers.py) ---------------------------


def _peer_section(name):
  """A section of scripts/bench_peers.py: ours vs Keras fit, inference, serving."""

  def section(args):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_peers  # pylint: disable=g-import-not-at-top
    return bench_peers.SECTIONS[name](args, sys.modules[__name__])

  section.__doc__ = f"bench_peers.section_{name}"
  return section


SECTIONS = {
    "input": section_input,
    "features": section_features,
    # Last: summary collects the targets from every section's results.
    **{name: _peer_section(name) for name in ("train", "startup", "serving", "knobs",
                                              "summary")},
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="comma-separated sections: "
                      + ", ".join(SECTIONS))
  parser.add_argument("--quick", action="store_true", help="fewer steps and sizes")
  parser.add_argument("--repeats", type=int, default=3, help="alternating "
                      "memory/TFRecord training runs (and input_fn runs, best kept)")
  args = parser.parse_args(argv)
  names = [n for n in args.only.split(",") if n] or list(SECTIONS)
  unknown = [n for n in names if n not in SECTIONS]
  if unknown:
    parser.exit(1, f"benchmark: error: unknown section {unknown[0]!r}; choose from "
                f"{', '.join(SECTIONS)}\n")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel("ERROR")
  for name in names:
    start = time.time()
    rows = SECTIONS[name](args)
    print_table(f"{name} ({time.time() - start:.0f}s, {os.cpu_count()} CPUs"
                f"{', quick' if args.quick else ''})", rows)
    save_results(name, rows, args)
  print(f"\nbenchmark: results in {os.path.relpath(RESULTS_PATH, ROOT)}")


if __name__ == "__main__":
  main()
