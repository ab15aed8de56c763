"""One retraining round: plan, train, evaluate, decide, publish, ledger.

Each phase starts from the round's journal (`store`), so `Round.run` after a
kill anywhere continues where the journal says: training resumes from the
round's latest checkpoint (`max_steps` is idempotent), evaluations are
redone, a version already renamed into --export_dir is found by the
checkpoint its metadata names (never exported twice), and the ledger line is
appended once.

The challenger is the champion's model continued on the round's new data
mixed with replay of every earlier published round's data, for
`epochs_per_round` passes over the new examples; new class names extend the
head by name (warm start). It is compared with the champion on the same
validation examples: those of the champion's classes (`--best_metric`, within
`--max_regression`); its accuracy on the new classes is reported apart.
"""
import dataclasses
import logging
import math
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence

import tensorflow as tf

from estimator_transfer import files
from estimator_transfer import specs
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.config.sections import RetrainConfig
from estimator_transfer.data import relabel
from estimator_transfer.errors import ConfigError
from estimator_transfer.retrain import faults
from estimator_transfer.retrain import shards
from estimator_transfer.retrain import store as store_lib
from estimator_transfer.serving import versions
from estimator_transfer.training import experiment as experiment_lib
from estimator_transfer.training import loop as loop_lib

log = logging.getLogger("estimator_transfer")

CHAMPION_FILENAME = "champion.json"
_EXPORT_METADATA = os.path.join(versions.ASSETS_EXTRA, "et_export.json")


@dataclasses.dataclass
class Context:
  """What every round shares: settings, state, validation data, the stop flag."""
  base: ExperimentConfig
  retrain: RetrainConfig
  store: store_lib.Store
  validation: shards.Records
  stop_requested: callable
  initial_classes: Sequence[str] = ()


def steps_for(new_examples: int, batch_size: int, epochs: float, replay_ratio: float,
              replays: bool) -> int:
  """Training steps for `epochs` passes over the new examples.

  A batch holds (1 - replay_ratio) new examples on average when replay is
  mixed in: e.g. 96 new, batch 8, 2 epochs, ratio 0.5 -> 96*2/(8*0.5) = 48.
  """
  per_batch = batch_size * ((1.0 - replay_ratio) if replays else 1.0)
  return max(1, math.ceil(epochs * new_examples / max(per_batch, 1e-6)))


def plan(ctx: Context, number: int, ready: List[dict], journals: List[dict]) -> dict:
  """Decides round `number`'s data and writes its journal (write-ahead).

  Args:
    ctx: the shared context.
    number: the round number.
    ready: complete units: dicts with name, kind, size, mtime_ns, files and
      `records` (shards.Records).
    journals: every earlier round's journal.

  Returns:
    The journal, in phase `planned`.
  """
  store = ctx.store
  champion = store.champion(journals)
  old = list(champion["class_names"]) if champion else list(ctx.initial_classes)
  new_names = relabel.merge_class_names(*[u["records"].names for u in ready])
  class_names = relabel.merge_class_names(old, new_names)
  _remove_copies(store.data_dir, number)
  copies, units = [], []
  for i, unit in enumerate(ready):
    ext = ".csv" if unit["records"].kind == shards.CSV else ".tfrecord"
    copy = os.path.join(store_lib.DATA_DIR, f"{number:04d}-{i:03d}{ext}")
    shards.write_records(os.path.join(store.model_dir, copy), unit["records"], class_names)
    copies.append(copy)
    units.append({k: unit[k] for k in ("name", "kind", "size", "mtime_ns", "files")} |
                 {"examples": len(unit["records"].names),
                  "classes": unit["records"].class_counts()})
  replay = store.replay_copies(journals, number)
  new_examples = sum(u["examples"] for u in units)
  c, b = ctx.base.continual, ctx.base.input
  journal = {
      "round": number, "phase": store_lib.PLANNED, "units": units, "copies": copies,
      "replay": replay, "new_examples": new_examples, "class_names": class_names,
      "old_classes": old, "new_classes": [n for n in class_names if n not in old],
      "champion_round": champion["round"] if champion else None,
      "champion_checkpoint": champion["checkpoint"] if champion else None,
      "steps": steps_for(new_examples, b.batch_size, ctx.retrain.epochs_per_round,
                         c.replay_ratio, bool(replay)),
      "planned_at": time.time(), "newest_arrival": max(u["mtime_ns"] for u in units) / 1e9,
      "timings": {},
  }
  return store.write(journal)


