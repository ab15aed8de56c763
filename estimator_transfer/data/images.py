"""Image files for et-prepare-data: listing class folders, converting one file.

Image policy: JPEGs and 8-bit RGB/grayscale PNGs that need no change are
copied byte for byte (what TF Serving will decode is exactly what trained).
Everything else that Pillow reads (CMYK/YCCK JPEG, 16-bit, RGBA/LA, palette,
GIF, BMP, TIFF, WebP, ...) becomes 8-bit RGB: alpha is dropped like
TensorFlow's own decoder drops it, 16-bit values are scaled to 8 bits. It is
re-encoded as JPEG (`jpeg_quality`) when the source was a JPEG and as PNG
(lossless) otherwise. EXIF orientation is ignored, as at serving time.

This module never imports TensorFlow: the conversion workers are spawned
processes that import only it (through `convert_job`), so they start fast.
"""
import dataclasses
import io
import os
import stat as stat_lib
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from estimator_transfer.errors import ConfigError

CANDIDATE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff",
                        ".webp", ".ppm", ".pgm", ".pbm")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning limit


def _inside(parent: str, child: str) -> bool:
  parent, child = os.path.realpath(parent), os.path.realpath(child)
  return child == parent or child.startswith(parent + os.sep)


def _rel(rel_dir: str, name: str) -> str:
  rel = name if rel_dir == "." else os.path.join(rel_dir, name)
  return rel.replace(os.sep, "/")


# --- listing ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageItem:
  """One candidate image file."""
  relpath: str  # relative to image_dir, '/'-separated: the stable identity
  path: str
  label: int
  class_name: str
  size: int
  mtime_ns: int


def list_class_folders(image_dir: str, output_dir: str) -> Tuple[List[str], List[dict]]:
  """The class sub-folders of `image_dir` (sorted; never `output_dir`).

  Returns:
    (folder names, ignored entries as {path, reason}).

  Raises:
    ConfigError: no class folders.
  """
  ignored, folders = [], []
  for entry in sorted(os.listdir(image_dir)):
    full = os.path.join(image_dir, entry)
    if entry.startswith("."):
      ignored.append({"path": entry, "reason": "hidden file or folder"})
    elif os.path.isdir(full):
      # Only an --output_dir inside image_dir is skipped (image_dir may well
      # lie inside output_dir).
      if not (_inside(output_dir, image_dir) and _inside(full, output_dir)):
        folders.append(entry)
    else:
      ignored.append({"path": entry, "reason": "not in a class folder"})
  if not folders:
    raise ConfigError(f"{image_dir} has no class sub-folders; put the images of each "
                      "class in their own folder (e.g. images/cats/*.jpg).")
  return folders, ignored


def check_output_dir(output_dir: str, image_dir: str) -> None:
  """Refuses an --output_dir that cannot be a directory or would hide a class."""
  if "://" in output_dir:
    return
  probe = os.path.abspath(output_dir)
  while probe and not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if probe and not os.path.isdir(probe):
    raise ConfigError(f"--output_dir={output_dir}: {probe} is a file, not a "
                      "directory; choose another --output_dir.")
  parent = os.path.dirname(os.path.realpath(output_dir))
  if parent == os.path.realpath(image_dir):
    raise ConfigError(f"--output_dir={output_dir} is a class folder of --image_dir "
                      "(its images would be left out); choose a directory outside "
                      "the class folders.")


def check_folders_in_label_map(folders: Sequence[str], names: Sequence[str],
                               label_map: str) -> None:
  """Raises ConfigError naming the first class folder missing from the map."""
  missing = [f for f in folders if f not in names]
  if missing:
    raise ConfigError(f"class folder '{missing[0]}' is not in --label_map="
                      f"{label_map}; add it there or move the folder out.")


def list_folder_images(image_dir: str, output_dir: str, folders: Sequence[str],
                       names: Sequence[str]) -> Tuple[List[ImageItem], List[dict]]:
  """Walks the class folders (nested folders belong to their class).

  Args:
    image_dir: the folder with one sub-folder per class.
    output_dir: skipped when it lies inside `image_dir`.
    folders: the class folders to walk.
    names: the label map (id = position); every folder is in it.

  Returns:
    (candidate images, ignored files as {path, reason}).
  """
  ids = {n: i for i, n in enumerate(names)}
  items, ignored = [], []
  for folder in folders:
    for dirpath, dirnames, filenames in os.walk(os.path.join(image_dir, folder)):
      rel_dir = os.path.relpath(dirpath, image_dir)
      kept = []
      for d in sorted(dirnames):
        if d.startswith("."):
          ignored.append({"path": _rel(rel_dir, d), "reason": "hidden file or folder"})
        elif not _inside(os.path.join(dirpath, d), output_dir):
          kept.append(d)
      dirnames[:] = kept
      for filename in sorted(filenames):
        item, reason = _candidate(dirpath, rel_dir, filename, ids[folder], folder)
        if item is not None:
          items.append(item)
        else:
          ignored.append({"path": _rel(rel_dir, filename), "reason": reason})
  return items, ignored


