"""Cluster jobs: TF_CONFIG, this task's role, platform conventions, strategies.

A batch job runs the same `et-train` command in every process; TensorFlow's
TF_CONFIG environment variable tells each one its role:

  {"cluster": {"chief": ["h0:2222"], "worker": ["h1:2222"], "ps": ["h2:2222"]},
   "task": {"type": "worker", "index": 0}}

  chief      trains, writes checkpoints and summaries, exports at the end
             (`master` is the older name some platforms still use)
  worker     trains: asynchronously against the ps tasks, or in sync (all-reduce)
  ps         holds the variables and serves them; it never exits by itself,
             the job (or `et-local-cluster`) stops it
  evaluator  evaluates every new checkpoint until one reaches max_steps; it
             is NOT part of the training cluster spec (listed there anyway by
             some platforms: it is then dropped from what the trainers see)

Without TF_CONFIG, or with a cluster of one chief only, a job runs locally.
What each role runs is in `cluster.roles`; every role goes through the one
training loop (`training.loop`).

`--distribution` picks how the trainers cooperate (TF 2.15 Estimator):

  none                   local: one device; cluster: Estimator's own
                         between-graph replication, asynchronous, variables on
                         the ps tasks (needs ps tasks when there are workers);
                         a dead worker does not stop the job
  mirrored               one machine, in-graph sync over its GPUs
                         (tf.compat.v1.distribute.MirroredStrategy)
  multi_worker_mirrored  chief + workers, no ps: sync all-reduce
                         (tf.compat.v1.distribute.experimental.
                         MultiWorkerMirroredStrategy); every worker must live
  parameter_server       chief + workers + ps, via the distribute coordinator
                         (tf.compat.v1.distribute.experimental.
                         ParameterServerStrategy)

Platform conventions (fallbacks when the flag is not given):

  --model_dir    AIP_CHECKPOINT_DIR (Vertex AI)
  --export_dir   AIP_MODEL_DIR (Vertex AI), SM_MODEL_DIR (SageMaker)
  --summary_dir  AIP_TENSORBOARD_LOG_DIR (Vertex AI)
  --train_data   SM_CHANNEL_TRAINING (SageMaker)
  --eval_data    SM_CHANNEL_EVAL, SM_CHANNEL_VALIDATION (SageMaker)

This module parses and checks without importing TensorFlow (the CLI's argv
handling uses it); only `session_config` and `build_strategy` import it.
"""
import contextlib
import dataclasses
import json
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from estimator_transfer.errors import ConfigError

from estimator_transfer.config import DISTRIBUTIONS

TF_CONFIG = "TF_CONFIG"
CHIEF, MASTER, WORKER, PS, EVALUATOR, LOCAL = (
    "chief", "master", "worker", "ps", "evaluator", "local")
TRAINING_JOBS = (CHIEF, MASTER, WORKER, PS)
TASK_TYPES = TRAINING_JOBS + (EVALUATOR,)

# flag -> environment variables that stand in for it, first set wins.
PLATFORM_FALLBACKS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("model_dir", ("AIP_CHECKPOINT_DIR",)),
    ("export_dir", ("AIP_MODEL_DIR", "SM_MODEL_DIR")),
    ("summary_dir", ("AIP_TENSORBOARD_LOG_DIR",)),
    ("train_data", ("SM_CHANNEL_TRAINING",)),
    ("eval_data", ("SM_CHANNEL_EVAL", "SM_CHANNEL_VALIDATION")),
)

_ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")
_BOOL_WORDS = ("true", "false", "t", "f", "1", "0", "yes", "no")


@dataclasses.dataclass(frozen=True)
class Task:
  """This process's place in a job.

  Attributes:
    task_type: chief, master, worker, ps, evaluator, or local (no cluster).
    index: the task's index within its job.
    cluster: the training cluster, job -> addresses (never the evaluator).
    tf_model_dir: a `model_dir` given inside TF_CONFIG, if any.
    dropped_evaluator: TF_CONFIG listed an evaluator job in the cluster.
  """
  task_type: str = LOCAL
  index: int = 0
  cluster: Mapping[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)
  tf_model_dir: str = ""
  dropped_evaluator: bool = False

  @property
  def is_local(self) -> bool:
    return self.task_type == LOCAL

  @property
  def is_chief(self) -> bool:
    """Whether this task checkpoints, writes summaries and exports."""
    return self.task_type in (CHIEF, MASTER, LOCAL)

  @property
  def trains(self) -> bool:
    return self.task_type in (CHIEF, MASTER, WORKER, LOCAL)

  @property
  def name(self) -> str:
    return self.task_type if self.is_local else f"{self.task_type}-{self.index}"

  @property
  def address(self) -> str:
    addresses = self.cluster.get(self.task_type, ())
    return addresses[self.index] if self.index < len(addresses) else ""

  @property
  def num_ps(self) -> int:
    return len(self.cluster.get(PS, ()))

  @property
  def num_trainers(self) -> int:
    """Chief (or master) plus workers."""
    return sum(len(self.cluster.get(j, ())) for j in (CHIEF, MASTER, WORKER))

  def tf_config(self) -> dict:
    """The TF_CONFIG Estimator should see: normalised, no evaluator in the cluster."""
    if self.is_local:
      return {}
    config = {"cluster": {job: list(a) for job, a in self.cluster.items()},
              "task": {"type": self.task_type, "index": self.index}}
    if self.tf_model_dir:
      config["model_dir"] = self.tf_model_dir
    return config


