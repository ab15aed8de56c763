"""Benchmark rows, part 1: training throughput, the forward-pass limit, cached features.

A row is `function(ctx) -> Table`; scripts/benchmark.py runs it, prints it and
writes docs/results/bench_<row>.json. Every run is a whole child process
(bench_run.run_worker): ours is et-train's main with the flags shown, the
peer a Keras fit script, both on the same TFRecords through the same tf.data
pipeline with TensorFlow's default threading. Repeats alternate ours, peer,
ours, peer... (bench_stats.alternate).
"""
import dataclasses
import os
import shutil
import tempfile
from typing import Callable, Dict, List

import bench_data
import bench_stats
from bench_run import WorkerError, run_worker

BATCH = 32
MOBILENET = "mobilenet_v2(alpha=0.35)"
UNAVAILABLE = "not available"


@dataclasses.dataclass
class Context:
  """What a row needs: repeats, quick mode, a scratch directory, the known flags."""
  repeats: int
  quick: bool
  work: str
  flags: Dict[str, str]
  log: Callable[[str], None] = print

  def model_dir(self, name):
    return tempfile.mkdtemp(prefix=f"{name}_", dir=self.work)


@dataclasses.dataclass
class Table:
  columns: List[str]
  rows: List[List[str]]
  notes: str = ""
  data: dict = dataclasses.field(default_factory=dict)


COLUMNS = ["measure", "ours", "peer", "ours / peer", "timed window per run"]


def ours_argv(data, model_dir, steps, freeze="all", backbone=MOBILENET, size=96,
              extra=()):
  """et-train flags of a throughput run: no checkpoint or log line inside the window."""
  return [f"--backbone={backbone}", "--backbone_weights=none", f"--image_size={size}",
          f"--train_data={data}", f"--model_dir={model_dir}", f"--max_steps={steps}",
          f"--freeze={freeze}", f"--batch_size={BATCH}", "--optimizer=momentum",
          "--momentum=0.9", "--lr_values=0.01", "--seed=1",
          f"--save_checkpoints_steps={10 * steps}", f"--log_every_steps={10 * steps}",
          *extra]


def cli(ctx, name, argv, **spec):
  """A run of ours (`name` for the log); its model_dir is removed afterwards."""
  result = run_worker(dict(spec, kind="cli", argv=argv, batch=BATCH))
  for flag in argv:
    if flag.startswith("--model_dir="):
      shutil.rmtree(flag.split("=", 1)[1], ignore_errors=True)
  if "unavailable" not in result and not result.get("steps"):
    ctx.log(f"{name}: et-train ran no training step: {result}")
  return result


def values(results, key):
  return [r[key] for r in results if key in r]


def unavailable(results):
  """The refusal sentence when a side could not run (today's et-train lacks a feature)."""
  for r in results:
    if "unavailable" in r:
      return r["unavailable"]
  return ""


def _last_line(text):
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return lines[-1][:200] if lines else "no output"


def failures(results):
  """'N of M runs failed: <last error line>' when a side crashed in some repeats."""
  failed = [r["failed"] for r in results if "failed" in r]
  return f"{len(failed)} of {len(results)} runs failed: {failed[-1]}" if failed else ""


def figure_row(measure, ours, peer, key, invert=False):
  """One table row: medians (min-max) of ours and the peer, and the per-repeat ratio."""
  reason = unavailable(ours) or unavailable(peer)
  o, p = values(ours, key), values(peer, key)
  if reason:
    return [measure, f"{UNAVAILABLE} ({reason})" if not o else bench_stats.cell(o),
            bench_stats.cell(p) if p else UNAVAILABLE, UNAVAILABLE,
            bench_stats.window_text(ours + peer)]
  # Ratios pair the repeats in which both sides ran.
  pairs = [(a[key], b[key]) for a, b in zip(ours, peer) if key in a and key in b]
  r = [(b / a) if invert else (a / b) for a, b in pairs]
  cells = [bench_stats.cell(o), bench_stats.cell(p)]
  for i, side in enumerate((ours, peer)):
    if failures(side):
      cells[i] += f"; {failures(side)}"
  return [measure, *cells, bench_stats.cell(r), bench_stats.window_text(ours + peer)]


