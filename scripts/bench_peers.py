"""Benchmark sections against peers: Keras `fit`, pure inference, the machine's limit.

Registered in scripts/benchmark.py (its SECTIONS), which runs them:

  train    per backbone (mobilenet_v2(alpha=0.35) at 96 px; resnet50 at 224
           px, random weights), batch 32, the same JPEG TFRecord input_fn and
           TF threading for everyone: examples/s of our frozen-backbone
           training vs a Keras `fit` script (frozen backbone, training=False)
           [1]; of full fine-tuning vs Keras [2]; of our frozen training from
           JPEG TFRecords vs from an in-memory batch [4]; of our frozen
           training vs the backbone's pure inference (forward only, same
           batch, graph mode, in-memory batch) [8]; and the GFLOP/s of each
           training run (FLOPs of the training step counted by TF's profiler)
           against the fp32 matmul peak measured in the same run [7].
  startup  seconds from process start to the end of the first training step,
           ours vs Keras [5].
  serving  p50/p99 latency of the exported image-bytes signature at batch 1
           and 32, vs `tf.saved_model.save` of the same Keras model with the
           same preprocessing, both served TF Serving's way (a session on the
           loaded MetaGraph) [6].
  knobs    our examples/s with --xla, --mixed_precision, --intra/inter_op_threads,
           --prefetch and --cache against the defaults.
  summary  the targets [1]-[8] in one table, from bench/results.json (the
           `features` section gives [3], `train` [4] for the real backbones,
           `input` [4] for the demo CNN).

Every measurement runs in a fresh child process (`python scripts/bench_peers.py
--worker=JSON`): ours and Keras get the same interpreter start, imports and
thread pools, and the startup measurement is a real process start. Runs
alternate ours / peer per repeat; ratios are medians over the repeats (each
ratio pairs runs taken back to back, under the same load). --quick: one
repeat, fewer steps, mobilenet only.

The Keras peer is a normal, well-written `model.fit` script: compiled model,
the same tf.data pipeline (which prefetches), default steps_per_execution (1),
SGD with momentum 0.9 like ours, sparse categorical cross-entropy from logits,
no metrics, verbose=0. Ours runs `Experiment.train` (all the guards and hooks
a user gets, log_every_steps=100); no checkpoint is written inside the timed
steps (Keras writes none either).
"""
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

BATCH = 32
NUM_CLASSES = 5
# name, handle, image size, JPEG source size
BACKBONES = [("mobilenet_v2_0.35_96", "mobilenet_v2(alpha=0.35)", 96, 110),
             ("resnet50_224", "resnet50", 224, 256)]
MATMUL_N = 2048
TARGETS = {1: ">= 1.3", 2: ">= 1.0", 3: ">= 8", 4: ">= 0.85", 5: "<= 1.5", 6: "<= 1.1",
           7: "(report)", 8: ">= 0.9"}


# --- child processes ---------------------------------------------------------------


def run_worker(spec, timeout=900):
  """Runs one measurement in a child process; returns its result dict."""
  spec = dict(spec, t_launch=time.time())
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                         json.dumps(spec)], capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  for line in proc.stdout.splitlines():
    if line.startswith("BENCH_RESULT "):
      return json.loads(line[len("BENCH_RESULT "):])
  raise RuntimeError(f"benchmark worker {spec['kind']} failed (exit {proc.returncode}):\n"
                     f"{proc.stderr[-3000:]}")


def _worker_main(spec):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel("ERROR")
  result = WORKERS[spec["kind"]](spec)
  print("BENCH_RESULT " + json.dumps(result), flush=True)


def _session_config(spec):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.compat.v1.ConfigProto(intra_op_parallelism_threads=spec.get("intra", 0),
                                  inter_op_parallelism_threads=spec.get("inter", 0),
                                  allow_soft_placement=True)


