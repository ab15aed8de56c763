"""Benchmark statistics: alternating repeats, medians with their range, honest windows.

Pure Python (no TensorFlow), so tests/test_benchmark.py checks it in
milliseconds. A figure is a list of per-repeat values; it is shown as
`median (min-max)`. A ratio pairs the runs of one repeat (taken back to back,
under the same load from other programs), so each repeat gives one ratio and
the ratio's median and range come from those pairs, never from dividing two
medians.
"""
import math
import os
import statistics
import time
from typing import Callable, Dict, List, Sequence

# A figure counts only when its timed window is this long (seconds) or covers
# this many steps (the rule for a number that holds).
MIN_WINDOW_S = 20.0
MIN_WINDOW_STEPS = 300
# The floor for full runs; --quick may use fewer and says so in the notes.
MIN_REPEATS = 5


def median(values: Sequence[float]) -> float:
  return statistics.median(values) if values else float("nan")


def summary(values: Sequence[float]) -> Dict[str, float]:
  """{'median', 'min', 'max', 'n'} of the values (NaN when there are none)."""
  if not values:
    return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
  return {"median": median(values), "min": min(values), "max": max(values),
          "n": len(values)}


def ratios(ours: Sequence[float], peer: Sequence[float]) -> List[float]:
  """Per-repeat ours / peer (runs of one repeat are paired)."""
  if len(ours) != len(peer):
    raise ValueError(f"{len(ours)} runs of ours vs {len(peer)} of the peer: "
                     "ratios pair the runs of one repeat")
  return [o / p for o, p in zip(ours, peer)]


def number(value: float) -> str:
  """3 significant digits below 1000, whole numbers above."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  if abs(value) >= 1000:
    return f"{value:.0f}"
  return f"{value:.3g}"


def cell(values: Sequence[float]) -> str:
  """`median (min-max)` of per-repeat values; a single value alone."""
  if not values:
    return "n/a"
  s = summary(values)
  if s["n"] == 1:
    return number(s["median"])
  return f"{number(s['median'])} ({number(s['min'])}-{number(s['max'])})"


def alternate(runners: Dict[str, Callable[[int], dict]], repeats: int,
              log: Callable[[str], None] = print) -> Dict[str, List[dict]]:
  """Runs each runner once per repeat, in order, repeat after repeat.

  Args:
    runners: name -> function(repeat index) -> result dict; the order of the
      dict is the order within each repeat (ours, peer, ours, peer, ...).
    repeats: how many rounds.
    log: where a line per run goes.

  Returns:
    name -> the list of its results, one per repeat.
  """
  results = {name: [] for name in runners}
  for repeat in range(repeats):
    for name, runner in runners.items():
      start = time.perf_counter()
      results[name].append(runner(repeat))
      log(f"repeat {repeat + 1}/{repeats} {name}: {_brief(results[name][-1])} "
          f"({time.perf_counter() - start:.0f}s)")
  return results


def _brief(result: dict) -> str:
  return ", ".join(f"{k}={number(v)}" for k, v in sorted(result.items())
                   if isinstance(v, (int, float)) and not isinstance(v, bool))


def window_ok(seconds: float, steps: int) -> bool:
  """Whether a timed window is long enough for its figure to hold."""
  return seconds >= MIN_WINDOW_S or steps >= MIN_WINDOW_STEPS


def window_text(results: Sequence[dict]) -> str:
  """The shortest timed window of these runs, e.g. '>= 24 s / 300 steps'."""
  timed = [r for r in results if "window_s" in r]
  if not timed:
    return ""
  shortest = min(timed, key=lambda r: (r["window_s"], r.get("window_steps", 0)))
  text = f">= {shortest['window_s']:.0f} s"
  if shortest.get("window_steps"):
    text += f" / {min(r.get('window_steps', 0) for r in timed)} steps"
  if not all(window_ok(r["window_s"], r.get("window_steps", 0)) for r in timed):
    text += " (SHORT)"
  return text


def load_text() -> str:
  """The 1/5/15-minute load averages, for the notes (other programs share the CPUs)."""
  try:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())
  except OSError:
    return "unknown"
