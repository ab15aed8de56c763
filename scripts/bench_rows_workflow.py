"""Benchmark rows, part 2: evaluation while training, --cache, start-up, serving, retraining.

Same conventions as scripts/bench_rows.py (whole processes, alternating
repeats, median (min-max), per-repeat ratios).
"""
import glob
import os
import subprocess
import sys

import bench_data
import bench_stats
from bench_rows import (BATCH, COLUMNS, MOBILENET, UNAVAILABLE, Table, cli, figure_row,
                        ours_argv, run_sides, values)
from bench_run import child_env, run_worker

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(SCRIPTS)
EVAL_EVERY, DEMO_STEPS = 50, 300
DEMO_SIZE = 16  # scripts/make_demo_data.py --image_size; the demo backbone's input


def _as_window(results, steps):
  """Whole-process rows: the timed window is the process, start to exit."""
  for side in results.values():
    for r in side:
      if "wall_s" in r:
        r["window_s"], r["window_steps"] = r["wall_s"], steps


def row_eval(ctx):
  """The demo run (300 steps) evaluating every 50 steps vs Keras validation, and without."""
  demo = bench_data.demo()

  def ours(evaluate):
    extra = ([f"--eval_data={demo['eval']}", f"--eval_every_steps={EVAL_EVERY}"]
             if evaluate else ["--eval_data=", "--eval_every_steps=0"])
    return lambda i: cli(ctx, "ours", [
        f"--flagfile={os.path.join(ROOT, 'flags', 'demo.flags')}",
        f"--backbone={demo['saved_model']}", f"--train_data={demo['train']}",
        f"--model_dir={ctx.model_dir('eval')}", "--export_dir=",
        f"--save_checkpoints_steps={EVAL_EVERY}", *extra])

  def keras(evaluate):
    return lambda i: run_worker(dict(
        kind="keras", backbone=demo["keras_h5"], size=DEMO_SIZE, freeze="none",
        data=demo["train"], eval_data=demo["eval"] if evaluate else "", batch=BATCH,
        steps_per_epoch=EVAL_EVERY, epochs=DEMO_STEPS // EVAL_EVERY,
        checkpoint_every=EVAL_EVERY, model_dir=ctx.model_dir("keras_eval"),
        lr_boundaries=[150, 250], lr_values=[0.02, 0.005, 0.001]))

  results = run_sides(ctx, {"ours_eval": ours(True), "keras_validation": keras(True),
                            "ours_no_eval": ours(False), "keras_no_validation": keras(False)})
  _as_window(results, DEMO_STEPS)
  for side in results.values():
    for r in side:
      if "wall_s" in r and "total_s" in r:
        r["exit_s"] = r["wall_s"] - r["total_s"]
  evaluations = DEMO_STEPS // EVAL_EVERY
  for with_eval, without in (("ours_eval", "ours_no_eval"),
                             ("keras_validation", "keras_no_validation")):
    for w, wo in zip(results[with_eval], results[without]):
      if "wall_s" in w and "wall_s" in wo:
        w["per_eval_s"] = (w["wall_s"] - wo["wall_s"]) / evaluations
        w["eval_vs_plain"] = w["wall_s"] / wo["wall_s"]
        if "eval_pass_s" in w:  # ours: the evaluations' own passes, timed inside
          w["eval_vs_plain_and_passes"] = w["wall_s"] / (wo["wall_s"] + w["eval_pass_s"])
  rows = [
      figure_row(f"demo run, {DEMO_STEPS} steps, evaluation every {EVAL_EVERY} steps: "
                 "whole process s, ours (--eval_every_steps) vs Keras fit "
                 "(validation_data, checkpoint every 50 steps)",
                 results["ours_eval"], results["keras_validation"], "wall_s"),
      figure_row("same run without evaluation, s (checkpoints every 50 steps kept)",
                 results["ours_no_eval"], results["keras_no_validation"], "wall_s"),
      figure_row(f"cost of one evaluation, s ((with - without) / {evaluations})",
                 results["ours_eval"], results["keras_validation"], "per_eval_s"),
      figure_row("run with evaluation / the same run without",
                 results["ours_eval"], results["keras_validation"], "eval_vs_plain"),
      ["run with evaluation / (the run without + the evaluations' own passes over "
       "the data, timed inside ours)",
       bench_stats.cell(values(results["ours_eval"], "eval_vs_plain_and_passes")), "-", "",
       ""],
      figure_row("of which: from the last line to the process's end, s (ours ends "
                 "its process itself; a Keras script exits through interpreter teardown)",
                 results["ours_eval"], results["keras_validation"], "exit_s")]
  return Table(COLUMNS, rows, data=results,
               notes="flags/demo.flags (demo backbone as a TF2 SavedModel, full "
                     "fine-tuning, 50 training images, 846 eval images, 16 px), "
                     "--export_dir= for both; Keras: the same backbone from its .h5, the "
                     "same piecewise learning rate, 6 epochs of 50 steps.")