def tf_config_present(environ: Optional[Mapping[str, str]] = None) -> bool:
  """Whether TF_CONFIG asks for a cluster job (set, and not blank or `{}`)."""
  environ = os.environ if environ is None else environ
  text = environ.get(TF_CONFIG, "").strip()
  return bool(text) and text.replace(" ", "") != "{}"


def current_task(environ: Optional[Mapping[str, str]] = None) -> Task:
  """This process's Task from TF_CONFIG; a local Task without it.

  Raises:
    ConfigError: TF_CONFIG is malformed (see `parse_tf_config`).
  """
  environ = os.environ if environ is None else environ
  if not tf_config_present(environ):
    return Task()
  return parse_tf_config(environ[TF_CONFIG])


def parse_tf_config(text: str) -> Task:
  """Parses and checks a TF_CONFIG JSON string.

  A cluster of one chief and nothing else becomes a local Task (Estimator
  too runs such a "cluster" in-process).

  Args:
    text: the TF_CONFIG value.

  Returns:
    The Task it describes.

  Raises:
    ConfigError: not a JSON object; no or an empty cluster; an unknown job;
      addresses that are not host:port or appear twice; no chief, or both a
      chief and a master, or more than one of them; a task type or index
      outside the cluster; an evaluator other than index 0.
  """
  try:
    data = json.loads(text)
  except ValueError as e:
    raise ConfigError(f"TF_CONFIG is not valid JSON ({e}); set it to an object such "
                      'as {"cluster": {...}, "task": {"type": "chief", "index": 0}}.'
                      ) from None
  if not isinstance(data, dict):
    raise ConfigError("TF_CONFIG must be a JSON object with 'cluster' and 'task'.")
  task = data.get("task") or {}
  if not isinstance(task, dict):
    raise ConfigError("TF_CONFIG 'task' must be an object such as "
                      '{"type": "worker", "index": 0}.')
  task_type = str(task.get("type", "")).strip().lower()
  index = task.get("index", 0)
  if task_type not in TASK_TYPES:
    raise ConfigError(f"TF_CONFIG task type {task.get('type')!r} is not one of "
                      f"{', '.join(TASK_TYPES)}; fix task.type.")
  if isinstance(index, str) and index.strip().isdigit():
    index = int(index)
  if isinstance(index, bool) or not isinstance(index, int) or index < 0:
    raise ConfigError(f"TF_CONFIG task index {task.get('index')!r} must be a "
                      "non-negative integer.")
  cluster, dropped_evaluator = _parse_cluster(data.get("cluster"), task_type)
  model_dir = data.get("model_dir") or ""
  if task_type == EVALUATOR:
    if index != 0:
      raise ConfigError(f"TF_CONFIG task evaluator index {index}: Estimator runs one "
                        "evaluator, with index 0; run a single evaluator task.")
    return Task(EVALUATOR, 0, cluster, model_dir, dropped_evaluator)
  addresses = cluster.get(task_type, ())
  if index >= len(addresses):
    raise ConfigError(f"TF_CONFIG task {task_type} index {index} is out of range: the "
                      f"cluster lists {len(addresses)} {task_type} task(s) "
                      f"(indices 0-{len(addresses) - 1}).")
  if task_type == CHIEF and set(cluster) == {CHIEF}:
    return Task(LOCAL, 0, {}, model_dir, dropped_evaluator)
  return Task(task_type, index, cluster, model_dir, dropped_evaluator)


