"""Benchmark child processes: `python scripts/bench_workers.py --worker JSON`.

One measurement per process; prints `BENCH_RESULT {json}`. Kinds:

  cli         ours: et-train's real main (estimator_transfer.cli.train.run)
              with spec["argv"], timed by a probe on tf.train.MonitoredSession
              (when the training session is created and when each step ends);
              nothing about the run is changed.
  memory      ours on the ideal input: Experiment.train fed one decoded batch
              from memory, repeated (the in-memory reference of the --cache row).
  serve       p50/p99 latency of a SavedModel signature run TF Serving's way.
  write_jpeg  writes the JPEG TFRecords of bench_data.jpeg_records.
  (keras, limit, export_keras: the peers, scripts/bench_peers.py, a separate
  entry point so a peer process imports what a Keras script would.)

Timing fields: `first_step_s` (process start to the end of the first step),
`window_s` / `window_steps` / `examples_per_s` (the steps after
spec["warmup"]), and where start-up time goes (`import_s`, `graph_s`,
`session_s`, `step1_s`).
"""
import json
import math
import os
import sys
import tempfile
import time

T_START = time.time()
# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import tensorflow as tf
from tensorflow.python.training import monitored_session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from estimator_transfer import config as config_lib
from estimator_transfer.cli import common as cli_common
from estimator_transfer.cli import train as train_cli
from estimator_transfer.config import InputConfig
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import pipeline
from estimator_transfer.data import sources
from estimator_transfer.data import tfrecords
from estimator_transfer.training import experiment as runner
from estimator_transfer.training import in_process_eval

from bench_run import RESULT_PREFIX
T_IMPORTED = time.time()
NUM_CLASSES = 5


class StepClock:
  """Step end times of one training run; its steady-state window and start-up split."""

  def __init__(self, spec):
    self.t_launch = spec["t_launch"]
    self.warmup = spec.get("warmup", 0)
    self.batch = spec.get("batch", 0)
    self.times = []
    self.t_session_start = self.t_session_end = None
    self.eval_pass_s = []  # in-process evaluations: their passes over the data

  def result(self):
    out = {"steps": len(self.times), "import_s": T_IMPORTED - self.t_launch}
    if self.times:
      out["first_step_s"] = self.times[0] - self.t_launch
    if self.t_session_start is not None:
      out["graph_s"] = self.t_session_start - T_IMPORTED
      out["session_s"] = self.t_session_end - self.t_session_start
      if self.times:
        out["step1_s"] = self.times[0] - self.t_session_end
    if len(self.times) > self.warmup + 1:
      steps = len(self.times) - 1 - self.warmup
      window = self.times[-1] - self.times[self.warmup]
      out.update(window_s=window, window_steps=steps,
                 examples_per_s=steps * self.batch / window if self.batch else None)
    if self.eval_pass_s:
      out.update(evaluations=len(self.eval_pass_s), eval_pass_s=sum(self.eval_pass_s))
    return out


def _install_probe(clock):
  """Records the first MonitoredSession's creation and the end of each of its steps.

  The first one is the training session (evaluation sessions come later);
  the probe only reads the clock, so the run is the user's run.
  """
  cls = monitored_session._MonitoredSession  # pylint: disable=protected-access
  init, run = cls.__init__, cls.run
  state = {"training": None}

  def timed_init(self, *args, **kwargs):
    first = state["training"] is None
    if first:
      clock.t_session_start = time.time()
      state["training"] = self
    init(self, *args, **kwargs)
    if first:
      clock.t_session_end = time.time()

  def timed_run(self, *args, **kwargs):
    out = run(self, *args, **kwargs)
    if self is state["training"]:
      clock.times.append(time.time())
    return out

  cls.__init__, cls.run = timed_init, timed_run
  evaluator = in_process_eval.InProcessEvaluator
  evaluate = evaluator._run  # pylint: disable=protected-access

  def timed_evaluate(self, *args, **kwargs):
    out = evaluate(self, *args, **kwargs)
    if out is not None:
      clock.eval_pass_s.append(self.last_pass_s)
    return out

  evaluator._run = timed_evaluate  # pylint: disable=protected-access


def worker_cli(spec):
  """et-train with spec['argv'], as a user runs it, timed by the probe.

  et-train ends its own process (`common.end_process`): the result line is
  printed on the way there, and the process then exits as et-train's does.
  """
  clock = StepClock(spec)
  _install_probe(clock)
  sys.argv = ["et-train"] + list(spec["argv"])
  end_process = cli_common.end_process

  def report_then_end(code):
    out = clock.result()
    out.update(exit_code=code, total_s=time.time() - spec["t_launch"])
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    end_process(code)

  cli_common.end_process = report_then_end
  train_cli.run()
  raise RuntimeError("et-train returned instead of ending its process")