def _remove_copies(data_dir: str, number: int) -> None:
  """Copies left by a plan killed before its journal was written."""
  if os.path.isdir(data_dir):
    for name in os.listdir(data_dir):
      if name.startswith(f"{number:04d}-"):
        os.remove(os.path.join(data_dir, name))


class Round:
  """Runs (or continues) one planned round."""

  def __init__(self, ctx: Context, journal: dict):
    self.ctx = ctx
    self.journal = journal
    self.number = journal["round"]
    self.model_dir = ctx.store.model_dir
    self.round_dir = ctx.store.round_dir(self.number)
    self.numeric = ctx.validation.kind == shards.CSV
    self._experiment = None

  def run(self) -> bool:
    """Runs the round's remaining phases; False when SIGTERM abandoned it."""
    if not store_lib.reached(self.journal, store_lib.TRAINED):
      if self.ctx.stop_requested() or not self._train():
        return False
    if not store_lib.reached(self.journal, store_lib.EVALUATED):
      self._timed("eval_secs", self._evaluate)
    if not store_lib.reached(self.journal, store_lib.PUBLISHED):
      self._timed("export_secs", self._publish)
    if not store_lib.reached(self.journal, store_lib.DONE):
      self._write_ledger()
    return True

  def _timed(self, key: str, fn) -> None:
    start = time.monotonic()
    fn()
    timings = self.journal["timings"]
    timings[key] = round(timings.get(key, 0.0) + time.monotonic() - start, 3)
    self.ctx.store.write(self.journal)

  # --- data views and config -----------------------------------------------

  def _view(self, name: str, copies: Sequence[str]) -> str:
    """A folder of links to `copies`, as a --train_data spec ("" for none)."""
    if not copies:
      return ""
    view = os.path.join(self.round_dir, "views", name)
    shutil.rmtree(view, ignore_errors=True)
    os.makedirs(view)
    for i, copy in enumerate(copies):
      target = os.path.join(self.model_dir, copy)
      ext = os.path.splitext(copy)[1]
      os.symlink(os.path.relpath(target, view), os.path.join(view, f"{i:05d}{ext}"))
    return os.path.join(view, "*.csv") if self.numeric else view

  def _validation_view(self, name: str, class_names: Sequence[str],
                       only: Sequence[str]) -> str:
    """The validation examples of the classes `only`, ids from `class_names`."""
    ext = ".csv" if self.numeric else ".tfrecord"
    path = os.path.join(self.round_dir, "views", name, "validation" + ext)
    wanted = set(only)
    count = shards.write_records(path, self.ctx.validation, class_names,
                                 keep=lambda n: n in wanted)
    if not count:
      raise ConfigError(f"--eval_data has no example of the classes {sorted(wanted)}; "
                        "give validation data that covers every class the data brings.")
    return os.path.join(os.path.dirname(path), "*.csv") if self.numeric else os.path.dirname(path)

  def config(self) -> ExperimentConfig:
    """The round's training config: the base settings on the round's data."""
    j, base = self.journal, self.ctx.base
    names = tuple(j["class_names"])
    warm = (os.path.join(self.model_dir, j["champion_checkpoint"])
            if j["champion_checkpoint"] else base.continual.warm_start_from)
    updates = dict(
        input__train_data=self._view("new", j["copies"]),
        input__eval_data=self._validation_view("validation-all", names, names),
        continual__replay_data=self._view("replay", j["replay"]),
        continual__warm_start_from=warm, head__class_names=names,
        head__num_classes=len(names), run__model_dir=self.round_dir,
        run__max_steps=j["steps"], guards__early_stopping_metric="",
        guards__eval_every_steps=0)
    if not self.numeric:
      updates["input__label_key"] = shards.TEXT_KEY
    return base.replace(**updates)

  def experiment(self) -> experiment_lib.Experiment:
    if self._experiment is None:
      self._experiment = experiment_lib.Experiment(self.config())
    return self._experiment

  # --- phases --------------------------------------------------------------

  def _train(self) -> bool:
    start = time.monotonic()
    loop = loop_lib.TrainingLoop(self.experiment(),
                                 hooks=faults.training_hooks(self.number))
    outcome = loop.run()
    timings = self.journal["timings"]
    timings["train_secs"] = round(timings.get("train_secs", 0.0) + time.monotonic() - start, 3)
    if outcome.preempted:
      self.ctx.store.write(self.journal)
      return False
    faults.maybe_kill("trained", self.number)
    checkpoint = tf.train.latest_checkpoint(self.round_dir)
    self.journal["checkpoint"] = os.path.relpath(checkpoint, self.model_dir)
    self.journal["trained_steps"] = outcome.step
    self.ctx.store.write(self.journal, store_lib.TRAINED)
    return True

  def _evaluate(self) -> None:
    j = self.journal
    old = j["old_classes"]
    checkpoint = os.path.join(self.model_dir, j["checkpoint"])
    experiment = self.experiment()
    out = os.path.join(self.round_dir, "reports")
    all_view = experiment.config.input.eval_data
    challenger = experiment.evaluate(all_view, checkpoint, os.path.join(out, "challenger"))
    per_class = experiment.last_report.get("per_class", {})
    result = {"challenger": _summary(challenger, per_class, old, j["new_classes"])}
    faults.maybe_kill("evaluating", self.number)
    if j["champion_checkpoint"]:
      result["challenger_on_old"] = self._on_old_classes(challenger, result["challenger"])
      result["champion"] = self._champion_summary()
    j["evaluation"] = result
    j["decision"], j["reason"] = decide(result, self.ctx.base, self.ctx.retrain)
    log.info("round %d: %s (%s)", self.number, j["decision"], j["reason"])
    self.ctx.store.write(j, store_lib.EVALUATED)

  def _on_old_classes(self, metrics: Dict[str, float], summary: dict) -> Dict[str, float]:
    """The challenger's metrics on the validation examples of the champion's classes.

    Accuracy there is the old-class accuracy of the full evaluation's
    confusion matrix (same examples): a second evaluation is only run for
    another --best_metric, and only when the round brought new classes.
    """
    j = self.journal
    if set(j["old_classes"]) == set(j["class_names"]):
      return evaluation_scalars(metrics)
    if self.ctx.base.export.best_metric == "accuracy":
      return {"accuracy": summary["old_class_accuracy"]}
    old_view = self._validation_view("validation-old", j["class_names"], j["old_classes"])
    return evaluation_scalars(self.experiment().evaluate(
        old_view, os.path.join(self.model_dir, j["checkpoint"]),
        os.path.join(self.round_dir, "reports", "challenger-old-classes")))

  def _champion_summary(self) -> dict:
    """The champion's numbers on the validation examples of its classes.

    Those are the examples of this round's old classes, and the champion was
    evaluated on exactly them in its own round (the validation data is fixed
    and evaluation deterministic): its journal holds the result, so it is
    read rather than evaluated again (an evaluation per round saved).
    """
    champion = files.read_json(self.ctx.store.journal_path(self.journal["champion_round"]))
    out = dict(champion["evaluation"]["challenger"])
    out["old_class_accuracy"], out["new_class_accuracy"] = out.get("accuracy"), None
    out["round"] = champion["round"]
    return out

  def _publish(self) -> None:
    j = self.journal
    j["version"] = None
    if j["decision"] == store_lib.ACCEPTED:
      export_dir = self.ctx.base.export.export_dir
      checkpoint = os.path.join(self.model_dir, j["checkpoint"])
      if export_dir:
        path = published_version(export_dir, checkpoint) or self.experiment().export(
            export_dir, checkpoint,
            verify=lambda temp: faults.maybe_kill("exporting", self.number))
        faults.maybe_kill("published", self.number)
        j["version"] = int(os.path.basename(path))
        keep = self.ctx.base.export.exports_to_keep
        if keep:
          versions.prune_versions(export_dir, keep)
      j["published_at"] = time.time()
      j["data_to_serving_secs"] = round(j["published_at"] - j["newest_arrival"], 3)
      files.write_json(os.path.join(self.model_dir, CHAMPION_FILENAME),
                       {"round": self.number, "checkpoint": j["checkpoint"],
                        "model_dir": os.path.relpath(self.round_dir, self.model_dir),
                        "version": j["version"], "class_names": j["class_names"]})
    self.ctx.store.write(j, store_lib.PUBLISHED)

  def _write_ledger(self) -> None:
    j = self.journal
    self.ctx.store.append_ledger(ledger_line(j))
    faults.maybe_kill("ledger", self.number)
    j["done_at"] = time.time()
    self.ctx.store.write(j, store_lib.DONE)