def _parse_cluster(cluster, task_type: str) -> Tuple[Dict[str, Tuple[str, ...]], bool]:
  if cluster is None or cluster == {}:
    raise ConfigError("TF_CONFIG has no 'cluster'; list the jobs, e.g. "
                      '{"chief": ["host0:2222"], "worker": [...], "ps": [...]}.')
  if not isinstance(cluster, dict):
    raise ConfigError("TF_CONFIG 'cluster' must map job names to lists of host:port.")
  parsed, seen = {}, {}
  for job, addresses in cluster.items():
    if job not in TASK_TYPES:
      raise ConfigError(f"TF_CONFIG cluster job {job!r} is unknown; use chief, "
                        "worker, ps (and master for older platforms).")
    if isinstance(addresses, str):
      addresses = [addresses]
    if not isinstance(addresses, (list, tuple)) or not addresses:
      raise ConfigError(f"TF_CONFIG cluster job {job!r} must be a non-empty list of "
                        "host:port addresses.")
    for address in addresses:
      match = _ADDRESS_RE.match(str(address).strip())
      if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"TF_CONFIG cluster address {address!r} of job {job!r} is "
                          "not host:port (port 1-65535).")
      if address in seen:
        raise ConfigError(f"TF_CONFIG cluster address {address} is listed for both "
                          f"{seen[address]} and {job}; give every task its own "
                          "host:port.")
      seen[address] = job
    parsed[job] = tuple(str(a).strip() for a in addresses)
  dropped_evaluator = EVALUATOR in parsed
  if dropped_evaluator:
    if len(parsed[EVALUATOR]) > 1:
      raise ConfigError("TF_CONFIG lists several evaluator tasks; Estimator runs one "
                        "evaluator: keep one (and it is not part of the cluster spec).")
    del parsed[EVALUATOR]
  chiefs = len(parsed.get(CHIEF, ())) + len(parsed.get(MASTER, ()))
  if CHIEF in parsed and MASTER in parsed:
    raise ConfigError("TF_CONFIG lists both a chief and a master job; keep one "
                      "(chief).")
  if chiefs != 1:
    raise ConfigError(
        f"TF_CONFIG's cluster has {chiefs or 'no'} chief task(s); it needs exactly "
        "one 'chief' (TFJob: a Chief replica; Vertex AI: workerPoolSpecs[0] with "
        "replicaCount 1), which checkpoints and exports.")
  return parsed, dropped_evaluator


def check(task: Task, distribution: str, model_dir: str) -> List[str]:
  """Checks a task against the run settings; returns warnings worth printing.

  Args:
    task: from `current_task`.
    distribution: one of DISTRIBUTIONS.
    model_dir: the resolved --model_dir.

  Returns:
    Warnings (things that may be fine, e.g. a local model_dir on several hosts).

  Raises:
    ConfigError: the distribution does not fit the cluster, or TF_CONFIG's
      model_dir disagrees with --model_dir.
  """
  if distribution not in DISTRIBUTIONS:
    raise ConfigError(f"--distribution={distribution} is not one of "
                      f"{', '.join(DISTRIBUTIONS)}.")
  if task.tf_model_dir and model_dir and (
      task.tf_model_dir.rstrip("/") != model_dir.rstrip("/")):
    raise ConfigError(f"TF_CONFIG's model_dir {task.tf_model_dir} differs from "
                      f"--model_dir={model_dir}; every task must use one directory: "
                      "drop one of them or make them equal.")
  warnings = []
  if task.is_local:
    if distribution in ("multi_worker_mirrored", "parameter_server"):
      warnings.append(f"--distribution={distribution} without a cluster: training "
                      "runs locally on one process (set TF_CONFIG for a cluster job).")
    return warnings
  workers, ps = len(task.cluster.get(WORKER, ())), task.num_ps
  if MASTER in task.cluster and distribution != "none":
    raise ConfigError(f"--distribution={distribution} does not support a 'master' job "
                      "(Estimator's distribute coordinator needs 'chief'); rename the "
                      "job to chief or use --distribution=none.")
  if distribution == "none" and workers and not ps:
    raise ConfigError(
        f"the cluster has {workers} worker(s) but no ps task: --distribution=none "
        "trains asynchronously with the variables on ps tasks; add ps tasks, or use "
        "--distribution=multi_worker_mirrored for synchronous all-reduce.")
  if distribution == "parameter_server" and not ps:
    raise ConfigError("--distribution=parameter_server needs ps tasks in TF_CONFIG's "
                      "cluster; add them or use --distribution=multi_worker_mirrored.")
  if distribution == "multi_worker_mirrored" and ps:
    raise ConfigError("--distribution=multi_worker_mirrored keeps the variables on "
                      "the workers; remove the ps tasks from the cluster or use "
                      "--distribution=parameter_server.")
  if distribution == "mirrored" and (workers or ps):
    raise ConfigError("--distribution=mirrored is for one machine (its GPUs); for a "
                      "cluster use multi_worker_mirrored or parameter_server.")
  hosts = {a.rsplit(":", 1)[0] for addresses in task.cluster.values() for a in addresses}
  if len(hosts) > 1 and model_dir and not _is_shared_path(model_dir):
    warnings.append(f"--model_dir={model_dir} is a local path but the cluster spans "
                    f"{len(hosts)} hosts: every task must see the same directory "
                    "(a shared mount, gs://, s3:// or hdfs://).")
  return warnings


def _is_shared_path(path: str) -> bool:
  return "://" in path