def row_cache(ctx):
  """Frozen training from the second epoch: JPEG TFRecords with --cache=auto vs in memory."""
  data = bench_data.jpeg_records(512, 110)
  epoch = 512 // BATCH
  steps, warmup = 20 * epoch + 20, epoch + 4  # the window starts in the second epoch
  spec = {"warmup": warmup}
  auto_known = "auto" in ctx.flags.get("cache", "")

  def ours(cache):
    if cache == "auto" and not auto_known:
      return lambda i: {"unavailable": "et-train's --cache takes no 'auto' yet"}
    return lambda i: cli(ctx, "ours", ours_argv(
        data, ctx.model_dir("cache"), steps, extra=[f"--cache={cache}"]), **spec)

  results = run_sides(ctx, {
      "ours_cache_auto": ours("auto"),
      "ours_in_memory": lambda i: run_worker(dict(
          spec, kind="memory", backbone=MOBILENET, size=96, freeze="all", data=data,
          batch=BATCH, steps=steps)),
      # 'off' once --cache knows it (an empty value may then mean the default).
      "ours_no_cache": ours("off" if "'off'" in ctx.flags.get("cache", "") else "")})
  rows = [figure_row("frozen, examples/s from the 2nd epoch: JPEG TFRecords with "
                     "--cache=auto vs one decoded batch in memory",
                     results["ours_cache_auto"], results["ours_in_memory"], "examples_per_s"),
          figure_row("same, JPEG TFRecords without a cache (--cache=off) vs in memory",
                     results["ours_no_cache"], results["ours_in_memory"], "examples_per_s")]
  return Table(COLUMNS, rows, data=results,
               notes="mobilenet_v2 (alpha 0.35, 96 px, random weights), 512 JPEG "
                     f"TFRecords (110 px, {epoch} steps per epoch), batch 32, et-train "
                     "processes; the in-memory reference is Experiment.train fed one "
                     "decoded batch, repeated.")


STARTUP_PARTS = [
    ("of which: imports (TensorFlow, the package / a Keras script's)", "import_s", "import_s"),
    ("of which: ours: flags, config, checks, graph build; Keras: model build + compile",
     "graph_s", ("build_s", "compile_s")),
    ("of which: ours: session, variable init or restore; Keras: -", "session_s", None),
    ("of which: first step (Keras: fit set-up, tracing, first step)", "step1_s", "step1_s")]


