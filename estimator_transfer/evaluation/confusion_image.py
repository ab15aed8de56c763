"""The confusion-matrix picture of one evaluation, drawn with Pillow.

`confusion_png` draws what a reader of an evaluation needs from its matrix:
each cell coloured by its row share (matplotlib's "Blues"), the count and the
share written in the cell (up to 20 classes), class names along both axes
(cut to 20 characters, thinned out when they would overlap), "predicted" and
"true" axis labels, and a title with accuracy and step.

It is drawn after every evaluation while training (the report's
confusion_matrix.png and the TensorBoard image), so it is drawn with Pillow, a
dependency of the package that imports in a few milliseconds, instead of
matplotlib (a third of a second to import, about a tenth of a second per
figure, both taken from a training run on the same cores). matplotlib stays
the `plots` extra for the demo's strategy comparison (`plots.strategies_png`).
"""
import functools
import io
import math
from typing import Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# matplotlib's "Blues" (ColorBrewer), linearly interpolated between these anchors.
_BLUES = np.array([[247, 251, 255], [222, 235, 247], [198, 219, 239], [158, 202, 225],
                   [107, 174, 214], [66, 146, 198], [33, 113, 181], [8, 81, 156],
                   [8, 48, 107]], dtype=np.float64)
_INK = (30, 30, 30)
_PAD = 10
_MAX_NAME = 20


@functools.lru_cache(maxsize=None)
def _font(size: int):
  """Pillow's bundled FreeType font at `size` px (Pillow >= 10.1, see setup.py)."""
  return ImageFont.load_default(size=size)


def blues(shares: np.ndarray) -> np.ndarray:
  """RGB uint8 [..., 3] of `shares` in [0, 1] on the Blues colour map."""
  x = np.clip(np.asarray(shares, dtype=np.float64), 0.0, 1.0) * (len(_BLUES) - 1)
  low = np.minimum(np.floor(x).astype(int), len(_BLUES) - 2)
  t = (x - low)[..., None]
  return np.round(_BLUES[low] * (1 - t) + _BLUES[low + 1] * t).astype(np.uint8)


def _size(draw: ImageDraw.ImageDraw, text: str, font) -> Tuple[int, int]:
  left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
  return right - left, bottom - top


def _vertical(image: Image.Image, text: str, font, x: int, y: int, anchor: str) -> None:
  """Writes `text` turned 90° (read bottom to top) with its box's `anchor` at (x, y).

  anchor: "rm" (right edge, middle: y labels), "mt" (top edge, middle: x tick labels).
  """
  probe = ImageDraw.Draw(image)
  left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
  mask = Image.new("L", (right - left + 2, bottom - top + 2), 0)
  ImageDraw.Draw(mask).text((1 - left, 1 - top), text, fill=255, font=font)
  mask = mask.transpose(Image.Transpose.ROTATE_90)
  w, h = mask.size
  if anchor == "rm":
    corner = (x - w, y - h // 2)
  else:
    corner = (x - w // 2, y)
  image.paste(Image.new("RGB", mask.size, _INK), corner, mask)


def _layout(n: int) -> Tuple[int, int, int]:
  """Cell side, tick-label font size and cell-text font size (0: no text) for n classes."""
  if n <= 10:
    return max(52, 260 // max(n, 1)), 13, 13
  if n <= 20:
    return 34, 11, 9
  return max(4, min(24, 720 // n)), 10, 0


def _cell_text(draw, matrix, shares, origin, cell, font) -> None:
  """Count and row share in every cell with examples (white on the dark ones)."""
  for i, j in zip(*np.nonzero(matrix)):
    colour = (255, 255, 255) if shares[i, j] > 0.5 else (0, 0, 0)
    draw.multiline_text((origin[0] + j * cell + cell // 2, origin[1] + i * cell + cell // 2),
                        f"{matrix[i, j]}\n{shares[i, j]:.0%}", fill=colour, font=font,
                        anchor="mm", align="center", spacing=1)


def _ticks(image, names, origin, cell, font, every, rotate) -> None:
  """Every `every`-th class name beside its row and under its column."""
  draw = ImageDraw.Draw(image)
  left, top = origin
  side = len(names) * cell
  for i in range(0, len(names), every):
    middle = top + i * cell + cell // 2
    draw.line([left - 5, middle, left - 1, middle], fill=_INK)
    draw.text((left - 7, middle), names[i], fill=_INK, font=font, anchor="rm")
    centre = left + i * cell + cell // 2
    draw.line([centre, top + side, centre, top + side + 4], fill=_INK)
    if rotate:
      _vertical(image, names[i], font, centre, top + side + 6, "mt")
    else:
      draw.text((centre, top + side + 6), names[i], fill=_INK, font=font, anchor="mt")


def confusion_png(matrix: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
  """The confusion matrix as PNG bytes.

  Args:
    matrix: int [C, C], rows true class, columns predicted class.
    class_names: C names (cut to 20 characters); numbered when empty.
    title: the picture's title (`plots.confusion_title`).

  Returns:
    The encoded PNG (RGB).
  """
  matrix = np.asarray(matrix, dtype=np.int64)
  n = matrix.shape[0]
  rows = matrix.sum(axis=1, keepdims=True).astype(np.float64)
  shares = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
  names = [str(c)[:_MAX_NAME] for c in class_names] or [str(i) for i in range(n)]
  cell, tick_size, text_size = _layout(n)
  tick_font, label_font, title_font = _font(tick_size), _font(13), _font(14)

  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  name_w = max(_size(probe, name, tick_font)[0] for name in names)
  name_h = _size(probe, "Xg", tick_font)[1]
  label_h = _size(probe, "predicted", label_font)[1]
  title_w, title_h = _size(probe, title, title_font)
  rotate = max(map(len, names)) > 3  # long names go up the x axis, as in the y labels
  every = max(1, math.ceil((name_h + 2) / cell))  # label every k-th class when crowded

  left = _PAD + label_h + _PAD + name_w + 6
  top = _PAD + title_h + _PAD
  side = n * cell
  bottom_band = 6 + (name_w if rotate else name_h) + _PAD + label_h + _PAD
  width = max(left + side + _PAD + 6, title_w + 2 * _PAD)
  height = top + side + bottom_band

  image = Image.new("RGB", (width, height), (255, 255, 255))
  cells = np.repeat(np.repeat(blues(shares), cell, axis=0), cell, axis=1)
  image.paste(Image.fromarray(cells, "RGB"), (left, top))
  draw = ImageDraw.Draw(image)
  draw.rectangle([left - 1, top - 1, left + side, top + side], outline=_INK)
  draw.text((width // 2, _PAD), title, fill=_INK, font=title_font, anchor="mt")

  _ticks(image, names, (left, top), cell, tick_font, every, rotate)
  draw.text((left + side // 2, height - _PAD), "predicted", fill=_INK, font=label_font,
            anchor="md")
  _vertical(image, "true", label_font, _PAD + label_h, top + side // 2, "rm")

  if text_size:
    _cell_text(draw, matrix, shares, (left, top), cell, _font(text_size))
  out = io.BytesIO()
  image.save(out, format="PNG", compress_level=6)
  return out.getvalue()
