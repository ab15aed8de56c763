"""Warm start: a fresh run starts from another model's variables.

`tf.estimator.WarmStartSettings` with a regex covers trainable variables only
(BatchNorm moving statistics and EMA shadows keep their initial values), fails
on a variable whose shape changed, and runs before the backbone's pretrained
init_fn, which would then overwrite the warm-started backbone. Here the warm
start is part of the Scaffold's init_fn, after the pretrained weights are
assigned, and so, like them, runs only when model_dir has no checkpoint yet:

* every global variable whose name and shape match the source is restored
  (weights, BatchNorm statistics, EMA shadows), except the global step and
  the optimizer's state: a warm start begins a new schedule;
* class-indexed variables of the logits layer (`head_logits/*`, last axis =
  classes) are merged by class name when both class lists are known, so the
  rows of the classes the source knew are kept and new classes start fresh;
* an EMA shadow the source lacks (an export holds no shadows) starts at the
  source's value of its variable, not at the pretrained one;
* anything else whose shape changed is skipped and keeps its initializer;
* with `--warm_start_map=OLD=NEW,...` (a checkpoint of another framework or
  codebase), a source variable named OLD<rest> is read as NEW<rest>, first
  matching pair first; every source variable not used is listed with the
  reason (optimizer state, no such variable here, shape changed).

What was restored, merged, skipped and re-initialised is logged and written
to `model_dir/warm_start.json`.
"""
import dataclasses
import json
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from estimator_transfer.training import checkpoints
from estimator_transfer import config as config_lib
from estimator_transfer import files
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.data import relabel
from estimator_transfer.errors import ConfigError

log = logging.getLogger("estimator_transfer")