def memory_batch(spec):
  """One decoded training batch of the JPEG data, as NumPy (the ideal input)."""
  features, _ = next(iter(pipeline.build_input_fn(
      InputConfig(batch_size=spec["batch"], shuffle_buffer=64), spec["data"], spec["size"],
      training=True, seed=1)()))
  return features["image"].numpy(), np.arange(spec["batch"], dtype=np.int32) % NUM_CLASSES


def worker_memory(spec):
  """Our frozen training (Experiment.train) fed one in-memory batch, repeated."""
  clock = StepClock(spec)
  _install_probe(clock)
  c = config_lib
  model_dir = tempfile.mkdtemp(prefix="et_bench_memory_")
  cfg = c.ExperimentConfig(
      backbone=c.BackboneConfig(handle=spec["backbone"], weights="none",
                                image_size=spec["size"]),
      head=c.HeadConfig(num_classes=NUM_CLASSES),
      freeze=c.FreezeConfig(spec["freeze"]),
      schedule=c.ScheduleConfig(values=(0.01,)),
      optimizer=c.OptimizerConfig(name="momentum", momentum=0.9),
      input=c.InputConfig(train_data=spec["data"], batch_size=spec["batch"]),
      run=c.RunConfig(model_dir=model_dir, max_steps=spec["steps"],
                      save_checkpoints_steps=10 * spec["steps"], seed=1))
  experiment = runner.Experiment(cfg)
  images, labels = memory_batch(spec)

  def memory_input_fn():
    return tf.data.Dataset.from_tensors(({"image": images}, labels)).repeat().prefetch(2)

  experiment.train_input_fn = lambda: memory_input_fn
  experiment.train()
  return clock.result()


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def percentile(sorted_times, q):
  """The q-th percentile (nearest rank) of sorted values."""
  return sorted_times[min(len(sorted_times) - 1, int(math.ceil(q * len(sorted_times))) - 1)]


def worker_serve(spec):
  """p50/p99 latency of a SavedModel signature, served as TF Serving does (Session)."""
  images = []
  for path in sources.list_tfrecord_files(spec["data"]):
    for record in tfrecords.read_records(path, 64):
      example = tf.train.Example.FromString(record)
      images.append(example.features.feature["image/encoded"].bytes_list.value[0])
  out = {}
  with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], spec["path"])
    signature = meta.signature_def[spec["signature"]]
    feed_name = list(signature.inputs.values())[0].name
    fetches = [t.name for t in signature.outputs.values()]
    for batch, calls in spec["calls"].items():
      feed = {feed_name: np.array([images[i % len(images)] for i in range(int(batch))],
                                  dtype=object)}
      for _ in range(10):
        sess.run(fetches, feed)
      start = time.perf_counter()
      times = sorted(_timed(lambda: sess.run(fetches, feed)) for _ in range(calls))
      out[f"calls_b{batch}"] = calls
      out[f"window_s_b{batch}"] = time.perf_counter() - start
      out[f"p50_ms_b{batch}"] = 1000 * percentile(times, 0.50)
      out[f"p99_ms_b{batch}"] = 1000 * percentile(times, 0.99)
  return out


def worker_write_jpeg(spec, seed=0):
  """JPEG TFRecords of smooth random images (compress like photos, not noise)."""
  rng = np.random.RandomState(seed)
  count, size = spec["count"], spec["source_size"]
  distinct = min(count, 64)  # encode a few, repeat them: writing is not measured
  encoded = []
  for _ in range(distinct):
    small = rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
    image = tf.image.resize(small[None], [size, size], "bicubic")[0]
    image += rng.normal(0, 8, image.shape)
    encoded.append(tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8),
                                     quality=90).numpy())
  examples = (tfrecords.make_example(encoded[i % distinct], i % NUM_CLASSES,
                                     image_format="jpeg") for i in range(count))
  out_dir = spec["out_dir"]
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  os.makedirs(tmp)
  tfrecords.write_shards(examples, tmp, "bench", spec["num_shards"])
  labels_lib.write_labels_file(os.path.join(tmp, "labels.txt"),
                               [f"c{i}" for i in range(NUM_CLASSES)])
  os.replace(tmp, out_dir)
  return {"path": out_dir}


WORKERS = {"cli": worker_cli, "memory": worker_memory, "serve": worker_serve,
           "write_jpeg": worker_write_jpeg}


def main(spec):
  tf.get_logger().setLevel("ERROR")
  result = WORKERS[spec["kind"]](spec)
  # After et-train's own output; the parent reads only this line.
  print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    main(json.loads(sys.argv[2]))
  else:
    sys.exit("usage: bench_workers.py --worker JSON (scripts/benchmark.py runs it)")
