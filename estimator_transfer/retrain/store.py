"""What et-retrain keeps in model_dir: round journals, data copies, the ledger.

    model_dir/
      rounds/0003.json   the round's journal (write-ahead, rewritten atomically)
      rounds/0003/       the round's Estimator model_dir (one TensorBoard run)
      data/0003-000.*    normalised copies of the shards round 3 consumed
      ledger.jsonl       one line per finished round, in round order

The journal is the single source of truth. A round's shard set is decided
and written (phase `planned`) before training starts, so the shards consumed
are exactly those named by some journal; the phases that follow
(`trained`, `evaluated`, `published`, `done`) each persist what the next one
needs. The champion is the newest round whose challenger was published. The
ledger is derived from the journals: its line for a round is appended after
the round was published (or rejected) and never twice, so a restart after a
kill anywhere rewrites the same ledger.
"""
import json
import os
from typing import Dict, List, Optional

from estimator_transfer import files

ROUNDS_DIR = "rounds"
DATA_DIR = "data"
LEDGER_FILENAME = "ledger.jsonl"

PLANNED, TRAINED, EVALUATED, PUBLISHED, DONE = (
    "planned", "trained", "evaluated", "published", "done")
PHASES = (PLANNED, TRAINED, EVALUATED, PUBLISHED, DONE)
ACCEPTED, REJECTED = "published", "rejected"


def reached(journal: dict, phase: str) -> bool:
  """Whether the round's journal is at `phase` or later."""
  return PHASES.index(journal["phase"]) >= PHASES.index(phase)


class Store:
  """The retrain state in one model_dir (the caller holds its lock)."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self.rounds_dir = os.path.join(model_dir, ROUNDS_DIR)
    self.data_dir = os.path.join(model_dir, DATA_DIR)
    self.ledger_path = os.path.join(model_dir, LEDGER_FILENAME)

  def round_dir(self, number: int) -> str:
    return os.path.join(self.rounds_dir, f"{number:04d}")

  def journal_path(self, number: int) -> str:
    return os.path.join(self.rounds_dir, f"{number:04d}.json")

  def journals(self) -> List[dict]:
    """Every round's journal, oldest first."""
    if not os.path.isdir(self.rounds_dir):
      return []
    out = []
    for name in sorted(os.listdir(self.rounds_dir)):
      stem, ext = os.path.splitext(name)
      if ext == ".json" and stem.isdigit():
        out.append(files.read_json(os.path.join(self.rounds_dir, name)))
    return out

  def write(self, journal: dict, phase: Optional[str] = None) -> dict:
    """Persists `journal` (moved to `phase` if given); returns it."""
    if phase is not None:
      journal["phase"] = phase
    files.write_json(self.journal_path(journal["round"]), journal)
    return journal

  def consumed(self, journals: List[dict]) -> Dict[str, dict]:
    """Unit name -> its entry, for every unit some round consumed."""
    return {unit["name"]: unit for j in journals for unit in j["units"]}

  @staticmethod
  def champion(journals: List[dict]) -> Optional[dict]:
    """The newest round whose challenger was published (None before the first)."""
    for journal in reversed(journals):
      if reached(journal, PUBLISHED) and journal.get("decision") == ACCEPTED:
        return journal
    return None

  @staticmethod
  def replay_copies(journals: List[dict], before: int) -> List[str]:
    """The data copies of every published round before `before` (replay pool).

    A rejected round's data is not replayed: it made the model worse (the
    usual cause is wrong labels), so it must not come back through replay.
    """
    return [copy for j in journals if j["round"] < before and
            j.get("decision") == ACCEPTED and reached(j, PUBLISHED)
            for copy in j["copies"]]

  def ledger(self) -> List[dict]:
    text = files.read_text(self.ledger_path) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]

  def append_ledger(self, line: dict) -> bool:
    """Adds the round's line unless it is there; False when it was."""
    lines = self.ledger()
    if any(entry["round"] == line["round"] for entry in lines):
      return False
    text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in lines + [line])
    # Rewritten whole, atomically: a kill mid-write leaves the old ledger,
    # never a torn last line.
    files.write_atomically(self.ledger_path, text)
    return True