RECORD_FILENAME = "warm_start.json"
LOGITS_PREFIX = "head_logits/"
EMA_SUFFIX = "/ExponentialMovingAverage"
_NON_SLOT_OPTIMIZER_RE = re.compile(r"^(global_step|beta1_power|beta2_power)(_\d+)?$")
_EXPORT_METADATA = os.path.join("assets.extra", "et_export.json")


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved warm-start source."""
  checkpoint: str  # checkpoint prefix the variables are read from
  class_names: Optional[Tuple[str, ...]]  # None when the source does not say


def resolve_source(path: str) -> Source:
  """Resolves `--warm_start_from`: a checkpoint, a model_dir or a SavedModel.

  Args:
    path: a checkpoint prefix (`run/model.ckpt-500`), a model_dir (its latest
      checkpoint), a SavedModel directory (its `variables/variables`), or a TF
      Serving base directory (its newest version).

  Returns:
    The Source.

  Raises:
    ConfigError: nothing readable is there.
  """
  path = path.rstrip("/") if path != "/" else path
  if tf.io.gfile.exists(path + ".index"):
    checkpoints.verify(path, read_tensors=False)
    return Source(path, _config_class_names(os.path.dirname(path)))
  if not tf.io.gfile.isdir(path):
    raise ConfigError(f"--warm_start_from={path} does not exist; give a checkpoint "
                      "(model_dir/model.ckpt-N), a model_dir or an exported SavedModel.")
  if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
    versions = sorted((int(d.rstrip("/")) for d in tf.io.gfile.listdir(path)
                       if d.rstrip("/").isdigit() and tf.io.gfile.exists(
                           os.path.join(path, d.rstrip("/"), "saved_model.pb"))))
    if versions and not checkpoints.list_candidates(path):
      path = os.path.join(path, str(versions[-1]))
  if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
    prefix = os.path.join(path, "variables", "variables")
    if not tf.io.gfile.exists(prefix + ".index"):
      raise ConfigError(f"--warm_start_from={path} is a SavedModel without "
                        "variables/variables.index; export it with its variables.")
    checkpoints.verify(prefix, read_tensors=False)
    return Source(prefix, _export_class_names(path))
  latest = checkpoints.resolve_resume_checkpoint(path, "error", read_tensors=False)
  if not latest:
    raise ConfigError(f"--warm_start_from={path} holds no checkpoint or SavedModel; "
                      "give a trained model_dir, a checkpoint or an export.")
  return Source(latest, _config_class_names(path))


def model_class_names(cfg: config_lib.ExperimentConfig,
                      data_names: Optional[Sequence[str]]) -> Optional[List[str]]:
  """The class list of the model a config trains.

  Args:
    cfg: the config; `head.class_names` is the list of the model already in
      model_dir (from its saved config) or empty for a new one.
    data_names: the training data's class names (its label map), or None.

  Returns:
    An existing model's classes followed by any new ones; for a new model the
    warm-start source's classes (when `continual.keep_old_classes`), then the
    replay data's, then the training data's, merged by name. None when no
    names are known (ids are then used as they are).

  Raises:
    ConfigError: replay data and training data disagree on having names.
  """
  c = cfg.continual
  replay = labels_lib.class_names_for(c.replay_data) if c.replay_data else None
  if c.replay_data and bool(replay) != bool(data_names):
    which = "--replay_data" if not replay else "--train_data"
    raise ConfigError(f"{which} has no label map while the other one has; put a "
                      "labels.txt next to both, so their classes can be matched by name.")
  existing = list(cfg.head.class_names)
  if existing:
    return relabel.merge_class_names(existing, replay, data_names)
  old = None
  if c.warm_start_from and c.keep_old_classes:
    old = resolve_source(c.warm_start_from).class_names
  merged = relabel.merge_class_names(old, replay, data_names)
  return merged or None


def _config_class_names(model_dir: str) -> Optional[Tuple[str, ...]]:
  try:
    cfg = config_lib.load(model_dir)
  except ConfigError:
    return None
  return tuple(cfg.head.class_names) if cfg and cfg.head.class_names else None


def _export_class_names(saved_model_dir: str) -> Optional[Tuple[str, ...]]:
  path = os.path.join(saved_model_dir, _EXPORT_METADATA)
  if tf.io.gfile.exists(path):
    try:
      with tf.io.gfile.GFile(path) as f:
        names = json.loads(f.read()).get("class_names")
      if names:
        return tuple(str(n) for n in names)
    except ValueError:
      pass
  for candidate in (saved_model_dir, os.path.dirname(saved_model_dir)):
    names = _config_class_names(candidate)
    if names:
      return names
  return None


def is_optimizer_state(name: str, all_names) -> bool:
  """True for the global step and optimizer slots/accumulators.

  Slots are named `<variable>/<Optimizer>` (`conv1/kernel/Momentum`); EMA
  shadows share that form and are model state, so they are kept.
  """
  if _NON_SLOT_OPTIMIZER_RE.match(name):
    return True
  if "/" in name and not name.endswith(EMA_SUFFIX):
    return name.rsplit("/", 1)[0] in all_names
  return False


def class_row_map(old: Sequence[str], new: Sequence[str]) -> List[Tuple[int, int]]:
  """(new index, old index) for every class name both lists hold."""
  where = {name: i for i, name in enumerate(old)}
  return [(i, where[name]) for i, name in enumerate(new) if name in where]


def parse_name_map(text: str) -> List[Tuple[str, str]]:
  """`--warm_start_map`: "old/=new/,x=" -> [("old/", "new/"), ("x", "")].

  Raises:
    ConfigError: an entry without "=".
  """
  pairs = []
  for part in filter(None, (p.strip() for p in (text or "").split(","))):
    if "=" not in part:
      raise ConfigError(f"--warm_start_map entry {part!r} is not OLD_PREFIX=NEW_PREFIX; "
                        "write e.g. --warm_start_map=resnet/block1/=conv1/.")
    old, new = part.split("=", 1)
    pairs.append((old.strip(), new.strip()))
  return pairs


def rename_source(source_names, pairs: Sequence[Tuple[str, str]]) -> Dict[str, str]:
  """new name -> source name for the source variables a pair renames."""
  renamed = {}
  for src in source_names:
    for old, new in pairs:
      if src.startswith(old):
        renamed.setdefault(new + src[len(old):], src)
        break
  return renamed


@dataclasses.dataclass
class Plan:
  """What the warm start does to each variable of the new graph."""
  source: Source
  restore: Dict[str, str] = dataclasses.field(default_factory=dict)  # var -> src
  merge_rows: Dict[str, str] = dataclasses.field(default_factory=dict)
  ema_from_weight: Dict[str, str] = dataclasses.field(default_factory=dict)
  skipped_shape: Dict[str, str] = dataclasses.field(default_factory=dict)
  not_in_source: List[str] = dataclasses.field(default_factory=list)
  optimizer_state: List[str] = dataclasses.field(default_factory=list)
  row_map: List[Tuple[int, int]] = dataclasses.field(default_factory=list)
  renamed: Dict[str, str] = dataclasses.field(default_factory=dict)  # var -> src
  source_not_used: Dict[str, str] = dataclasses.field(default_factory=dict)  # src -> why

  def record(self) -> dict:
    return {"source": self.source.checkpoint,
            "source_class_names": list(self.source.class_names or []),
            "restored": sorted(self.restore),
            "merged_class_rows": {k: {"from": v, "rows_new_old": self.row_map}
                                  for k, v in sorted(self.merge_rows.items())},
            "ema_from_source_weight": dict(sorted(self.ema_from_weight.items())),
            "skipped_shape_changed": dict(sorted(self.skipped_shape.items())),
            "reinitialized_not_in_source": sorted(self.not_in_source),
            "not_warm_started_optimizer_state": sorted(self.optimizer_state),
            "renamed_by_warm_start_map": dict(sorted(self.renamed.items())),
            "source_not_used": dict(sorted(self.source_not_used.items()))}


def build_plan(source: Source, variables, class_names: Sequence[str],
               name_map: Sequence[Tuple[str, str]] = ()) -> Plan:
  """Matches the new graph's variables against the source checkpoint.

  Args:
    source: the resolved source.
    variables: the new graph's global variables.
    class_names: the new model's class names (empty when unknown).
    name_map: `parse_name_map` pairs renaming source variables.

  Returns:
    The Plan (no graph ops are created).

  Raises:
    ConfigError: the source shares no variable with the new model.
  """
  reader = tf.train.load_checkpoint(source.checkpoint)
  shapes = reader.get_variable_to_shape_map()
  dtypes = reader.get_variable_to_dtype_map()
  plan = Plan(source)
  names = {v.op.name for v in variables}
  renamed = rename_source(shapes, name_map)

  def source_name(new_name):
    if new_name in renamed:
      return renamed[new_name]
    return new_name if new_name in shapes else None

  old_names = list(source.class_names or [])
  new_names = list(class_names or [])
  rows = class_row_map(old_names, new_names) if old_names and new_names else []
  for var in variables:
    name = var.op.name
    if is_optimizer_state(name, names):
      plan.optimizer_state.append(name)
      continue
    src = source_name(name)
    if src is None and name.endswith(EMA_SUFFIX) and \
        source_name(name[:-len(EMA_SUFFIX)]) is not None:
      src = source_name(name[:-len(EMA_SUFFIX)])
      target = plan.ema_from_weight
    else:
      target = plan.restore
    if src is None:
      plan.not_in_source.append(name)
      continue
    if src != name:
      plan.renamed[name] = src
    _match(plan, var, src, list(shapes[src]), dtypes[src], target,
           (rows, old_names, new_names))
  _explain_unused(plan, shapes, renamed)
  if not plan.restore and not plan.merge_rows:
    raise ConfigError(
        f"--warm_start_from: {source.checkpoint} shares no variable (by name and "
        "shape) with this model; map its names with --warm_start_map=OLD_PREFIX="
        "NEW_PREFIX, use --backbone for a plain pretrained network, or a "
        "model_dir/export of this framework.")
  return plan


def _match(plan: Plan, var, src: str, src_shape, src_dtype, target: dict, classes) -> None:
  """Restores, merges by class rows, or skips (shape or dtype changed) one variable."""
  name, shape = var.op.name, var.shape.as_list()
  rows, old_names, new_names = classes
  if src_dtype.base_dtype != var.dtype.base_dtype:
    plan.skipped_shape[name] = f"dtype {src_dtype.name} -> {var.dtype.base_dtype.name}"
    return
  class_indexed = (name.startswith(LOGITS_PREFIX) and rows and shape and src_shape
                   and shape[:-1] == src_shape[:-1]
                   and src_shape[-1] == len(old_names) and shape[-1] == len(new_names))
  if class_indexed and (shape != src_shape or old_names != new_names):
    plan.merge_rows[name] = src
    plan.row_map = rows
  elif src_shape == shape:
    target[name] = src
  else:
    plan.skipped_shape[name] = f"{src_shape} -> {shape}"


def _explain_unused(plan: Plan, shapes, renamed: Dict[str, str]) -> None:
  """Fills plan.source_not_used: every source variable nothing reads, and why."""
  used = set(plan.restore.values()) | set(plan.ema_from_weight.values()) | \
      set(plan.merge_rows.values())
  new_of = {src: new for new, src in renamed.items()}
  skipped = {}
  for name, why in sorted(plan.skipped_shape.items()):  # a variable before its shadow
    skipped.setdefault(plan.renamed.get(name, name), f"{name}: {why}")
  for src in shapes:
    if src in used:
      continue
    if src in skipped:
      plan.source_not_used[src] = f"shape or dtype changed ({skipped[src]})"
    elif is_optimizer_state(src, shapes):
      plan.source_not_used[src] = "optimizer state or step (a warm start starts them fresh)"
    elif src in new_of:
      plan.source_not_used[src] = f"renamed to {new_of[src]}, which this model does not have"
    else:
      plan.source_not_used[src] = "no variable of this model has this name"


def log_plan(plan: Plan) -> None:
  """Logs what the warm start restores, merges, skips and re-initialises."""
  log.info("warm start from %s: restored %d variables (BatchNorm statistics and "
           "EMA included); optimizer state and global step start fresh",
           plan.source.checkpoint, len(plan.restore) + len(plan.ema_from_weight))
  if plan.merge_rows:
    log.info("warm start: kept the head rows of %d classes by name (%s); other "
             "rows start fresh", len(plan.row_map), ", ".join(sorted(plan.merge_rows)))
  if plan.skipped_shape:
    log.warning("warm start: skipped (shape changed), re-initialized: %s",
                ", ".join(f"{k} {v}" for k, v in sorted(plan.skipped_shape.items())))
  if plan.not_in_source:
    log.warning("warm start: not in the source, re-initialized: %s",
                ", ".join(sorted(plan.not_in_source)))
  if plan.ema_from_weight:
    log.info("warm start: EMA shadows start at the source weights: %s",
             ", ".join(sorted(plan.ema_from_weight)))
  if plan.renamed:
    log.info("warm start: %d variables matched through --warm_start_map (%s)",
             len(plan.renamed), _abbreviate(f"{k} <- {v}" for k, v in
                                            sorted(plan.renamed.items())))
  unused = {k: v for k, v in plan.source_not_used.items() if not v.startswith("optimizer")}
  if unused:
    log.warning("warm start: %d source variables not used: %s (all reasons in %s)",
                len(unused), _abbreviate(f"{k} ({v})" for k, v in sorted(unused.items())),
                RECORD_FILENAME)


def _abbreviate(items, limit: int = 8) -> str:
  items = list(items)
  more = f", ... {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def write_record(plan: Plan, model_dir: str) -> str:
  """Writes `model_dir/warm_start.json` atomically; returns its path."""
  return files.write_json(os.path.join(model_dir, RECORD_FILENAME), plan.record(),
                          indent=1, sort_keys=False)


def build_init_fn(plan: Plan, variables, previous_init_fn=None):
  """Scaffold init_fn: the previous init_fn (pretrained weights), then the plan.

  Creates the assign ops in the current graph (call while building it).
  """
  by_name = {v.op.name: v for v in variables}
  targets = {**plan.restore, **plan.ema_from_weight, **plan.merge_rows}
  placeholders, assigns = {}, []
  with tf.name_scope("warm_start"):
    for name in sorted(targets):
      var = by_name[name]
      ph = tf.compat.v1.placeholder(var.dtype.base_dtype, var.shape)
      placeholders[name] = ph
      assigns.append(tf.compat.v1.assign(var, ph).op)
    op = tf.group(*assigns)
  merged = {name: by_name[name] for name in plan.merge_rows}

  def init_fn(scaffold, session):
    if previous_init_fn is not None:
      previous_init_fn(scaffold, session)
    reader = tf.train.load_checkpoint(plan.source.checkpoint)
    feed = {}
    for name, src in targets.items():
      value = reader.get_tensor(src)
      if name in merged:
        current = np.array(session.run(merged[name]))
        for new_i, old_j in plan.row_map:
          current[..., new_i] = value[..., old_j]
        value = current
      feed[placeholders[name]] = value
    session.run(op, feed_dict=feed)

  return init_fn


def _saved_name_map(model_dir: str) -> List[Tuple[str, str]]:
  """The run's --warm_start_map, from the config the training loop saved in model_dir.

  The loop saves the run's config before the first graph is built, so the
  map travels with it rather than through every caller of wrap_model_fn.
  """
  try:
    cfg = config_lib.load(model_dir)
  except ConfigError:
    return []
  return parse_name_map(cfg.continual.warm_start_map) if cfg else []


def wrap_model_fn(model_fn, source: Source, class_names: Sequence[str], model_dir: str):
  """Returns a model_fn whose TRAIN spec warm-starts from `source` on a fresh start.

  The Scaffold's init_fn runs only when the session is not restored from a
  checkpoint, so a resumed run is never overwritten by the warm start.
  """

  def warm_model_fn(features, labels, mode, params=None):
    spec = model_fn(features, labels, mode, params)
    if mode != tf.estimator.ModeKeys.TRAIN:
      return spec
    variables = tf.compat.v1.global_variables()
    plan = build_plan(source, variables, class_names, _saved_name_map(model_dir))
    log_plan(plan)
    write_record(plan, model_dir)
    previous = spec.scaffold._user_init_fn if spec.scaffold else None  # pylint: disable=protected-access
    init_fn = build_init_fn(plan, variables, previous)
    scaffold = tf.compat.v1.train.Scaffold(init_fn=init_fn, copy_from_scaffold=spec.scaffold)
    return tf.estimator.EstimatorSpec(**dict(spec._asdict(), scaffold=scaffold))

  return warm_model_fn
