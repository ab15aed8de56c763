"""Drawing the confusion-matrix pictures off the training thread, once per evaluation.

Each evaluation while training has two pictures of one report: the report's
`confusion_matrix.png` and the TensorBoard image (`tb_images`): the same PNG
bytes, drawn with Pillow (`confusion_image`, a few hundredths of a second).
Inside `in_background()` (the training loop's evaluations) the picture is
drawn once, in one worker thread, and both writes follow it there in order; training goes on meanwhile,
and leaving the block waits for every picture. Outside it (et-evaluate, a
cluster evaluator) everything happens at once, in the caller's thread.

A picture that fails to draw or write is a warning, never a failed run.
"""
import concurrent.futures
import contextlib
import logging
import threading
from typing import Callable, Mapping

from estimator_transfer.evaluation import confusion_image
from estimator_transfer.evaluation import plots

log = logging.getLogger("estimator_transfer")

_lock = threading.Lock()
_executor = None
_drawn = {}  # report key -> Future of its PNG bytes (the last few reports)
_KEEP = 4


@contextlib.contextmanager
def in_background():
  """Pictures of the evaluations inside the block are drawn in a worker thread."""
  global _executor
  with _lock:
    outer = _executor is not None
    if not outer:
      _executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="et-pictures")
  try:
    yield
  finally:
    if not outer:
      with _lock:
        executor, _executor = _executor, None
      executor.shutdown(wait=True)
      _drawn.clear()


def _key(report: Mapping):
  return (report.get("checkpoint"), report.get("global_step"), report.get("accuracy"))


def confusion_png(report: Mapping) -> concurrent.futures.Future:
  """The report's confusion-matrix PNG bytes (a Future), drawn once per report."""
  key = _key(report)
  with _lock:
    if key in _drawn:
      return _drawn[key]
    executor = _executor
    if executor is not None:
      future = executor.submit(_draw, dict(report))
    else:
      future = concurrent.futures.Future()
      try:
        future.set_result(_draw(report))
      except Exception as e:  # pylint: disable=broad-except  # reported by `then`
        future.set_exception(e)
    _drawn[key] = future
    while len(_drawn) > _KEEP:
      _drawn.pop(next(iter(_drawn)))
  return future


def report_title(report: Mapping) -> str:
  """The picture's title: accuracy and global step of the report, when known."""
  return plots.confusion_title(report.get("accuracy"), report.get("global_step"))


def _draw(report: Mapping) -> bytes:
  return confusion_image.confusion_png(report["confusion_matrix"], report["class_names"],
                             report_title(report))


def then(png: concurrent.futures.Future, use: Callable[[bytes], None], what: str) -> None:
  """Calls use(png bytes) after the picture is drawn: now, or in the worker thread."""

  def run():
    try:
      use(png.result())
    except Exception as e:  # pylint: disable=broad-except  # a picture never fails a run
      log.warning("%s not written: %s", what, e)

  with _lock:
    executor = _executor
  if executor is None:
    run()
  else:
    executor.submit(run)