def run_sides(ctx, sides):
  """Alternates the sides; a side et-train refused once is not run again."""
  refused = {}

  def guarded(name, fn):
    def run(repeat):
      if name in refused:
        return refused[name]
      try:
        result = fn(repeat)
      except WorkerError as e:
        # A crash of the measured program is a finding, not the end of the
        # row: the row shows it and the other runs still count.
        ctx.log(f"{name}: FAILED: {e}")
        return {"failed": _last_line(str(e))}
      if "unavailable" in result:
        refused[name] = result
        ctx.log(f"{name}: {UNAVAILABLE}: {result['unavailable']}")
      return result
    return run

  return bench_stats.alternate({n: guarded(n, f) for n, f in sides.items()}, ctx.repeats,
                               ctx.log)


def row_train(ctx):
  """Frozen and full fine-tuning examples/s vs Keras fit, and the forward-pass limit."""
  data = bench_data.jpeg_records(512, 110)
  rows, raw = [], {}
  for freeze, steps, warmup in (("all", 340, 30), ("none", 320, 15)):
    if ctx.quick:
      # Shorter, still >= 20 s on 2 shared cores (a shorter window says SHORT).
      steps, warmup = (200, 20) if freeze == "all" else (80, 10)
    spec = {"warmup": warmup}
    sides = {
        "ours": lambda i, s=steps, f=freeze: cli(
            ctx, "ours", ours_argv(data, ctx.model_dir("train"), s, f), **spec),
        "keras": lambda i, s=steps, f=freeze: run_worker(dict(
            spec, kind="keras", backbone=MOBILENET, size=96, freeze=f, data=data,
            batch=BATCH, steps_per_epoch=s))}
    if freeze == "all":
      sides["limit"] = lambda i, s=steps: run_worker(dict(
          spec, kind="limit", backbone=MOBILENET, size=96, data=data, batch=BATCH, steps=s))
    results = run_sides(ctx, sides)
    raw[freeze] = results
    label = "frozen backbone" if freeze == "all" else "full fine-tuning"
    rows.append(figure_row(f"{label}: examples/s, ours vs Keras fit", results["ours"],
                           results["keras"], "examples_per_s"))
    if freeze == "all":
      rows.append(figure_row("frozen: examples/s, ours vs the forward-pass limit (plain "
                             "TF2 tf.function of the same backbone, same pipeline)",
                             results["ours"], results["limit"], "examples_per_s"))
      rows.append(figure_row("frozen: examples/s, Keras fit vs the forward-pass limit",
                             results["keras"], results["limit"], "examples_per_s"))
  return Table(COLUMNS, rows, data=raw,
               notes=f"mobilenet_v2 (alpha 0.35, 96 px, random weights), 512 JPEG "
                     f"TFRecords (110 px), batch {BATCH}; each run a fresh process, "
                     "examples/s over the steps after the warm-up.")


