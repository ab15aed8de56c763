"""The et-retrain service: watch the data folder, run rounds, survive anything.

One process owns model_dir (the single-writer lock) and --export_dir. It
first finishes a round a kill left unfinished (its journal says how far it
got), then polls the folder: complete units not consumed by any round are
gathered, and a round starts once `--min_new_examples` of them wait (or
`--round_every_secs` passed with any waiting). SIGTERM (or SIGINT) lets a
round past training finish, abandons one in training (a checkpoint is saved;
the same command continues it), and exits 0.
"""
import dataclasses
import logging
import os
import shutil
import signal
import time
from typing import Callable, Dict, List, Optional

from estimator_transfer import files
from estimator_transfer.config import ExperimentConfig
from estimator_transfer.config.sections import RetrainConfig
from estimator_transfer.data import labels as labels_lib
from estimator_transfer.errors import ConfigError
from estimator_transfer.retrain import rounds as rounds_lib
from estimator_transfer.retrain import shards
from estimator_transfer.retrain import store as store_lib
from estimator_transfer.serving import exporters
from estimator_transfer.serving import versions
from estimator_transfer.training import warm_start

log = logging.getLogger("estimator_transfer")


def validate(base: ExperimentConfig, retrain: RetrainConfig) -> None:
  """Checks the retrain settings and what they need, before anything is written.

  Raises:
    ConfigError: one sentence naming the setting and the fix.
  """
  r = retrain
  for flag, value, ok in (
      ("min_new_examples", r.min_new_examples, r.min_new_examples >= 1),
      ("epochs_per_round", r.epochs_per_round, r.epochs_per_round > 0),
      ("max_regression", r.max_regression, r.max_regression >= 0),
      ("settle_secs", r.settle_secs, r.settle_secs >= 0),
      ("poll_secs", r.poll_secs, r.poll_secs > 0),
      ("max_rounds", r.max_rounds, r.max_rounds >= 0),
      ("round_every_secs", r.round_every_secs, r.round_every_secs >= 0),
      ("exit_when_idle_secs", r.exit_when_idle_secs, r.exit_when_idle_secs >= 0),
      ("replay_ratio", base.continual.replay_ratio, 0 <= base.continual.replay_ratio < 1)):
    if not ok:
      raise ConfigError(f"--{flag}={value} is out of range; see et-retrain --helpfull.")
  data = base.input.train_data
  if not data or not os.path.isdir(data):
    raise ConfigError(f"--train_data={data} is not a folder; et-retrain watches a folder "
                      "that new shards land in: create it or fix the path.")
  if not base.input.eval_data:
    raise ConfigError("--eval_data is required: the fixed validation data champion and "
                      "challenger are compared on.")
  if base.export.export_dir:
    exporters.export_options(base, base.backbone.image_size or 1, with_warmup=False)


@dataclasses.dataclass
class Summary:
  """What a run of the service did."""
  rounds: List[dict] = dataclasses.field(default_factory=list)
  stopped_by: str = ""