def row_startup(ctx):
  """Seconds from process start to the end of the first step, and where they go."""
  data = bench_data.jpeg_records(512, 110)
  results = run_sides(ctx, {
      "ours": lambda i: cli(ctx, "ours", ours_argv(data, ctx.model_dir("startup"), 2)),
      "keras": lambda i: run_worker(dict(kind="keras", backbone=MOBILENET, size=96,
                                         freeze="all", data=data, batch=BATCH,
                                         steps_per_epoch=2))})
  rows = [figure_row("s from process start to the end of the first step",
                     results["ours"], results["keras"], "first_step_s")]
  rows[0][-1] = "one process start each"
  for label, ours_key, keras_key in STARTUP_PARTS:
    keras_keys = keras_key if isinstance(keras_key, tuple) else (keras_key,)
    keras_values = [sum(r.get(k, 0) for k in keras_keys) for r in results["keras"]
                    if keras_key and keras_keys[0] in r]
    rows.append([label, bench_stats.cell(values(results["ours"], ours_key)),
                 bench_stats.cell(keras_values) if keras_key else "-", "", ""])
  return Table(COLUMNS, rows, data=results,
               notes="mobilenet_v2 (alpha 0.35, 96 px, random weights), frozen, JPEG "
                     "TFRecords; a start-up latency is one event per process, so its "
                     "figures are whole process starts, not 20 s windows.")


def _served(ctx, data, calls):
  export_dir = ctx.model_dir("export")
  ours = cli(ctx, "ours", ours_argv(data, ctx.model_dir("serve"), 2,
                                    extra=[f"--export_dir={export_dir}"]))
  if "unavailable" in ours:
    raise RuntimeError(ours["unavailable"])
  version = sorted(glob.glob(os.path.join(export_dir, "[0-9]*")))[-1]
  keras = run_worker(dict(kind="export_keras", backbone=MOBILENET, size=96, batch=BATCH,
                          export_dir=ctx.model_dir("keras_export")))["path"]
  serve = lambda path, signature: lambda i: run_worker(dict(  # pylint: disable=g-long-lambda
      kind="serve", path=path, signature=signature, data=data, calls=calls))
  return run_sides(ctx, {"ours": serve(version, "predict"),
                         "keras": serve(keras, "serving_default")})


def row_serving(ctx):
  """p50/p99 latency of the image-bytes export vs a plain Keras SavedModel."""
  data = bench_data.jpeg_records(512, 110)
  calls = {"1": 1000} if ctx.quick else {"1": 1000, "32": 1000}
  results = _served(ctx, data, calls)
  rows = []
  for batch, count in calls.items():
    for side in results.values():
      for r in side:
        r["window_s"] = r[f"window_s_b{batch}"]
    for stat in ("p50", "p99"):
      row = figure_row(f"{stat} latency ms, batch {batch}, image bytes, ours vs Keras "
                       "SavedModel", results["ours"], results["keras"],
                       f"{stat}_ms_b{batch}")
      # A latency percentile's rule is its call count, not a 20 s window.
      seconds = min(r[f"window_s_b{batch}"] for side in results.values() for r in side)
      row[-1] = f"{count} calls per run (>= {seconds:.0f} s)"
      rows.append(row)
  return Table(COLUMNS, rows, data=results,
               notes="mobilenet_v2 (alpha 0.35, 96 px), frozen; both SavedModels run "
                     "TF Serving's way (a session on the loaded MetaGraph), one process "
                     "per repeat, 10 warm-up calls.")


def row_retrain(ctx):
  """Runs scripts/bench_retrain.py (continuous retraining round latency) when it exists."""
  script = os.path.join(SCRIPTS, "bench_retrain.py")
  if not os.path.exists(script):
    return Table(["measure", "value"], [["continuous retraining round latency",
                                         f"{UNAVAILABLE} (no scripts/bench_retrain.py)"]])
  # Its own flags: --quick means fewer rounds. It writes its own results
  # file, docs/results/retrain_bench.json (README block retrain_bench).
  argv = [sys.executable, script, f"--work_dir={ctx.model_dir('retrain')}"] + (
      ["--rounds=3"] if ctx.quick else [])
  proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=child_env())
  tail = [l for l in proc.stdout.splitlines() if l.strip()][-8:]
  for line in tail:
    ctx.log(f"bench_retrain: {line}")
  status = "ran" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
  return Table(["measure", "value"],
               [[" ".join(["scripts/bench_retrain.py"] + argv[2:]), status],
                ["its last line", tail[-1] if tail else "(no output)"]],
               notes="The round latencies are in its own table, docs/results/"
                     "retrain_bench.json.",
               data={"returncode": proc.returncode, "tail": tail})
