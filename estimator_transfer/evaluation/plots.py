"""The demo's comparison picture, drawn with matplotlib (the `plots` extra).

`strategies_png` draws the validation-accuracy curves of several runs next to
the confusion matrix of one of them (what `make demo` writes to
demo/strategies.png); `confusion_title` is the title of every confusion-matrix
picture. The picture of each evaluation is drawn with Pillow instead
(`evaluation.confusion_image`): it is drawn while training runs.

matplotlib is optional: it is imported when a picture is drawn, and
`available()` tells callers whether pictures can be drawn at all.
"""
import importlib.util
import io
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

Curve = Sequence[Tuple[int, float]]


def available() -> bool:
  """Whether matplotlib is installed (`pip install estimator-transfer[plots]`)."""
  return importlib.util.find_spec("matplotlib") is not None


def _figure(**kwargs):
  """A matplotlib Figure on the file-only Agg canvas, outside pyplot.

  Optional heavy dependency (the `plots` extra): imported only when drawing.
  No pyplot: its global figure registry is not thread-safe (pictures are
  drawn on a worker thread while training runs), it is 0.1 s more to import,
  and a Figure that nothing registers needs no close.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  figure = Figure(**kwargs)
  FigureCanvasAgg(figure)
  return figure


def confusion_title(accuracy: Optional[float] = None, step: Optional[int] = None,
                    prefix: str = "confusion matrix") -> str:
  """'confusion matrix: accuracy 0.912 at step 300' (the parts that are known)."""
  parts = []
  if accuracy is not None:
    parts.append(f"accuracy {accuracy:.3f}")
  if step is not None:
    parts.append(f"at step {int(step)}")
  return f"{prefix}: {' '.join(parts)}" if parts else prefix


def draw_confusion(ax, matrix: np.ndarray, class_names: Sequence[str], title: str) -> None:
  """Draws `matrix` on the axes `ax`: colour = row share, text = count and share.

  Args:
    ax: a matplotlib Axes.
    matrix: int [C, C], rows true class, columns predicted class.
    class_names: C names (cut to 20 characters).
    title: the axes title.
  """
  matrix = np.asarray(matrix, dtype=np.int64)
  n = matrix.shape[0]
  rows = matrix.sum(axis=1, keepdims=True).astype(np.float64)
  shares = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
  ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
  names = [str(c)[:20] for c in class_names] or [str(i) for i in range(n)]
  ax.set_xticks(range(n), names, rotation=90 if max(map(len, names)) > 3 else 0)
  ax.set_yticks(range(n), names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title, fontsize=10)
  if n <= 20:  # beyond that the text no longer fits in a cell
    size = 9 if n <= 10 else 6
    for i in range(n):
      for j in range(n):
        if matrix[i, j]:
          ax.text(j, i, f"{matrix[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center",
                  fontsize=size, color="white" if shares[i, j] > 0.5 else "black")


def _png(figure) -> bytes:
  out = io.BytesIO()
  figure.savefig(out, format="png", dpi=100)
  return out.getvalue()


def strategies_png(curves: Mapping[str, Curve], matrix: np.ndarray,
                   class_names: Sequence[str], curves_title: str,
                   matrix_title: str) -> bytes:
  """Validation-accuracy curves of several runs and one confusion matrix, as PNG.

  Args:
    curves: run name -> [(global step, accuracy), ...] in step order.
    matrix: the confusion matrix shown on the right.
    class_names: its class names.
    curves_title: title of the curves panel.
    matrix_title: title of the confusion-matrix panel.

  Returns:
    The encoded PNG.
  """
  figure = _figure(figsize=(12, 5), layout="constrained")
  left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
  for name, points in curves.items():
    if points:
      steps, values = zip(*points)
      left.plot(steps, values, marker="o", markersize=3, label=name)
  left.set_xlabel("training step")
  left.set_ylabel("validation accuracy")
  left.set_ylim(0.0, 1.0)
  left.locator_params(axis="x", integer=True)
  left.grid(alpha=0.3)
  left.legend(loc="lower right", fontsize=9)
  left.set_title(curves_title, fontsize=10)
  draw_confusion(right, matrix, class_names, matrix_title)
  return _png(figure)