def _candidate(dirpath: str, rel_dir: str, filename: str, label: int, folder: str):
  """(ImageItem, None) for an image file, else (None, why it is ignored)."""
  if filename.startswith("."):
    return None, "hidden file"
  if not filename.lower().endswith(CANDIDATE_EXTENSIONS):
    return None, "not an image file extension"
  path = os.path.join(dirpath, filename)
  try:
    stat = os.stat(path)
  except OSError as e:
    return None, f"cannot stat: {e.strerror}"
  if not stat_lib.S_ISREG(stat.st_mode):
    return None, "not a regular file (a FIFO, socket or device)"
  return ImageItem(_rel(rel_dir, filename), path, label, folder, stat.st_size,
                   stat.st_mtime_ns), None


# --- converting one image (runs in the worker processes) ----------------------


class BadImage(Exception):
  """An image that cannot be used; the message is the reason."""


def _png_is_plain(data: bytes) -> bool:
  """8-bit grayscale or RGB PNG without transparency (TF decodes it as is)."""
  if len(data) < 33 or data[12:16] != b"IHDR":
    return False
  bit_depth, color_type = data[24], data[25]
  return bit_depth == 8 and color_type in (0, 2) and b"tRNS" not in data[:4096]


def _open(path: str, max_image_pixels: int):
  """(file bytes, the opened Pillow image: header read, pixels not yet).

  Raises:
    BadImage: unreadable, empty, not an image, no pixels or too many.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise BadImage(f"cannot read the file: {e.strerror or e}") from None
  if not data:
    raise BadImage("empty file (0 bytes)")
  try:
    image = Image.open(io.BytesIO(data))
  except UnidentifiedImageError:
    raise BadImage("not an image (unknown or unsupported format)") from None
  except Exception as e:  # pylint: disable=broad-except
    raise BadImage(f"truncated or corrupt image header ({e})") from None
  width, height = image.size
  if width < 1 or height < 1:
    raise BadImage(f"image has no pixels ({width}x{height})")
  if width * height > max_image_pixels:
    raise BadImage(f"image too large ({width}x{height} = {width * height} pixels "
                   f"> --max_image_pixels={max_image_pixels})")
  return data, image


def convert_image(path: str, jpeg_quality: int = 95, max_image_side: int = 0,
                  max_image_pixels: int = DEFAULT_MAX_PIXELS
                  ) -> Tuple[bytes, str, int, int, str]:
  """Reads an image file and returns what goes into its tf.Example.

  Args:
    path: the image file.
    jpeg_quality: quality of re-encoded JPEGs.
    max_image_side: downscale when the longer side is larger (0: never).
    max_image_pixels: more pixels than this is a bad image.

  Returns:
    (encoded bytes, "jpeg" or "png", height, width, what was done) where the
    last is "kept" or "converted from <mode/format>" or "resized".

  Raises:
    BadImage: with the reason (empty, unreadable, truncated, not an image, too
      large).
  """
  Image.MAX_IMAGE_PIXELS = None  # checked in _open with our own limit and message
  data, image = _open(path, max_image_pixels)
  width, height = image.size
  fmt, mode = image.format, image.mode
  resize = bool(max_image_side) and max(width, height) > max_image_side
  if resize and fmt == "JPEG":
    image.draft("RGB", (max_image_side, max_image_side))  # fast DCT downscale
  try:
    image.load()  # decodes everything: truncated or corrupt data fails here
  except Exception as e:  # pylint: disable=broad-except
    raise BadImage(f"truncated or corrupt image data ({e})") from None
  plain = (fmt == "JPEG" and mode in ("RGB", "L")) or (
      fmt == "PNG" and mode in ("RGB", "L") and _png_is_plain(data))
  if plain and not resize:
    return data, fmt.lower(), height, width, "kept"
  note = "resized" if plain else f"converted from {fmt} {mode}"
  rgb = _to_rgb8(image)
  if resize:
    rgb.thumbnail((max_image_side, max_image_side), Image.LANCZOS)
  out = io.BytesIO()
  if fmt == "JPEG":
    rgb.save(out, format="JPEG", quality=jpeg_quality)
    out_fmt = "jpeg"
  else:
    rgb.save(out, format="PNG")
    out_fmt = "png"
  return out.getvalue(), out_fmt, rgb.size[1], rgb.size[0], note


def _to_rgb8(image):
  """8-bit RGB from any Pillow mode (16-bit scaled, alpha dropped)."""
  if image.mode.startswith("I;16") or image.mode in ("I", "F"):
    array = np.asarray(image).astype(np.float64)
    if image.mode == "F" and array.size and array.max() <= 1.0:
      array = array * 255.0
    elif image.mode != "F":
      array = array * (255.0 / 65535.0)  # 16-bit range to 8 bits
    gray = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")
    return gray.convert("RGB")
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  return image.convert("RGB")


def convert_job(job):
  """Worker entry: (relpath, path, quality, side, pixels) -> (relpath, ok, payload)."""
  relpath, path, quality, side, pixels = job
  try:
    return relpath, True, convert_image(path, quality, side, pixels)
  except BadImage as e:
    return relpath, False, str(e)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever else a broken file makes a decoder raise: still one bad file.
    return relpath, False, f"cannot decode ({type(e).__name__}: {e})"