def published_version(export_dir: str, checkpoint: str) -> Optional[str]:
  """The version already exported from `checkpoint` (a kill after the rename)."""
  for path in versions.list_versions(export_dir):
    meta = files.read_json(os.path.join(path, _EXPORT_METADATA), default={}) or {}
    if meta.get("checkpoint") and os.path.abspath(meta["checkpoint"]) == os.path.abspath(
        checkpoint):
      return path
  return None


def evaluation_scalars(metrics: Dict[str, float]) -> Dict[str, float]:
  return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _summary(metrics, per_class: Dict[str, dict], old: Sequence[str],
             new: Sequence[str]) -> dict:
  """Scalars plus the accuracy on the old and on the new classes (None: no such class)."""
  out = evaluation_scalars(metrics)
  for key, names in (("old_class_accuracy", old), ("new_class_accuracy", new)):
    support = sum(per_class.get(n, {}).get("support", 0) for n in names)
    hits = sum(per_class.get(n, {}).get("recall", 0.0) * per_class.get(n, {}).get("support", 0)
               for n in names)
    out[key] = hits / support if support else None
  return out


def decide(result: dict, base: ExperimentConfig, retrain: RetrainConfig):
  """(decision, reason): publish unless worse than the champion by > max_regression."""
  metric = base.export.best_metric
  if "champion" not in result:
    return store_lib.ACCEPTED, "first model: no champion to compare with"
  mode = specs.metric_mode(metric, base.guards.metric_mode)
  challenger = result["challenger_on_old"].get(metric)
  champion = result["champion"].get(metric)
  if challenger is None or champion is None:
    raise ConfigError(f"--best_metric={metric} is not an evaluation metric of this "
                      "model; use accuracy or loss.")
  gain = challenger - champion if mode == "max" else champion - challenger
  where = (f"{metric} {challenger:.4f} vs champion {champion:.4f} on the champion's "
           f"classes, max regression {retrain.max_regression:g}")
  if math.isnan(gain) or gain < -retrain.max_regression:
    return store_lib.REJECTED, f"worse: {where}"
  return store_lib.ACCEPTED, f"{'better' if gain > 0 else 'not worse'}: {where}"


def ledger_line(j: dict) -> dict:
  """The round's ledger entry, from its journal."""
  evaluation = j.get("evaluation", {})
  return {
      "round": j["round"], "shards": [u["name"] for u in j["units"]],
      "new_examples": j["new_examples"], "replay_files": len(j["replay"]),
      "steps": j["steps"], "class_names": j["class_names"],
      "new_classes": j["new_classes"], "challenger": evaluation.get("challenger"),
      "champion": evaluation.get("champion"), "decision": j["decision"],
      "reason": j["reason"], "version": j.get("version"),
      "champion_round": j["round"] if j["decision"] == store_lib.ACCEPTED else
                        j["champion_round"],
      "data_to_serving_secs": j.get("data_to_serving_secs"),
      "timings": j["timings"],
  }
