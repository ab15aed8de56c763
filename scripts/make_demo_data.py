"""Builds the offline demo dataset from scikit-learn's bundled digits.

The 8x8 handwritten digits are upscaled to --image_size (16) RGB PNGs and written as:

  <output_dir>/pretrain/{train,eval}/   digits 0-4, TFRecord shards + labels.txt
                                        (what the demo backbone is pretrained on)
  <output_dir>/finetune/{train,eval}/   digits 5-9: a small training set
                                        (--train_per_class images per class) and
                                        every other image for evaluation
  <output_dir>/images/{train,eval}/<class>/*.png
                                        the same fine-tune split as image folders

Usage: python scripts/make_demo_data.py --output_dir=demo_data
"""
import io
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("output_dir", "demo_data", "Where to write the dataset.")
flags.DEFINE_integer("image_size", 16, "Output image size in pixels.")
flags.DEFINE_integer("train_per_class", 3, "Fine-tune training images per class.")
flags.DEFINE_integer("num_shards", 2, "TFRecord shards per split.")
FLAGS = flags.FLAGS


def _png(pixels, size):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  gray = Image.fromarray(np.uint8(np.clip(pixels * 16.0, 0, 255)), "L")
  rgb = gray.resize((size, size), Image.BILINEAR).convert("RGB")
  buf = io.BytesIO()
  rgb.save(buf, format="PNG")
  return buf.getvalue()


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import labels as labels_lib  # pylint: disable=g-import-not-at-top
  from estimator_transfer.data import tfrecords  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images, targets = digits.images, digits.target
  splits = {("pretrain", "train"): [], ("pretrain", "eval"): [],
            ("finetune", "train"): [], ("finetune", "eval"): []}
  seen = {}
  for index, (pixels, digit) in enumerate(zip(images, targets)):
    digit = int(digit)
    encoded = _png(pixels, FLAGS.image_size)
    if digit < 5:
      split = "eval" if index % 5 == 0 else "train"
      splits[("pretrain", split)].append((encoded, digit, str(digit), index))
    else:
      count = seen.get(digit, 0)
      seen[digit] = count + 1
      split = "train" if count < FLAGS.train_per_class else "eval"
      splits[("finetune", split)].append((encoded, digit - 5, str(digit), index))

  for (task, split), rows in splits.items():
    out = os.path.join(FLAGS.output_dir, task, split)
    names = [str(d) for d in (range(5) if task == "pretrain" else range(5, 10))]
    tfrecords.write_shards((tfrecords.make_example(e, l, t) for e, l, t, _ in rows),
                           out, split, FLAGS.num_shards)
    labels_lib.write_labels_file(os.path.join(out, labels_lib.LABELS_FILENAME), names)
    if task == "finetune":
      for encoded, _, text, index in rows:
        folder = os.path.join(FLAGS.output_dir, "images", split, text)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"digit_{index:04d}.png"), "wb") as f:
          f.write(encoded)
    print(f"make_demo_data: {task}/{split}: {len(rows)} images of digits "
          f"{names[0]}-{names[-1]} -> {out}")


if __name__ == "__main__":
  app.run(main)
