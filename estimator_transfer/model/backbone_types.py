"""What every backbone kind shares: the resolved backbone and its output.

`ResolvedBackbone.instantiate()` does the steps common to all kinds (the
freeze plan's stage tensor, the input value range, the identity backbone)
and hands the rest to its kind's subclass: `keras_backbone.KerasBackbone`,
`hub_backbone.HubTF2Backbone`, `hub_backbone.HubTF1Backbone`. `backbones.resolve`
picks the kind from a handle.

This module sits below the kind modules (they subclass `ResolvedBackbone` and
return `BackboneOutput`), and `backbones` sits above them, so the package has
no import cycle.
"""
import dataclasses
from typing import Callable, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from estimator_transfer import specs
from estimator_transfer.config import BackboneConfig
from estimator_transfer.errors import ConfigError
from estimator_transfer.model import freezing
from estimator_transfer.model import schedules

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def to_value_range(images, value_range: str):
  """Maps RGB float images in [0, 1] to the range a backbone expects.

  Args:
    images: float tensor [..., 3], RGB in [0, 1].
    value_range: one of `specs.VALUE_RANGES`.

  Returns:
    The images in that range (caffe: BGR minus the ImageNet means; torch:
    standardized with the ImageNet means and deviations).

  Raises:
    ConfigError: unknown value range.
  """
  if value_range == "zero_one":
    return images
  if value_range == "minus_one_one":
    return images * 2.0 - 1.0
  if value_range == "zero_255":
    return images * 255.0
  if value_range == "caffe":
    bgr = images[..., ::-1] * 255.0
    return bgr - tf.constant(_CAFFE_MEAN_BGR, dtype=images.dtype)
  if value_range == "torch":
    return ((images - tf.constant(_TORCH_MEAN, dtype=images.dtype)) /
            tf.constant(_TORCH_STD, dtype=images.dtype))
  raise ConfigError(f"unknown value range {value_range!r}; use one of "
                    f"{', '.join(specs.VALUE_RANGES)}.")


@dataclasses.dataclass
class BackboneOutput:
  """What a model_fn needs from an instantiated backbone.

  `trainable_variables` is the union over all stages and is filled in every
  mode (evaluation needs it to map moving averages); `stages` hold the
  per-stage sets; `stage_index` is the int32 stage tensor when the plan has
  more than one stage.
  """
  features: tf.Tensor
  groups: List[freezing.LayerGroup]
  stages: List[freezing.StageVariables]
  trainable_variables: list
  update_ops: list
  losses: list
  init_fn: Optional[Callable] = None  # Scaffold init_fn for pretrained weights
  stage_index: Optional[tf.Tensor] = None

  @property
  def frozen(self) -> List[bool]:
    """Per group, whether it is frozen in the first stage."""
    return self.stages[0].frozen


def no_backbone_output(features) -> BackboneOutput:
  """Features that need no backbone in the graph: nothing trains, updates or is saved."""
  frozen = freezing.StageVariables(0, "all", [], [])
  return BackboneOutput(tf.cast(features, tf.float32), groups=[], stages=[frozen],
                        trainable_variables=[], update_ops=[], losses=[])


@dataclasses.dataclass
class ResolvedBackbone:
  """A backbone source, resolved and ready to be built in any graph.

  This class itself is the `identity` kind (no backbone: the head reads the
  input features); the other kinds subclass it and implement `_build`.
  """
  kind: str  # keras | hub_tf2 | hub_tf1 | identity
  description: str
  image_size: int
  value_range: str
  fixed_size: bool = False

  # Whether --mixed_precision applies (a Keras backbone is rebuilt in the
  # policy; a saved module runs in the dtypes it was saved with).
  MIXED_PRECISION = False

  def instantiate(self, images, plan, training: bool, policy: str = "float32",
                  seed: Optional[int] = None) -> BackboneOutput:
    """Builds the backbone in the current graph and applies it to `images`.

    Args:
      images: float32 [batch, size, size, 3] RGB in [0, 1].
      plan: a freeze spec string, or a list of `specs.Stage` with int
        starts (gradual unfreezing; the stage follows the global step).
      training: whether this graph trains (mode == TRAIN).
      policy: the Keras dtype policy of a Keras backbone (float32,
        mixed_float16, mixed_bfloat16); variables stay float32 and the
        features are float32 whatever the policy.
      seed: --seed; fixes the initial values of weights drawn at random
        (`--backbone_weights=none`). None: new values in every process.

    Returns:
      A BackboneOutput.

    Raises:
      ConfigError: the plan does not fit this backbone, or a mixed policy
        for a Hub module.
    """
    stages = plan_stages(plan)
    stage_index = stage_index_op(stages)
    if self.kind == "identity":
      # No backbone: the head reads the input features (numeric CSV/array data).
      return no_backbone_output(
          tf.reshape(images, [-1, int(np.prod(images.shape[1:]))]))
    x = to_value_range(images, self.value_range)
    if policy != "float32" and not self.MIXED_PRECISION:
      raise ConfigError(f"--mixed_precision={policy} applies to Keras backbones, but "
                        f"{self.description} runs in the dtypes it was saved with; "
                        "drop --mixed_precision.")
    if seed is not None:
      seed_keras_initializers(seed)
    out = self._build(x, stages, stage_index, training, policy)
    out.stage_index = stage_index
    return out

  def _build(self, x, stages, stage_index, training: bool, policy: str) -> BackboneOutput:
    """Builds this kind in the current graph on `x` (already in its value range)."""
    # Kinds with layers override this; the identity backbone has none.
    raise ConfigError(f"the {self.kind} backbone has no layers to apply to images; "
                      "use a Keras application, a Keras model or a TF-Hub handle "
                      "for image data.")


