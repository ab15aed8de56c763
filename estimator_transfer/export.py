"""Serving exports in TF Serving's layout: <export_dir>/<version>/saved_model.pb."""
import os
from typing import List

import tensorflow as tf

from estimator_transfer.data import preprocessing

IMAGE_BYTES_KEY = "image_bytes"  # the _bytes suffix makes TF Serving REST decode {"b64": ...}


def build_serving_input_receiver_fn(image_size: int):
  """Receiver for encoded images (JPEG/PNG/GIF/BMP of any size), dynamic batch.

  The bytes are decoded and resized inside the graph with the same function as
  training, so clients send files as they are.
  """

  def serving_input_receiver_fn():
    image_bytes = tf.compat.v1.placeholder(tf.string, [None], name=IMAGE_BYTES_KEY)
    images = tf.map_fn(lambda b: preprocessing.decode_and_resize(b, image_size),
                       image_bytes, fn_output_signature=tf.float32)
    images.set_shape([None, image_size, image_size, 3])
    return tf.estimator.export.ServingInputReceiver(
        {"image": images}, {IMAGE_BYTES_KEY: image_bytes})

  return serving_input_receiver_fn


def list_versions(export_dir: str) -> List[str]:
  """Complete version directories under `export_dir`, oldest first."""
  if not tf.io.gfile.isdir(export_dir):
    return []
  versions = [int(d.rstrip("/")) for d in tf.io.gfile.listdir(export_dir)
              if d.rstrip("/").isdigit()]
  return [os.path.join(export_dir, str(v)) for v in sorted(versions)
          if tf.io.gfile.exists(os.path.join(export_dir, str(v), "saved_model.pb"))]


def export(estimator, export_dir: str, image_size: int, checkpoint_path=None,
           exports_to_keep: int = 5) -> str:
  """Exports the latest (or the given) checkpoint; returns the version dir.

  Estimator writes into `temp-<version>` and renames when complete, so TF
  Serving never sees a half-written version. Only the newest
  `exports_to_keep` versions are kept.
  """
  path = estimator.export_saved_model(
      export_dir, build_serving_input_receiver_fn(image_size),
      checkpoint_path=checkpoint_path)
  path = path.decode() if isinstance(path, bytes) else path
  for old in list_versions(export_dir)[:-exports_to_keep]:
    tf.io.gfile.rmtree(old)
  return path