@contextlib.contextmanager
def tf_config_env(task: Task, environ=None):
  """Shows Estimator the normalised TF_CONFIG of `task` within the block.

  Estimator reads TF_CONFIG from the environment itself (RunConfig, the
  distribute coordinator): this hands it the checked version (no evaluator in
  the cluster; none at all for a local task) and restores the original after.
  """
  environ = os.environ if environ is None else environ
  original = environ.get(TF_CONFIG)
  normalised = task.tf_config()
  if normalised:
    environ[TF_CONFIG] = json.dumps(normalised)
  else:
    environ.pop(TF_CONFIG, None)
  try:
    yield
  finally:
    if original is None:
      environ.pop(TF_CONFIG, None)
    else:
      environ[TF_CONFIG] = original


def session_config(task: Task, distribution: str, intra_op_threads: int = 0,
                   inter_op_threads: int = 0):
  """The tf.compat.v1.ConfigProto for this task.

  In a cluster: device filters so the chief and each worker talk only to the
  ps tasks and themselves (Estimator sets them only when it makes the
  session config, and without them a trainer waits for every task, dead
  workers and a never-started evaluator included), and
  share_cluster_devices_in_session so functions (restored from TF2
  SavedModels by hub.KerasLayer, or in input pipelines) can use resources the
  device setter put on a ps; without it the session fails with "Assigned
  device '/job:ps/...' does not match any device".
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # heavy: parsing stays TF-free
  config = tf.compat.v1.ConfigProto(
      intra_op_parallelism_threads=intra_op_threads,
      inter_op_parallelism_threads=inter_op_threads,
      allow_soft_placement=True)
  if task.is_local or task.task_type == EVALUATOR:
    return config
  config.experimental.share_cluster_devices_in_session = True
  if distribution == "none":
    if task.task_type in (CHIEF, MASTER):
      config.device_filters.extend(["/job:ps", f"/job:{task.task_type}"])
    elif task.task_type == WORKER:
      config.device_filters.extend(["/job:ps", f"/job:worker/task:{task.index}"])
  return config


def build_strategy(distribution: str, task: Task):
  """The tf.distribute strategy for `--distribution`, or None.

  Estimator's distribute coordinator configures each task's copy from
  TF_CONFIG. Call it inside `tf_config_env(task)` and before anything runs a
  TensorFlow op: MultiWorkerMirroredStrategy configures collective ops, which
  TF 2 only allows at program start.
  """
  if distribution == "none" or task.task_type in (PS, EVALUATOR):
    return None  # a ps only serves; the evaluator evaluates on its own
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # heavy: parsing stays TF-free
  if distribution == "mirrored":
    return tf.compat.v1.distribute.MirroredStrategy()
  if task.is_local:
    # No cluster: both multi-worker strategies degrade to this process's devices.
    return tf.compat.v1.distribute.MirroredStrategy()
  if distribution == "multi_worker_mirrored":
    # Reads TF_CONFIG (call inside `tf_config_env`) and, eager as TF2 is,
    # starts this task's server now; the coordinator then configures it.
    return tf.compat.v1.distribute.experimental.MultiWorkerMirroredStrategy()
  return tf.compat.v1.distribute.experimental.ParameterServerStrategy()


def platform_fallback_args(environ: Optional[Mapping[str, str]] = None,
                           defined: Optional[Sequence[str]] = None) -> List[str]:
  """`--flag=value` arguments for the platform environment variables that are set.

  They go in front of the user's arguments, so any flag given on the command
  line or in a --flagfile still wins.

  Args:
    environ: the environment (os.environ by default).
    defined: the flag names the program defines; others are skipped.
  """
  environ = os.environ if environ is None else environ
  args = []
  for flag, variables in PLATFORM_FALLBACKS:
    if defined is not None and flag not in defined:
      continue
    for variable in variables:
      value = environ.get(variable, "").strip()
      if value:
        args.append(f"--{flag}={value}")
        break
  return args


def join_bool_values(argv: Sequence[str], bool_flags: Sequence[str]) -> List[str]:
  """Rewrites `--flag True` (SageMaker's form) into `--flag=True` for booleans.

  absl reads `--flag` alone as true and would take the next word as a
  positional argument; only boolean flags followed by a boolean word are
  joined, so `--model_dir True` stays as it is.
  """
  names = set(bool_flags)
  out, i = [], 0
  argv = list(argv)
  while i < len(argv):
    arg = argv[i]
    name = arg.lstrip("-")
    if (arg.startswith("-") and "=" not in arg and name in names and
        i + 1 < len(argv) and argv[i + 1].strip().lower() in _BOOL_WORDS):
      value = argv[i + 1].strip().lower()
      value = {"yes": "true", "no": "false"}.get(value, value)
      out.append(f"--{name}={value}")
      i += 2
      continue
    out.append(arg)
    i += 1
  return out