class Service:
  """The watch loop (see the module docstring)."""

  def __init__(self, base: ExperimentConfig, retrain: RetrainConfig,
               report: Callable[[dict], None] = lambda line: None):
    validate(base, retrain)
    self.base, self.retrain, self.report = base, retrain, report
    self.data_dir = base.input.train_data
    self.numeric = base.backbone.handle.strip() == "identity"
    self.store = store_lib.Store(base.run.model_dir)
    self.settler = shards.Settler(retrain.settle_secs)
    self._reads: Dict[str, tuple] = {}  # name -> (key, Records or NotReady message)
    self._changed: Dict[str, tuple] = {}  # consumed units seen changed (warned once)
    self._signal = ""

  def _stop_requested(self) -> bool:
    return bool(self._signal)

  def _on_signal(self, signum, frame):
    del frame
    self._signal = signal.Signals(signum).name
    log.warning("et-retrain: %s: finishing the round in progress (one in training "
                "stops at a checkpoint), then exiting", self._signal)

  def run(self) -> Summary:
    """Runs until --max_rounds, idleness or a signal; returns what it did."""
    validation = shards.read_data(self.base.input.eval_data, self.base.input)
    initial = ()
    c = self.base.continual
    if c.warm_start_from and c.keep_old_classes:
      initial = warm_start.resolve_source(c.warm_start_from).class_names or ()
    lock = files.ModelDirLock(self.base.run.model_dir, role="et-retrain")
    lock.acquire()
    previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      self._remove_dead_temps()
      ctx = rounds_lib.Context(self.base, self.retrain, self.store, validation,
                               self._stop_requested, tuple(initial))
      return self._loop(ctx)
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
      lock.release()

  def _remove_dead_temps(self) -> None:
    """Temporary version dirs of a killed export (never listed as versions)."""
    export_dir = self.base.export.export_dir
    if export_dir and os.path.isdir(export_dir):
      for name in os.listdir(export_dir):
        if name.startswith(versions.TEMP_PREFIX):
          log.info("removing %s, left by an interrupted export", name)
          shutil.rmtree(os.path.join(export_dir, name), ignore_errors=True)

  def _loop(self, ctx: rounds_lib.Context) -> Summary:
    summary = Summary()
    last_round = idle_since = time.monotonic()
    journals = None
    while True:
      if journals is None:  # read again only after a round changed them
        journals = self.store.journals()
      unfinished = [j for j in journals if not store_lib.reached(j, store_lib.DONE)]
      if unfinished:
        if not self._run_round(ctx, unfinished[0], summary):
          break
        last_round = idle_since = time.monotonic()
        journals = None
        continue
      r = self.retrain
      if (r.max_rounds and len(journals) >= r.max_rounds) or self._stop_requested():
        break
      ready, pending = self._scan(journals)
      now = time.monotonic()
      waiting = sum(len(u["records"].names) for u in ready)
      if pending:
        idle_since = now
      idle = r.exit_when_idle_secs and now - idle_since >= r.exit_when_idle_secs
      timer = r.round_every_secs and now - last_round >= r.round_every_secs
      if ready and (waiting >= r.min_new_examples or timer or idle):
        # An idle exit first takes whatever complete data waits: none is left behind.
        rounds_lib.plan(ctx, len(journals) + 1, ready, journals)
        journals = None
        continue
      if idle:
        break
      self._sleep(r.poll_secs)
    summary.stopped_by = self._signal
    return summary

  def _run_round(self, ctx, journal: dict, summary: Summary) -> bool:
    finished = rounds_lib.Round(ctx, journal).run()
    if not finished:
      # Training's own handler took the signal (checkpoint saved, round kept).
      self._signal = self._signal or "SIGTERM"
      return False
    journal = files.read_json(self.store.journal_path(journal["round"]))
    line = rounds_lib.ledger_line(journal)
    summary.rounds.append(line)
    self.report(line)
    return True

  def _sleep(self, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not self._stop_requested():
      time.sleep(min(0.05, seconds))

  def _scan(self, journals: List[dict]):
    """(complete unconsumed units, names still settling), oldest first."""
    consumed = self.store.consumed(journals)
    labels_path = os.path.join(self.data_dir, labels_lib.LABELS_FILENAME)
    label_names = (tuple(labels_lib.read_labels_file(labels_path))
                   if os.path.isfile(labels_path) else None)
    ready, pending = [], []
    for name, kind in shards.list_candidates(self.data_dir, self.numeric).items():
      path = os.path.join(self.data_dir, name)
      try:
        sig = shards.signature(path, kind)
      except OSError:
        continue  # removed or renamed while listed
      if name in consumed:
        self._warn_if_changed(name, sig, consumed[name])
        continue
      if not self.settler.settled(name, sig):
        pending.append(name)
        continue
      records = self._read(name, path, kind, sig, label_names)
      if records is not None:
        ready.append({"name": name, "kind": kind, "size": sig[0], "mtime_ns": sig[1],
                      "files": sig[2], "records": records})
    ready.sort(key=lambda u: (u["mtime_ns"], u["name"]))
    return ready, pending

  def _read(self, name, path, kind, sig, label_names) -> Optional[shards.Records]:
    """The unit's records, read once per (signature, labels.txt); None if not ready."""
    key = (sig, label_names)
    cached = self._reads.get(name)
    if cached is None or cached[0] != key:
      try:
        value = shards.read_unit(path, kind, self.base.input, label_names)
      except shards.NotReady as e:
        value = str(e)
        log.warning("not consuming %s yet: %s", name, value)
      self._reads[name] = cached = (key, value)
    return cached[1] if isinstance(cached[1], shards.Records) else None

  def _warn_if_changed(self, name: str, sig, entry: dict) -> None:
    self._reads.pop(name, None)  # consumed: its records live in the round's copy
    if sig and (sig[0], sig[1]) != (entry["size"], entry["mtime_ns"]):
      if self._changed.get(name) != sig:
        log.warning("%s changed after round data was taken from it; the change is "
                    "ignored (write new data as a new file)", name)
        self._changed[name] = sig