# ----------------------------------------------------------------------------
# Helpers the kinds share
# ----------------------------------------------------------------------------


def plan_stages(plan) -> List[specs.Stage]:
  """A freeze spec string or a list of stages, as a list of stages."""
  return [specs.Stage(0, specs.parse_spec(plan))] if isinstance(plan, str) else list(plan)


def stage_index_op(stages: Sequence[specs.Stage]) -> Optional[tf.Tensor]:
  """The int32 unfreeze-stage tensor of the global step; None with one stage."""
  if len(stages) <= 1:
    return None
  # Read the step before the train op increments it: the stage tensor feeds
  # the forward pass, so the read is ordered before the update.
  return tf.identity(schedules.stage_index_op(
      tf.compat.v1.train.get_or_create_global_step(),
      [s.start for s in stages[1:]]), name="freeze_stage")


def seed_keras_initializers(seed: int) -> None:
  """Makes the Keras layers built next draw their initial values from `seed`.

  A Keras initializer without a seed of its own (every layer of a backbone
  rebuilt from its config) takes one from Keras' seed generator, which is
  Python's `random` unless `tf.keras.utils.set_random_seed` set it: the
  graph-level seed never reaches it, so two runs with the same --seed drew
  different backbones. Reset on every call, so each graph built for one
  config (training segment, evaluation, export, feature extraction) draws
  the same values, however many graphs this process built before.

  `set_random_seed` also seeds Python's and NumPy's global generators and
  sets the default graph's seed (the Estimator's graph already has this one);
  nothing here draws from those expecting variety.
  """
  tf.keras.utils.set_random_seed(int(seed))


def training_mode(trains_per_stage: Sequence[bool], stage_index, training: bool):
  """Training mode of a part: a Python bool, or a tensor when stages differ."""
  if not training or not any(trains_per_stage):
    return False
  if all(trains_per_stage) or stage_index is None:
    return bool(trains_per_stage[0]) if stage_index is None else True
  return tf.gather(tf.constant(list(trains_per_stage)), stage_index)


def pool_features(features):
  """Global-average-pools a 4D feature map; leaves vectors alone.

  Raises:
    ConfigError: the features are neither [batch, d] nor [batch, h, w, c].
  """
  if features.shape.rank == 4:
    return tf.reduce_mean(features, axis=[1, 2])
  if features.shape.rank != 2:
    raise ConfigError(
        f"the backbone returns features of shape {features.shape}; pick a "
        "layer with a [batch, features] or [batch, h, w, c] output "
        "(--backbone_output_layer).")
  return features


def resolve_size(config: BackboneConfig, native: Optional[int], fixed: bool,
                 description: str) -> int:
  """The input size: --image_size, or the backbone's own when that is 0.

  Raises:
    ConfigError: a fixed native size differs from --image_size, or neither
      is known.
  """
  if fixed and native and config.image_size and config.image_size != native:
    raise ConfigError(
        f"--image_size={config.image_size} does not match the {native}x{native} "
        f"input that {description} expects; set --image_size={native} or 0.")
  size = config.image_size or native
  if not size:
    raise ConfigError(f"{description} does not declare an input size; set "
                      "--image_size.")
  return int(size)


def configured_value_range(config: BackboneConfig, native: str) -> str:
  """The configured value range, or the backbone's own."""
  return config.value_range or native
