"""Backbones: a handle becomes a feature extractor inside a model_fn graph.

Resolution happens once, eagerly, in `resolve()`: the source kind is detected,
remote Hub handles are fetched into `TFHUB_CACHE_DIR`, the expected input size
and value range are read from the backbone, and Keras weights files are read
into NumPy arrays. `ResolvedBackbone.instantiate()` (backbone_types.py; one
subclass per kind in keras_backbone.py and hub_backbone.py) then builds the backbone in
whatever graph Estimator is building (train, eval, predict, export) and
returns its features together with the variables to train (per unfreeze
stage), the update ops to run and the losses to add. Pretrained Keras weights
are assigned by the Scaffold's init_fn, which runs only when no checkpoint
exists, so resuming never overwrites trained weights.

Handles:
  mobilenet_v2, resnet50(...)      a tf.keras.applications architecture;
                                   arguments in parentheses, e.g.
                                   mobilenet_v2(alpha=0.35); built for
                                   --image_size (any size it accepts), with
                                   its own input value range
  hub:<url or dir>, <url>, <dir>   a TF-Hub handle: TF2 SavedModel (loaded
                                   with hub.KerasLayer) or TF1 Hub module
                                   (hub.Module), detected from the files;
                                   value range [0, 1] (the Hub convention)
  keras:<file or dir>, <x>.h5      a Keras model (.h5, .keras, or Keras
                                   SavedModel dir), optionally cut at
                                   `output_layer` (only the layers up to it
                                   are built); value range [0, 1] unless
                                   --backbone_value_range says otherwise

A fixed input size that differs from --image_size is a ConfigError, never a
silent resize.

Training mode (BatchNorm, dropout) per source, for frozen parts:
  Keras     per layer: a layer frozen in the current stage normalizes with,
            and keeps, its moving statistics; the others use batch
            statistics and update theirs (a per-stage tensor under an
            unfreeze schedule).
  TF2 Hub   one mode for the whole module: training mode only while no part
            of it is frozen (in the current stage); otherwise inference mode,
            so no statistic of the module moves.
  TF1 Hub   one graph variant, picked once: the `train` tag only when every
            stage trains the whole module (then its UPDATE_OPS run); with
            anything frozen the inference variant runs throughout.
"""
import os

from estimator_transfer.config import BackboneConfig
from estimator_transfer.errors import ConfigError
from estimator_transfer.model import backbone_types
from estimator_transfer.model import hub_backbone
from estimator_transfer.model import keras_backbone


_KERAS_MODEL_SUFFIXES = (".h5", ".keras", ".hdf5")


def resolve(config: BackboneConfig) -> backbone_types.ResolvedBackbone:
  """Resolves a backbone config: detects the source, size, range and weights.

  Args:
    config: the backbone settings (handle, weights, image size, value range,
      output layer).

  Returns:
    A ResolvedBackbone of the handle's kind, ready to be instantiated in any
    graph.

  Raises:
    ConfigError: the handle, weights or size do not make sense.
  """
  handle = config.handle.strip()
  if not handle:
    raise ConfigError("--backbone is required.")
  if handle == "identity":
    # For numeric features (CSV, arrays): the head is the whole model.
    return backbone_types.ResolvedBackbone("identity", "no backbone (identity)",
                                           config.image_size or 0, "zero_one")
  if handle.startswith("hub:"):
    return hub_backbone.resolve_hub(handle[4:], config)
  if handle.startswith("keras:"):
    return keras_backbone.resolve_keras_model(handle[6:], config)
  match = keras_backbone.APPLICATION_RE.match(handle)
  if match and match.group(1) in keras_backbone.KERAS_APPLICATIONS and \
      not os.path.exists(handle):
    return keras_backbone.resolve_application(match.group(1), match.group(2) or "", config)
  if hub_backbone.is_remote(handle):
    return hub_backbone.resolve_hub(handle, config)
  if handle.endswith(_KERAS_MODEL_SUFFIXES) or config.output_layer:
    return keras_backbone.resolve_keras_model(handle, config)
  if os.path.isdir(handle):
    return hub_backbone.resolve_hub(handle, config)
  raise ConfigError(
      f"--backbone={handle} is neither a known Keras application "
      f"({', '.join(sorted(keras_backbone.KERAS_APPLICATIONS))}) nor an existing file or "
      "directory; check the path or prefix it with hub: or keras:.")
