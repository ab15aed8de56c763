"""The confusion-matrix picture drawn with Pillow: colours, text, names, sizes."""
import io

import numpy as np
from PIL import Image

from estimator_transfer.evaluation import confusion_image


def _decode(png: bytes) -> np.ndarray:
  image = Image.open(io.BytesIO(png))
  assert image.format == "PNG" and image.mode == "RGB"
  return np.asarray(image).astype(int)


def _longest_runs(dark: np.ndarray) -> np.ndarray:
  """Per row of `dark`, the length of its longest run of True."""
  runs = np.zeros(dark.shape, int)
  for x in range(dark.shape[1]):
    runs[:, x] = np.where(dark[:, x], (runs[:, x - 1] if x else 0) + 1, 0)
  return runs.max(axis=1)


def _cells(pixels: np.ndarray, n: int):
  """Top-left corner and side of the matrix, found from its dark frame."""
  dark = pixels.sum(axis=2) < 200
  # The frame's edges are the longest unbroken dark lines across and down.
  across, down = _longest_runs(dark), _longest_runs(dark.T)
  rows = np.nonzero(across == across.max())[0]
  cols = np.nonzero(down == down.max())[0]
  top, bottom, left, right = rows[0] + 1, rows[-1], cols[0] + 1, cols[-1]
  assert bottom - top == right - left and (bottom - top) % n == 0
  return top, left, (bottom - top) // n


def test_blues_matches_the_colour_map_ends_and_middle():
  np.testing.assert_array_equal(confusion_image.blues(np.array([0.0, 1.0])),
                                [[247, 251, 255], [8, 48, 107]])
  middle = confusion_image.blues(np.array(0.5))
  np.testing.assert_array_equal(middle, [107, 174, 214])  # the 5th of 9 anchors
  shades = confusion_image.blues(np.linspace(0, 1, 11))
  assert (np.diff(shades.astype(int).sum(axis=1)) < 0).all()  # darker as the share grows


def test_cells_are_coloured_by_row_share_and_carry_count_and_share():
  matrix = np.array([[9, 1, 0], [0, 4, 6], [0, 0, 0]])  # row 2: no examples
  pixels = _decode(confusion_image.confusion_png(matrix, ["cat", "dog", "eel"], "t"))
  top, left, cell = _cells(pixels, 3)
  shares = [[0.9, 0.1, 0.0], [0.0, 0.4, 0.6], [0.0, 0.0, 0.0]]
  for i in range(3):
    for j in range(3):
      block = pixels[top + i * cell:top + (i + 1) * cell, left + j * cell:left + (j + 1) * cell]
      corner = block[2, 2]  # away from the text in the middle
      np.testing.assert_array_equal(corner, confusion_image.blues(np.array(shares[i][j])))
      middle = block[cell // 4:3 * cell // 4, cell // 4:3 * cell // 4]
      written = (np.abs(middle - corner).sum(axis=2) > 120).any()
      assert written == bool(matrix[i, j]), (i, j)  # text only where there are examples
  # White text on the dark diagonal cell (90 %), black on the light one (10 %).
  dark = pixels[top:top + cell, left:left + cell]
  assert (dark.min(axis=2) > 240).any()
  light = pixels[top:top + cell, left + cell:left + 2 * cell]
  assert (light.max(axis=2) < 60).any()


def test_names_title_and_axis_labels_are_written_outside_the_matrix():
  matrix = np.eye(4, dtype=int) * 3
  plain = _decode(confusion_image.confusion_png(matrix, ["a", "b", "c", "d"], ""))
  titled = _decode(confusion_image.confusion_png(
      matrix, ["a", "b", "c", "d"], "confusion matrix: accuracy 1.000 at step 20"))
  top, left, cell = _cells(titled, 4)
  assert (titled[:top - 2].sum(axis=2) < 300).any()  # the title above the matrix
  assert (titled[top:top + 4 * cell, :left - 2].sum(axis=2) < 300).any()  # names, "true"
  assert (titled[top + 4 * cell + 2:].sum(axis=2) < 300).any()  # names, "predicted"
  # Long names go up the x axis: the band under the matrix grows with them.
  long_names = _decode(confusion_image.confusion_png(
      matrix, ["daisy", "dandelion", "sunflowers", "x" * 40], ""))
  assert long_names.shape[0] - _cells(long_names, 4)[0] > plain.shape[0] - _cells(plain, 4)[0] + 40
  # Names are cut to 20 characters: 40 x's draw as wide as 20.
  twenty = _decode(confusion_image.confusion_png(
      matrix, ["daisy", "dandelion", "sunflowers", "x" * 20], ""))
  assert twenty.shape == long_names.shape


def test_many_classes_small_and_empty_matrices_still_draw():
  rng = np.random.default_rng(0)
  big = rng.integers(0, 9, (60, 60))
  pixels = _decode(confusion_image.confusion_png(big, [f"class_{i}" for i in range(60)], "t"))
  top, left, cell = _cells(pixels, 60)
  assert cell >= 4 and max(pixels.shape[:2]) < 1400
  # No text in cells this small: each cell is one flat colour.
  block = pixels[top:top + cell, left:left + cell]
  assert (block == block[0, 0]).all()
  for matrix, names in ((np.zeros((2, 2), int), ["a", "b"]), (np.array([[5]]), []),
                        (np.array([[3, 1], [0, 2]]), [])):
    pixels = _decode(confusion_image.confusion_png(matrix, names, "t"))
    assert min(pixels.shape[:2]) >= 250
