"""The serving export: one checkpoint as a TF Serving SavedModel version.

`export_saved_model` builds the serving graph (receivers and signatures from
`signatures`, the model in PREDICT mode, the checkpoint restored, with EMA
weights when asked), saves it with the TF1 builder TF Serving's loader
expects, adds `assets.extra/` (warmup requests, `et_export.json` metadata)
and publishes it as a new version (`versions.publish_version`).
"""
import json
import logging
import os
import time
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from estimator_transfer import files
from estimator_transfer.data import pipeline
from estimator_transfer.errors import ConfigError
from estimator_transfer.serving import signatures as signatures_lib
from estimator_transfer.serving import versions
from estimator_transfer.serving import warmup
from estimator_transfer.serving.signatures import ExportOptions, ServingGraph

log = logging.getLogger("estimator_transfer")

METADATA_FILENAME = "et_export.json"
EMA_SUFFIX = "/ExponentialMovingAverage"  # tf.train.ExponentialMovingAverage's default name


def restore_var_list(checkpoint_path: str, use_ema: bool):
  """Checkpoint name -> graph variable for restoring a serving graph.

  With `use_ema`, every variable whose moving-average shadow
  (`<name>/ExponentialMovingAverage`, as `tf.train.ExponentialMovingAverage`
  names it) is in the checkpoint is restored from the shadow; the others
  (BatchNorm statistics, global_step, frozen layers) from themselves. This is
  `ExponentialMovingAverage.variables_to_restore()` decided by the checkpoint
  rather than by graph collections, which Keras and Hub layers do not fill.

  Args:
    checkpoint_path: the checkpoint the graph will restore.
    use_ema: restore moving averages where the checkpoint has them.

  Returns:
    None (restore every variable by its own name) or a dict for `Saver`.

  Raises:
    ConfigError: EMA is on but the checkpoint has no averaged variables.
  """
  if not use_ema:
    return None
  in_checkpoint = {name for name, _ in tf.train.list_variables(checkpoint_path)}
  mapping, averaged = {}, 0
  for variable in tf.compat.v1.global_variables():
    name = variable.op.name
    if name + EMA_SUFFIX in in_checkpoint:
      mapping[name + EMA_SUFFIX] = variable
      averaged += 1
    else:
      mapping[name] = variable
  for saveable in tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.SAVEABLE_OBJECTS):
    mapping[saveable.name] = saveable
  if not averaged:
    raise ConfigError(f"EMA is on but checkpoint {checkpoint_path} has no "
                      "moving-average variables; export a checkpoint trained "
                      "with EMA, or turn EMA off for the export.")
  log.info("export: %d variables restored from their moving averages", averaged)
  return mapping


def build_serving_graph(estimator, options: ExportOptions,
                        checkpoint_path: Optional[str] = None) -> ServingGraph:
  """Builds receivers, the model (PREDICT mode) and signatures in a new graph.

  Args:
    estimator: any Estimator whose model_fn takes {"image": float images}.
    options: what to export.
    checkpoint_path: the checkpoint to restore; the latest when None.

  Returns:
    The graph with its signatures and savers, not yet run.

  Raises:
    ConfigError: no checkpoint, or a requested signature cannot be built.
  """
  checkpoint_path = checkpoint_path or estimator.latest_checkpoint()
  if not checkpoint_path:
    raise ConfigError(f"no checkpoint in {estimator.model_dir}; train first.")
  graph = tf.Graph()
  with graph.as_default():
    if estimator.config.tf_random_seed is not None:
      tf.compat.v1.set_random_seed(estimator.config.tf_random_seed)
    tf.compat.v1.train.get_or_create_global_step()
    receivers = signatures_lib.build_receivers(options)
    spec = estimator.model_fn({pipeline.IMAGE_FEATURE: receivers.images}, None,
                              tf.estimator.ModeKeys.PREDICT, estimator.config)
    signature_defs = signatures_lib.build_signature_defs(
        spec.export_outputs, receivers, options.serving_inputs)
    restorer = tf.compat.v1.train.Saver(
        var_list=restore_var_list(checkpoint_path, options.use_ema), sharded=True)
    saver = tf.compat.v1.train.Saver(sharded=True)
    scaffold = spec.scaffold
    local_init_op = (scaffold.local_init_op if scaffold is not None and
                     scaffold.local_init_op is not None
                     else tf.compat.v1.train.Scaffold.default_local_init_op())
  return ServingGraph(graph, signature_defs, restorer, saver, local_init_op,
                      checkpoint_path)