def row_cached(ctx):
  """--freeze=all --cache_features, 20 epochs end to end (extraction included) vs Keras."""
  count = 256 if ctx.quick else 512
  data = bench_data.jpeg_records(count, 110)
  steps = 20 * count // BATCH
  sides = {
      "ours": lambda i: cli(ctx, "ours", ours_argv(
          data, ctx.model_dir("cached"), steps,
          extra=[f"--cache_features={ctx.model_dir('features')}"])),
      "keras": lambda i: run_worker(dict(kind="keras", backbone=MOBILENET, size=96,
                                         freeze="all", data=data, batch=BATCH,
                                         steps_per_epoch=count // BATCH, epochs=20))}
  results = run_sides(ctx, sides)
  for side in results.values():
    for r in side:
      if "wall_s" in r:
        r["window_s"], r["window_steps"] = r["wall_s"], steps
  rows = [figure_row("20 epochs of frozen-backbone training, whole process s (ours: "
                     "feature extraction pass + head training from the cache)",
                     results["ours"], results["keras"], "wall_s"),
          figure_row("same, speed-up (Keras s / ours s)", results["ours"], results["keras"],
                     "wall_s", invert=True)]
  rows[1][1] = rows[1][2] = ""
  return Table(COLUMNS, rows, data=results,
               notes=f"mobilenet_v2 (alpha 0.35, 96 px, random weights), {count} JPEG "
                     "TFRecords, batch 32; each figure a whole process, start to exit, "
                     "the cache directory new in every run.")


def row_topblock(ctx):
  """--freeze=last:N --cache_features vs Keras fit of the same split, 10 epochs, 224 px.

  1024 images: a process start (about 10 s either way) is then a small part
  of the run, as in real fine-tuning. The run without the cache (as slow as
  Keras: it computes the frozen part every step) is a --quick side only, on
  128 images, to keep the full row near 15 minutes.
  """
  count = 128 if ctx.quick else 1024
  data = bench_data.jpeg_records(count, 256)
  steps, last = 10 * count // BATCH, 8  # last:8 = block_16 and Conv_1 (weighted layers)
  argv = lambda name, extra: ours_argv(  # pylint: disable=g-long-lambda
      data, ctx.model_dir(name), steps, freeze=f"last:{last}", backbone="mobilenet_v2",
      size=224, extra=extra)
  sides = {
      "ours_cut_cache": lambda i: cli(ctx, "ours", argv(
          "top", [f"--cache_features={ctx.model_dir('features')}"])),
      "keras": lambda i: run_worker(dict(kind="keras", backbone="mobilenet_v2", size=224,
                                         freeze=f"last:{last}", data=data, batch=BATCH,
                                         steps_per_epoch=count // BATCH, epochs=10))}
  if ctx.quick:
    sides["ours_no_cache"] = lambda i: cli(ctx, "ours", argv("top_plain", []))
  results = run_sides(ctx, sides)
  for side in results.values():
    for r in side:
      if "wall_s" in r:
        r["window_s"], r["window_steps"] = r["wall_s"], steps
  rows = [figure_row(f"--freeze=last:{last} --cache_features, 10 epochs, whole process s "
                     "(extraction included) vs Keras fit of the same split",
                     results["ours_cut_cache"], results["keras"], "wall_s")]
  if "ours_no_cache" in results:
    rows.append(figure_row(f"--freeze=last:{last} without the cache, 10 epochs, whole "
                           "process s vs Keras fit", results["ours_no_cache"],
                           results["keras"], "wall_s"))
  return Table(COLUMNS, rows, data=results,
               notes=f"mobilenet_v2 (alpha 1.0, 224 px, --backbone_weights=none), {count} "
                     "JPEG TFRecords (256 px), batch 32, no augmentation; accuracy is not "
                     "compared here (random weights, synthetic images): the cut-point "
                     "cache trains the same top on the same frozen outputs "
                     "(tests/feature_cache/test_partial_cache.py).")


# knob label -> (extra et-train flags, steps, warmup): XLA's CPU convolutions
# run ~10x slower here, so its run is shorter in steps (its window still >= 20 s).
KNOBS = {"defaults": ([], 340, 30),
         "--xla": (["--xla"], 40, 8),
         "--mixed_precision=mixed_bfloat16": (["--mixed_precision=mixed_bfloat16"], 340, 30),
         "--cache=memory": (["--cache=memory"], 340, 30)}


def row_knobs(ctx):
  """Our frozen examples/s with each performance flag vs the defaults (the flag help cites it)."""
  data = bench_data.jpeg_records(512, 110)
  knobs = KNOBS
  if ctx.quick:
    knobs = {k: (e, s if s < 100 else 200, w) for k, (e, s, w) in KNOBS.items()}
  sides = {label: (lambda i, e=extra, s=steps, w=warmup: cli(
      ctx, "ours", ours_argv(data, ctx.model_dir("knob"), s, extra=e), warmup=w))
           for label, (extra, steps, warmup) in knobs.items()}
  results = run_sides(ctx, sides)
  rows = [figure_row(f"frozen, examples/s: {label} vs defaults", results[label],
                     results["defaults"], "examples_per_s")
          for label in KNOBS if label != "defaults"]
  return Table(COLUMNS, rows, data=results,
               notes="Ours only: et-train with the flag vs et-train without, mobilenet_v2 "
                     "(alpha 0.35, 96 px, random weights), 512 JPEG TFRecords, batch 32.")