def _memory_batch(spec):
  """One decoded training batch of the JPEG data, as NumPy (the ideal input)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from estimator_transfer.config import InputConfig  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import pipeline  # pylint: disable=g-import-not-at-top
  features, _ = next(iter(pipeline.build_input_fn(
      InputConfig(batch_size=spec["batch"], shuffle_buffer=64), spec["data"], spec["size"],
      training=True, seed=1)()))
  return features["image"].numpy(), np.arange(spec["batch"], dtype=np.int32) % NUM_CLASSES


class _Clock:
  """Step times: the first step's end (since launch) and a steady-state rate."""

  def __init__(self, spec):
    self.t_launch = spec["t_launch"]
    self.warmup = spec.get("warmup", 0)
    self.stop_after = spec.get("stop_after", 0)
    self.steps = 0
    self.first_step_s = None
    self.t_start = self.t_end = None
    self.cpu_start = self.cpu_end = None

  def tick(self):
    """Call after each step; returns True when the run should stop."""
    self.steps += 1
    now = time.perf_counter()
    if self.steps == 1:
      self.first_step_s = time.time() - self.t_launch
    # Process CPU time (all threads): unlike wall time, barely moved by
    # other programs on a shared machine.
    cpu = sum(os.times()[:2])
    if self.steps == self.warmup:
      self.t_start, self.cpu_start = now, cpu
    self.t_end, self.cpu_end = now, cpu
    return bool(self.stop_after) and self.steps >= self.stop_after

  def result(self, batch):
    out = {"first_step_s": self.first_step_s, "steps": self.steps}
    if self.t_start is not None and self.steps > self.warmup:
      examples = (self.steps - self.warmup) * batch
      out["examples_per_s"] = examples / (self.t_end - self.t_start)
      out["cpu_ms_per_example"] = 1000 * (self.cpu_end - self.cpu_start) / examples
    return out


def _ours_config(spec, model_dir):
  from estimator_transfer import config as c  # pylint: disable=g-import-not-at-top
  knobs = spec.get("knobs", {})
  return c.ExperimentConfig(
      backbone=c.BackboneConfig(handle=spec["backbone"], weights="none",
                                image_size=spec["size"]),
      head=c.HeadConfig(num_classes=NUM_CLASSES),
      freeze=c.FreezeConfig(spec["freeze"]),
      schedule=c.ScheduleConfig(values=(0.01,)),
      input=c.InputConfig(train_data=spec["data"], batch_size=spec["batch"],
                          shuffle_buffer=1024, prefetch=knobs.get("prefetch", -1),
                          cache=knobs.get("cache", "")),
      run=c.RunConfig(model_dir=model_dir, max_steps=spec["steps"],
                      save_checkpoints_steps=10 * spec["steps"], seed=1,
                      intra_op_threads=spec.get("intra", 0),
                      inter_op_threads=spec.get("inter", 0),
                      xla=knobs.get("xla", False),
                      mixed_precision=knobs.get("mixed_precision", "float32")))