def _save(serving: ServingGraph, path: str, session_config=None) -> None:
  """Restores the checkpoint and writes the SavedModel (TF1 builder) to `path`."""
  with serving.graph.as_default(), tf.compat.v1.Session(
      graph=serving.graph, config=session_config) as sess:
    serving.restorer.restore(sess, serving.checkpoint_path)
    builder = tf.compat.v1.saved_model.Builder(path)
    builder.add_meta_graph_and_variables(
        sess, [tf.saved_model.SERVING], signature_def_map=serving.signature_defs,
        assets_collection=tf.compat.v1.get_collection(
            tf.compat.v1.GraphKeys.ASSET_FILEPATHS),
        main_op=serving.local_init_op, saver=serving.saver, strip_default_attrs=True)
    builder.save()


def _write_assets_extra(path: str, options: ExportOptions, serving: ServingGraph) -> None:
  """`assets.extra/`: the warmup requests (when asked for) and the metadata."""
  extra = os.path.join(path, versions.ASSETS_EXTRA)
  tf.io.gfile.makedirs(extra)
  if options.warmup_images:
    warmup.write_warmup_file(os.path.join(extra, warmup.WARMUP_FILENAME), options,
                             serving.signature_defs)
  write_metadata(os.path.join(extra, METADATA_FILENAME), options, serving)


def export_saved_model(estimator, export_dir: str, options: ExportOptions,
                       checkpoint_path: Optional[str] = None,
                       verify: Optional[Callable[[str], None]] = None) -> str:
  """Writes one complete TF Serving version; returns its directory.

  Args:
    estimator: the Estimator (its model_fn and model_dir are used).
    export_dir: the TF Serving model base path.
    options: signatures, EMA, warmup and metadata.
    checkpoint_path: the checkpoint to export; the latest when None.
    verify: called with the finished temporary directory before it is
      published; raising there aborts the export and publishes nothing.

  Returns:
    `<export_dir>/<version>`.

  Raises:
    ConfigError: no checkpoint, a signature that cannot be built, or a
      warmup/EMA problem. Nothing is published then.
  """
  built = []

  def write(temp):
    serving = build_serving_graph(estimator, options, checkpoint_path)
    built.append(serving)
    _save(serving, temp, estimator.config.session_config)
    _write_assets_extra(temp, options, serving)
    if verify is not None:
      verify(temp)

  final = versions.publish_version(export_dir, write)
  versions.prune_versions(export_dir, options.exports_to_keep)
  log.info("export: wrote %s (signatures %s)", final,
           ", ".join(sorted(built[0].signature_defs)))
  return final


def _checkpoint_step(checkpoint_path: str) -> Optional[int]:
  try:
    return int(tf.train.load_checkpoint(checkpoint_path).get_tensor("global_step"))
  except (tf.errors.OpError, ValueError):
    return None


def _json_default(value):
  if isinstance(value, (np.generic,)):
    return value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", "replace")
  return str(value)


def write_metadata(path: str, options: ExportOptions, serving: ServingGraph) -> None:
  """Writes `et_export.json`: how to feed the export and where it came from.

  Args:
    path: the file to write (`<version>/assets.extra/et_export.json`).
    options: the export's options; `options.metadata` is merged in last.
    serving: the graph that was saved (signatures, checkpoint).
  """
  signatures = {}
  for name, signature in sorted(serving.signature_defs.items()):
    signatures[name] = {"method": signature.method_name,
                        "inputs": sorted(signature.inputs),
                        "outputs": sorted(signature.outputs)}
  record = {
      "image_size": options.image_size,
      "image_key": options.image_key,
      "serving_inputs": list(options.serving_inputs),
      "preprocessing": ("decode JPEG/PNG/GIF/BMP to RGB, bilinear antialiased "
                        f"resize to {options.image_size}x{options.image_size}, "
                        "float32 in [0, 1] (the predict_images input)"),
      "checkpoint": serving.checkpoint_path,
      "global_step": _checkpoint_step(serving.checkpoint_path),
      "ema": options.use_ema,
      "signatures": signatures,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  record.update(options.metadata)
  files.write_atomically(
      path, json.dumps(record, indent=2, sort_keys=True, default=_json_default))


def read_metadata(saved_model_dir: str) -> dict:
  """The export's `assets.extra/et_export.json`, or {} for other SavedModels."""
  return files.read_json(
      os.path.join(saved_model_dir, versions.ASSETS_EXTRA, METADATA_FILENAME), default={})
