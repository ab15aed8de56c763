"""et-prepare-data: convert a class-per-folder image tree into TFRecord splits."""
from absl import flags

from estimator_transfer.cli import common
from estimator_transfer.data import prepare

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines et-prepare-data's own flags (idempotent)."""
  if "image_dir" in FLAGS:
    return
  d = prepare.PrepareConfig()
  flags.DEFINE_string("image_dir", None, "Folder with one sub-folder of images per "
                      "class (nested folders belong to their class).")
  flags.DEFINE_string("output_dir", None, "Where train/, validation/, test/ shards, "
                      "labels.txt and prepare_report.json go.")
  flags.DEFINE_integer("num_shards", d.num_shards, "TFRecord shards for the whole "
                       "dataset; each split gets its share (at least 1).")
  flags.DEFINE_float("validation_percent", d.validation_percent, "Percent of images "
                     "in the validation split (by a stable hash of the path).")
  flags.DEFINE_float("test_percent", d.test_percent, "Percent of images in the test "
                     "split.")
  if "label_map" not in FLAGS:
    flags.DEFINE_string("label_map", d.label_map, "Text file with one class name per "
                        "line (line i is class i); default: sorted folder names.")
  flags.DEFINE_float("max_bad_fraction", d.max_bad_fraction, "Fail when more than "
                     "this share of the images cannot be used.")
  flags.DEFINE_integer("num_workers", d.num_workers, "Conversion processes; 0: one "
                       "per CPU.")
  flags.DEFINE_integer("jpeg_quality", d.jpeg_quality, "Quality of re-encoded JPEGs "
                       "(CMYK, resized); other conversions are lossless PNG.")
  flags.DEFINE_integer("max_image_side", d.max_image_side, "Downscale images whose "
                       "longer side is larger; 0 keeps the size.")
  flags.DEFINE_integer("max_image_pixels", d.max_image_pixels, "Images with more "
                       "pixels are bad (decompression bombs).")


def main(argv):
  del argv
  config = prepare.PrepareConfig(
      image_dir=FLAGS.image_dir or "", output_dir=FLAGS.output_dir or "",
      num_shards=FLAGS.num_shards, validation_percent=FLAGS.validation_percent,
      test_percent=FLAGS.test_percent, label_map=FLAGS.label_map,
      max_bad_fraction=FLAGS.max_bad_fraction, num_workers=FLAGS.num_workers,
      jpeg_quality=FLAGS.jpeg_quality, max_image_side=FLAGS.max_image_side,
      max_image_pixels=FLAGS.max_image_pixels).validate()
  report = prepare.prepare(config, log=lambda m: print(f"et-prepare-data: {m}",
                                                       flush=True))
  for line in prepare.summary_lines(report):
    print(f"et-prepare-data: {line}")


def run():
  common.run_main("et-prepare-data", define_flags, main)


if __name__ == "__main__":
  run()