def worker_ours(spec):
  """Our training (Experiment.train, every guard on) timed by a hook."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_transfer.training import experiment as runner  # pylint: disable=g-import-not-at-top
  clock = _Clock(spec)

  class ClockHook(tf.compat.v1.train.SessionRunHook):
    def after_run(self, run_context, run_values):
      del run_values
      if clock.tick():
        run_context.request_stop()

  model_dir = tempfile.mkdtemp(prefix="et_bench_ours_")
  experiment = runner.Experiment(_ours_config(spec, model_dir))
  if spec["input"] == "memory":
    images, labels = _memory_batch(spec)

    def memory_input_fn():
      ds = tf.data.Dataset.from_tensors(({"image": images}, labels)).repeat()
      return ds.prefetch(2)

    experiment.train_input_fn = lambda: memory_input_fn
  experiment.train(hooks=[ClockHook()])
  return clock.result(spec["batch"])


def _keras_model(spec):
  """The Keras peer: the same application, value range and head as ours."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_transfer.model import backbone_types  # pylint: disable=g-import-not-at-top
  from estimator_transfer.model import keras_backbone  # pylint: disable=g-import-not-at-top
  name, _, args = spec["backbone"].partition("(")
  ctor_name, value_range, _ = keras_backbone.KERAS_APPLICATIONS[name]
  kwargs = keras_backbone.parse_kwargs(args.rstrip(")"), spec["backbone"])
  size = spec["size"]
  base = getattr(tf.keras.applications, ctor_name)(
      include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg", **kwargs)
  inputs = tf.keras.Input((size, size, 3), name="image")
  x = backbone_types.to_value_range(inputs, value_range)
  if spec["freeze"] == "all":
    base.trainable = False
    x = base(x, training=False)
  else:
    x = base(x)
  logits = tf.keras.layers.Dense(NUM_CLASSES, name="logits", dtype="float32")(x)
  return tf.keras.Model(inputs, logits)


def _keras_setup(spec):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if spec.get("intra"):
    tf.config.threading.set_intra_op_parallelism_threads(spec["intra"])
  if spec.get("inter"):
    tf.config.threading.set_inter_op_parallelism_threads(spec["inter"])
  policy = spec.get("knobs", {}).get("mixed_precision", "float32")
  if policy != "float32":
    tf.keras.mixed_precision.set_global_policy(policy)
  tf.keras.utils.set_random_seed(1)


def worker_keras(spec):
  """A plain Keras `fit` script on the same data, batch and threads."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_transfer.config import InputConfig  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import pipeline  # pylint: disable=g-import-not-at-top
  _keras_setup(spec)
  clock = _Clock(spec)
  model = _keras_model(spec)
  model.compile(optimizer=tf.keras.optimizers.SGD(0.01, momentum=0.9),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=spec.get("knobs", {}).get("xla", False))
  if spec["input"] == "memory":
    images, labels = _memory_batch(spec)
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(2)
  else:
    config = InputConfig(batch_size=spec["batch"], shuffle_buffer=1024)
    ds = pipeline.build_input_fn(config, spec["data"], spec["size"], training=True,
                                  seed=1)().map(lambda f, l: (f["image"], l))

  class ClockCallback(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
      del batch, logs
      if clock.tick():
        self.model.stop_training = True

  model.fit(ds, steps_per_epoch=spec["steps"], epochs=1, verbose=0,
            callbacks=[ClockCallback()])
  return clock.result(spec["batch"])


def worker_infer(spec):
  """The limit of frozen training: the backbone's forward pass alone, graph mode."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_transfer import config  # pylint: disable=g-import-not-at-top
  from estimator_transfer.model import backbones  # pylint: disable=g-import-not-at-top
  images, _ = _memory_batch(spec)
  resolved = backbones.resolve(config.BackboneConfig(handle=spec["backbone"], weights="none",
                                                     image_size=spec["size"]))
  with tf.Graph().as_default():
    ds = tf.data.Dataset.from_tensors(images).repeat().prefetch(2)
    batch = tf.compat.v1.data.make_one_shot_iterator(ds).get_next()
    features = resolved.instantiate(batch, "all", training=False).features
    with tf.compat.v1.Session(config=_session_config(spec)) as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      clock = _Clock(spec)
      for _ in range(spec["steps"]):
        sess.run(features)
        clock.tick()
  return clock.result(spec["batch"])


def worker_pipeline(spec):
  """The JPEG TFRecord input_fn alone (training mode), iterated eagerly."""
  from estimator_transfer.config import InputConfig  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import pipeline  # pylint: disable=g-import-not-at-top
  config = InputConfig(batch_size=spec["batch"], shuffle_buffer=1024)
  iterator = iter(pipeline.build_input_fn(config, spec["data"], spec["size"],
                                           training=True, seed=1)())
  clock = _Clock(spec)
  for _ in range(spec["steps"]):
    next(iterator)
    clock.tick()
  return clock.result(spec["batch"])


def _float_ops(graph):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  opts["output"] = "none"
  return int(tf.compat.v1.profiler.profile(graph, options=opts).total_float_ops)


def worker_flops(spec):
  """FLOPs of one training step (frozen and full) and of one forward pass."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_transfer.model import backbones  # pylint: disable=g-import-not-at-top
  from estimator_transfer.model import model_fn as model_fn_lib  # pylint: disable=g-import-not-at-top
  out = {}
  shape = [spec["batch"], spec["size"], spec["size"], 3]
  for freeze in ("all", "none"):
    cfg = _ours_config(dict(spec, freeze=freeze, steps=1), tempfile.mkdtemp())
    resolved = backbones.resolve(cfg.backbone)
    graph = tf.Graph()
    with graph.as_default():
      images = tf.compat.v1.placeholder(tf.float32, shape)
      labels = tf.compat.v1.placeholder(tf.int32, shape[:1])
      model_fn_lib.build_model_fn(cfg, resolved)({"image": images}, labels,
                                                 tf.estimator.ModeKeys.TRAIN)
    out[f"train_{freeze}"] = _float_ops(graph)
  graph = tf.Graph()
  with graph.as_default():
    resolved.instantiate(tf.compat.v1.placeholder(tf.float32, shape), "all", training=False)
  out["forward"] = _float_ops(graph)
  return out


def worker_matmul(spec):
  """The machine's fp32 matmul peak: GFLOP/s of chained n x n matmuls, best of 5."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n, chain = spec.get("n", MATMUL_N), 8
  with tf.Graph().as_default():
    a = tf.Variable(tf.random.normal([n, n], stddev=1.0 / math.sqrt(n), seed=1))
    y = a
    for _ in range(chain):
      y = tf.matmul(y, a)
    with tf.compat.v1.Session(config=_session_config(spec)) as sess:
      sess.run(a.initializer)
      sess.run(y.op)
      best = min(_timed(lambda: sess.run(y.op)) for _ in range(5))
  return {"gflops": chain * 2 * n ** 3 / best / 1e9}


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def worker_export_ours(spec):
  """Trains 2 steps and exports with et-export's code; returns the version dir."""
  from estimator_transfer.training import experiment as runner  # pylint: disable=g-import-not-at-top
  cfg = _ours_config(dict(spec, freeze="all", steps=2), spec["model_dir"])
  experiment = runner.Experiment(cfg)
  experiment.train()
  return {"path": experiment.export(spec["export_dir"])}


def worker_export_keras(spec):
  """The same model as a Keras SavedModel with the same preprocessing."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import preprocessing  # pylint: disable=g-import-not-at-top
  _keras_setup(spec)
  model = _keras_model(dict(spec, freeze="all"))
  size = spec["size"]

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  def serve(image_bytes):
    images = tf.map_fn(lambda b: preprocessing.decode_and_resize(b, size), image_bytes,
                       fn_output_signature=tf.float32)
    probabilities = tf.nn.softmax(model(images, training=False))
    return {"classes": tf.argmax(probabilities, axis=-1), "probabilities": probabilities}

  path = os.path.join(spec["export_dir"], "keras")
  tf.saved_model.save(model, path, signatures={"serving_default": serve})
  return {"path": path}


def worker_serve(spec):
  """p50/p99 latency of a SavedModel signature, served as TF Serving does (Session)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import tfrecords  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import sources  # pylint: disable=g-import-not-at-top
  images = []
  for path in sources.list_tfrecord_files(spec["data"]):
    for record in tfrecords.read_records(path, 64):
      example = tf.train.Example.FromString(record)
      images.append(example.features.feature["image/encoded"].bytes_list.value[0])
  out = {}
  with tf.Graph().as_default(), tf.compat.v1.Session(config=_session_config(spec)) as sess:
    meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], spec["path"])
    signature = meta.signature_def[spec["signature"]]
    feed_name = list(signature.inputs.values())[0].name
    fetches = [t.name for t in signature.outputs.values()]
    for batch, calls in ((1, spec["calls_1"]), (32, spec["calls_32"])):
      feed = {feed_name: np.array([images[i % len(images)] for i in range(batch)],
                                  dtype=object)}
      for _ in range(5):
        sess.run(fetches, feed)
      times = sorted(_timed(lambda: sess.run(fetches, feed)) for _ in range(calls))
      out[f"p50_ms_b{batch}"] = 1000 * times[len(times) // 2]
      out[f"p99_ms_b{batch}"] = 1000 * times[min(len(times) - 1,
                                                 int(math.ceil(0.99 * len(times))) - 1)]
  return out


WORKERS = {"ours": worker_ours, "keras": worker_keras, "infer": worker_infer,
           "pipeline": worker_pipeline,
           "flops": worker_flops, "matmul": worker_matmul,
           "export_ours": worker_export_ours, "export_keras": worker_export_keras,
           "serve": worker_serve}


# --- sections (run in the parent) ---------------------------------------------------


def _median(values):
  return statistics.median(values) if values else float("nan")


def _log(text):
  print(f"benchmark: {text}", flush=True)


def _data(bench, work, name, size, source):
  """JPEG TFRecords for a backbone (written once per section)."""
  path = os.path.join(work, f"jpeg_{name}")
  if not os.path.exists(path):
    bench._write_jpeg_records(path, 256, source)  # pylint: disable=protected-access
  return path


def _backbones(args):
  return BACKBONES[:1] if args.quick else BACKBONES


def _steps(args, size, full):
  """(steps, warmup) per run: a few seconds of steady state each."""
  if size >= 200:
    steps, warmup = (7, 2) if full else (10, 3)
    return (max(4, steps // 2), 1) if args.quick else (steps, warmup)
  steps, warmup = (120, 20) if full else (300, 30)
  return (steps // 2, warmup) if args.quick else (steps, warmup)


def _repeats(args):
  return 1 if args.quick else max(1, args.repeats)


def section_train(args, bench):
  """Ours vs Keras (frozen, full), the inference limit, the input ratio, GFLOP/s."""
  work = tempfile.mkdtemp(prefix="et_bench_train_")
  rows = []
  try:
    peak = run_worker({"kind": "matmul"})["gflops"]
    _log(f"fp32 matmul peak ({MATMUL_N}x{MATMUL_N}): {peak:.0f} GFLOP/s")
    rows.append({"measure": f"machine fp32 matmul peak, GFLOP/s ({MATMUL_N}^2, "
                            "chained, best of 5)", "ours": peak, "peer": "", "ratio": ""})
    for name, handle, size, source in _backbones(args):
      data = _data(bench, work, name, size, source)
      base = {"backbone": handle, "size": size, "batch": BATCH, "data": data}
      flops = run_worker(dict(base, kind="flops"))
      _log(f"{name}: GFLOP per step: frozen {flops['train_all'] / 1e9:.1f}, full "
           f"{flops['train_none'] / 1e9:.1f}, forward {flops['forward'] / 1e9:.1f}")
      for freeze, full in (("all", False), ("none", True)):
        steps, warmup = _steps(args, size, full)
        run = dict(base, freeze=freeze, steps=steps, warmup=warmup)
        rates = {k: [] for k in ("ours", "keras", "ours_memory", "keras_memory", "infer",
                                 "pipeline")}
        cpu = {}
        for _ in range(_repeats(args)):
          kinds = [("ours", "ours", "jpeg"), ("keras", "keras", "jpeg")]
          if not full:
            kinds += [("ours_memory", "ours", "memory"), ("keras_memory", "keras", "memory"),
                      ("infer", "infer", "memory"), ("pipeline", "pipeline", "jpeg")]
          for key, kind, source_kind in kinds:
            spec = dict(run, kind=kind, input=source_kind)
            if kind == "pipeline":
              spec.update(steps=4 * steps, warmup=warmup)
            result = run_worker(spec)
            rate = result["examples_per_s"]
            rates[key].append(rate)
            cpu.setdefault(key, []).append(result["cpu_ms_per_example"])
            _log(f"{name} {'full' if full else 'frozen'} {key}: {rate:.1f} examples/s, "
                 f"{result['cpu_ms_per_example']:.2f} CPU-ms per example")
        label = "full fine-tuning" if full else "frozen backbone"
        ratios = [o / k for o, k in zip(rates["ours"], rates["keras"])]
        rows.append({"measure": f"[{2 if full else 1}] {name}, {label}: examples/s ours vs "
                                "Keras fit", "ours": _median(rates["ours"]),
                     "peer": _median(rates["keras"]), "ratio": _median(ratios)})
        # Inverted (Keras / ours): above 1 means ours needs less CPU per example.
        rows.append({"measure": f"[{2 if full else 1}c] {name}, {label}: CPU-ms per example, "
                                "ours vs Keras fit (ratio Keras/ours)",
                     "ours": _median(cpu["ours"]), "peer": _median(cpu["keras"]),
                     "ratio": _median([k / o for o, k in zip(cpu["ours"], cpu["keras"])])})
        gflop = flops["train_none" if full else "train_all"] / 1e9 / BATCH
        achieved = _median(rates["ours"]) * gflop
        rows.append({"measure": f"[7] {name}, {label}: achieved GFLOP/s (ours; Keras) vs "
                                "matmul peak", "ours": achieved,
                     "peer": _median(rates["keras"]) * gflop, "ratio": achieved / peak})
        if not full:
          rows.append({"measure": f"[4] {name}, frozen: examples/s JPEG TFRecords vs "
                                  "in-memory batch", "ours": _median(rates["ours"]),
                       "peer": _median(rates["ours_memory"]),
                       "ratio": _median([j / m for j, m in zip(rates["ours"],
                                                               rates["ours_memory"])])})
          # Decoding and training share the cores: their CPU times add up, so
          # with the pipeline alone at P images/s and in-memory training at M,
          # JPEG training can reach at most 1 / (1 + M / P) of M.
          bound = [1 / (1 + m / p) for m, p in zip(rates["ours_memory"], rates["pipeline"])]
          rows.append({"measure": f"[4'] {name}: input_fn alone images/s; the ratio [4] "
                                  "can reach when CPU times add up",
                       "ours": _median(rates["pipeline"]), "peer": "",
                       "ratio": _median(bound)})
          rows.append({"measure": f"[8] {name}: frozen training (in-memory) vs pure "
                                  "inference examples/s", "ours": _median(rates["ours_memory"]),
                       "peer": _median(rates["infer"]),
                       "ratio": _median([o / i for o, i in zip(rates["ours_memory"],
                                                               rates["infer"])])})
          # The same limit for the peer: how much room [1] has at all.
          rows.append({"measure": f"[8'] {name}: Keras fit frozen (in-memory) vs pure "
                                  "inference examples/s",
                       "ours": _median(rates["keras_memory"]), "peer": _median(rates["infer"]),
                       "ratio": _median([k / i for k, i in zip(rates["keras_memory"],
                                                               rates["infer"])])})
  finally:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(work, ignore_errors=True)
  return rows


def section_startup(args, bench):
  """[5] Process start -> end of the first training step, ours vs Keras."""
  work = tempfile.mkdtemp(prefix="et_bench_startup_")
  rows = []
  try:
    for name, handle, size, source in _backbones(args):
      data = _data(bench, work, name, size, source)
      for freeze in ("all",) if args.quick else ("all", "none"):
        spec = {"backbone": handle, "size": size, "batch": BATCH, "data": data,
                "freeze": freeze, "input": "jpeg", "steps": 100, "stop_after": 1}
        times = {"ours": [], "keras": []}
        for _ in range(max(2, _repeats(args))):
          for kind in ("ours", "keras"):
            times[kind].append(run_worker(dict(spec, kind=kind))["first_step_s"])
            _log(f"{name} freeze={freeze} {kind}: first step after "
                 f"{times[kind][-1]:.1f}s")
        rows.append({"measure": f"[5] {name}, freeze={freeze}: s from process start to "
                                "first step, ours vs Keras", "ours": _median(times["ours"]),
                     "peer": _median(times["keras"]),
                     "ratio": _median([o / k for o, k in zip(times["ours"],
                                                             times["keras"])])})
  finally:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(work, ignore_errors=True)
  return rows


def section_serving(args, bench):
  """[6] Latency of our image-bytes signature vs a plain Keras SavedModel."""
  work = tempfile.mkdtemp(prefix="et_bench_serving_")
  rows = []
  try:
    for name, handle, size, source in _backbones(args):
      data = _data(bench, work, name, size, source)
      base = {"backbone": handle, "size": size, "batch": BATCH, "data": data}
      ours = run_worker(dict(base, kind="export_ours", model_dir=os.path.join(work, f"m_{name}"),
                             export_dir=os.path.join(work, f"export_{name}")))["path"]
      keras = run_worker(dict(base, kind="export_keras",
                              export_dir=os.path.join(work, f"export_{name}")))["path"]
      small = size < 200
      # p99 needs a few hundred calls to be more than the slowest one.
      calls = {"calls_1": (200 if small else 60) * (1 if args.quick else 3),
               "calls_32": (30 if small else 6) * (1 if args.quick else 3)}
      results = {"ours": [], "keras": []}
      for _ in range(_repeats(args)):
        for kind, path, signature in (("ours", ours, "predict"),
                                      ("keras", keras, "serving_default")):
          results[kind].append(run_worker(dict(base, kind="serve", path=path,
                                               signature=signature, **calls)))
          _log(f"{name} serving {kind}: {results[kind][-1]}")
      for batch in (1, 32):
        for stat in ("p50", "p99"):
          key = f"{stat}_ms_b{batch}"
          o = [r[key] for r in results["ours"]]
          k = [r[key] for r in results["keras"]]
          rows.append({"measure": f"[6] {name}: {stat} latency ms, batch {batch}, image "
                                  "bytes, ours vs Keras SavedModel", "ours": _median(o),
                       "peer": _median(k),
                       "ratio": _median([a / b for a, b in zip(o, k)])})
  finally:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(work, ignore_errors=True)
  return rows


# knob label -> (freeze, knobs, intra, inter)
KNOB_RUNS = [
    ("defaults", "all", {}, 0, 0),
    ("--prefetch=0", "all", {"prefetch": 0}, 0, 0),
    ("--cache=memory", "all", {"cache": "memory"}, 0, 0),
    ("--xla", "all", {"xla": True}, 0, 0),
    ("--mixed_precision=mixed_bfloat16", "all", {"mixed_precision": "mixed_bfloat16"}, 0, 0),
    ("--intra_op_threads=2 --inter_op_threads=1", "all", {}, 2, 1),
    ("defaults", "none", {}, 0, 0),
    ("--xla", "none", {"xla": True}, 0, 0),
    ("--mixed_precision=mixed_bfloat16", "none", {"mixed_precision": "mixed_bfloat16"}, 0, 0),
    ("--mixed_precision=mixed_float16", "none", {"mixed_precision": "mixed_float16"}, 0, 0),
    ("--intra_op_threads=2 --inter_op_threads=1", "none", {}, 2, 1),
]
QUICK_KNOBS = ("defaults", "--mixed_precision=mixed_bfloat16", "--cache=memory")


def section_knobs(args, bench):
  """Our examples/s per performance knob (mobilenet, JPEG TFRecords) vs the defaults."""
  work = tempfile.mkdtemp(prefix="et_bench_knobs_")
  rows = []
  try:
    name, handle, size, source = BACKBONES[0]
    data = _data(bench, work, name, size, source)
    runs = [r for r in KNOB_RUNS if not args.quick or (r[0] in QUICK_KNOBS and
                                                        r[1] == "all")]
    rates = {(label, freeze): [] for label, freeze, *_ in runs}
    for _ in range(_repeats(args)):
      for label, freeze, knobs, intra, inter in runs:
        steps, warmup = _steps(args, size, freeze == "none")
        if knobs.get("xla") or knobs.get("mixed_precision") == "mixed_float16":
          # XLA's CPU convolutions (~10x) and float16 on CPU (~25x) are much
          # slower here: fewer steps (XLA compiles in the first one).
          steps, warmup = 12, 3
        spec = {"kind": "ours", "backbone": handle, "size": size, "batch": BATCH,
                "data": data, "freeze": freeze, "input": "jpeg", "knobs": knobs,
                "intra": intra, "inter": inter, "steps": steps, "warmup": warmup}
        rates[(label, freeze)].append(run_worker(spec)["examples_per_s"])
        _log(f"knob {label} freeze={freeze}: {rates[(label, freeze)][-1]:.1f} examples/s")
    for (label, freeze), values in rates.items():
      default = rates[("defaults", freeze)]
      rows.append({"measure": f"{name}, {'frozen' if freeze == 'all' else 'full'}: {label}",
                   "ours": _median(values), "peer": _median(default),
                   "ratio": _median([v / d for v, d in zip(values, default)])})
  finally:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(work, ignore_errors=True)
  return rows


def _find(results, section, prefix, contains=""):
  for row in results.get(section, {}).get("rows", []):
    if row.get("measure", "").startswith(prefix) and contains in row["measure"]:
      return row
  return None


def section_summary(args, bench):
  """The targets [1]-[8] from bench/results.json, with whether each is met."""
  del args
  if not os.path.exists(bench.RESULTS_PATH):
    return []
  with open(bench.RESULTS_PATH) as f:
    results = json.load(f)
  rows = []
  for name, result in sorted(results.items()):
    m = result.get("machine", {})
    _log(f"{name}: measured {result.get('measured_at')}{' (quick)' if result.get('quick') else ''}"
         f" on {m.get('cpus')} x {m.get('cpu', '?')}, TF {m.get('tensorflow', '?')}, "
         f"1-min load {m.get('load_average_1min', '?')}")

  def add(target, what, row):
    if row is None:
      return
    value = row["ratio"] if "ratio" in row else row.get("value")
    goal = TARGETS[target]
    met = ""
    if isinstance(value, (int, float)) and goal[:2] in (">=", "<="):
      bound = float(goal[2:])
      met = "yes" if (value >= bound if goal[:2] == ">=" else value <= bound) else "no"
    rows.append({"target": f"[{target}] {what}", "ours": row.get("ours", ""),
                 "peer": row.get("peer", ""), "ratio": value, "goal": goal, "met": met})

  def note(label, row):
    if row:
      rows.append({"target": label, "ours": row["ours"], "peer": row["peer"],
                   "ratio": row["ratio"], "goal": "", "met": ""})

  for name, *_ in BACKBONES:
    add(1, f"{name} frozen: ours / Keras fit examples/s",
        _find(results, "train", "[1]", name))
    note(f"(for [1]) {name} frozen: CPU-ms per example, Keras / ours",
         _find(results, "train", "[1c]", name))
    add(2, f"{name} full fine-tuning: ours / Keras fit examples/s",
        _find(results, "train", "[2]", name))
    note(f"(for [2]) {name} full: CPU-ms per example, Keras / ours",
         _find(results, "train", "[2c]", name))
  for row in results.get("features", {}).get("rows", []):
    if "speedup ordinary / cached head training" in row["measure"]:
      add(3, row["measure"].split(":")[0] + ": 20 epochs ordinary frozen / cached head "
          "training", row)
  for name, *_ in BACKBONES:
    add(4, f"{name}: frozen training JPEG TFRecords / in-memory",
        _find(results, "train", "[4]", name))
    note(f"(for [4]) {name}: input_fn alone images/s; the [4] that adding CPU times "
         "allows", _find(results, "train", "[4']", name))
  for row in results.get("input", {}).get("rows", []):
    if row["measure"].startswith("ratio TFRecords/memory"):
      add(4, "demo CNN (input section): " + row["measure"].split(",")[1].strip()
          + " TFRecords / in-memory", row)
  for name, *_ in BACKBONES:
    for freeze in ("all", "none"):
      add(5, f"{name} freeze={freeze}: s to first step, ours / Keras",
          _find(results, "startup", "[5]", f"{name}, freeze={freeze}"))
  for name, *_ in BACKBONES:
    for batch in (1, 32):
      for stat in ("p50", "p99"):
        add(6, f"{name} serving {stat} batch {batch}: ours / Keras SavedModel",
            _find(results, "serving", "[6]", f"{name}: {stat} latency ms, batch {batch},"))
  for name, *_ in BACKBONES:
    for label in ("frozen backbone", "full fine-tuning"):
      add(7, f"{name} {label}: achieved GFLOP/s / matmul peak",
          _find(results, "train", "[7]", f"{name}, {label}"))
  for name, *_ in BACKBONES:
    add(8, f"{name}: frozen training / pure inference examples/s",
        _find(results, "train", "[8]", name))
    note(f"(for [1]) {name}: Keras fit frozen / pure inference",
         _find(results, "train", "[8']", name))
  return rows


SECTIONS = {"train": section_train, "startup": section_startup, "serving": section_serving,
            "knobs": section_knobs, "summary": section_summary}


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker_main(json.loads(sys.argv[2]))
  else:
    sys.exit("usage: run scripts/benchmark.py (this file holds its peer sections)")
