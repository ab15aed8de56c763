"""Test-only kill points: SIGKILL this process at a named moment of a round.

`ET_RETRAIN_KILL_AT=<point>[@<round>]` makes et-retrain kill itself with
SIGKILL (no cleanup, as a crash or the OOM killer would) the first time it
reaches <point> (in round <round>, default any). The points are the phases a
restart must survive:

  training    after the round's training ran two steps
  sigterm     as `training`, but SIGTERM (the clean stop: checkpoint, exit 0)
  trained     training finished, before its journal entry
  evaluating  after the challenger's first evaluation, before the decision
  exporting   the new version is fully written under its temporary name
  published   the version is renamed into place, before the journal says so
  ledger      the ledger line is written, before the journal says `done`

Nothing reads the variable outside these points; it is for the tests
(tests/retrain/) and for anyone checking a deployment's recovery.
"""
import os
import signal
from typing import Optional

import tensorflow as tf

ENV = "ET_RETRAIN_KILL_AT"
POINTS = ("training", "sigterm", "trained", "evaluating", "exporting", "published", "ledger")


def _wanted() -> Optional[tuple]:
  value = os.environ.get(ENV, "")
  if not value:
    return None
  point, _, number = value.partition("@")
  return point, int(number) if number else None


def maybe_kill(point: str, round_number: int) -> None:
  """SIGKILLs this process when ET_RETRAIN_KILL_AT names this point (and round)."""
  wanted = _wanted()
  if wanted and wanted[0] == point and wanted[1] in (None, round_number):
    os.kill(os.getpid(), signal.SIGTERM if point == "sigterm" else signal.SIGKILL)


class KillHook(tf.compat.v1.train.SessionRunHook):
  """Kills after a few training steps (points `training`, `sigterm`)."""

  def __init__(self, point: str, round_number: int, after_runs: int = 2):
    self._point, self._round = point, round_number
    self._after_runs, self._runs = after_runs, 0

  def after_run(self, run_context, run_values):
    self._runs += 1
    if self._runs == self._after_runs:
      maybe_kill(self._point, self._round)


def training_hooks(round_number: int, points=("training", "sigterm")) -> list:
  """[KillHook] when a training point is asked for, else [] (no cost in production)."""
  wanted = _wanted()
  return [KillHook(wanted[0], round_number)] if wanted and wanted[0] in points else []
