"""ExperimentConfig.validate(): every setting checked, TensorFlow never imported.

Each check raises `ConfigError` with one sentence that names the flag and the
fix. The checks that need a parser (freeze specs, schedules, multipliers,
class weights) use the pure-Python ones in `specs`; checks that need the
backbone itself (a freeze spec matching no layer) run in model/ and training/.
"""
from estimator_transfer import specs
from estimator_transfer.config.sections import (
    DISTRIBUTIONS, MIXED_PRECISION_POLICIES, SERVING_INPUTS)
from estimator_transfer.errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop")
HEAD_KINDS = ("classification", "regression")


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def validate(cfg) -> None:
  """Checks an ExperimentConfig, section by section.

  Raises:
    ConfigError: the first problem found.
  """
  _validate_backbone(cfg.backbone)
  _validate_head(cfg.head)
  _validate_schedule(cfg.schedule)
  _validate_optimizer(cfg.optimizer)
  _validate_input(cfg.input)
  _validate_run(cfg.run)
  _validate_export(cfg.export, cfg.head)
  _validate_cluster(cfg.cluster)
  _validate_continual(cfg.continual)
  _validate_guards(cfg.guards, cfg.export)
  specs.parse_spec(cfg.freeze.spec)
  specs.parse_schedule(cfg.freeze.unfreeze_schedule)
  b = cfg.backbone
  _require(not b.value_range or b.value_range in specs.VALUE_RANGES,
           f"--backbone_value_range={b.value_range} is not one of "
           f"{', '.join(specs.VALUE_RANGES)}.")
  specs.parse_class_weights(cfg.head.class_weights, cfg.head.num_classes)
  _validate_feature_cache(cfg.input, cfg.freeze)


def _validate_backbone(b) -> None:
  _require(bool(b.handle), "--backbone is required: give a keras application "
           "name (e.g. mobilenet_v2), a TF-Hub handle or a Keras model file.")
  _require(b.image_size >= 0 and (b.image_size == 0 or b.image_size >= 8),
           f"--image_size={b.image_size} is invalid; use a size of at least 8 "
           "pixels, or 0 to take it from the backbone.")


def _validate_head(h) -> None:
  _require(h.kind in HEAD_KINDS,
           f"--head={h.kind} is not supported; choose classification or regression.")
  _require(h.num_outputs >= 1, f"--num_outputs must be at least 1, got {h.num_outputs}.")
  _require(not (h.multi_label and h.kind == "regression"),
           "--multi_label applies to classification heads; drop it or --head=regression.")
  _require(h.num_classes >= 2 or h.num_classes == 0 or
           (h.multi_label and h.num_classes == 1),
           f"the head needs at least 2 classes, got {h.num_classes}; check "
           "--num_classes or the label map of your data.")
  _require(not h.class_names or len(h.class_names) == h.num_classes,
           f"{len(h.class_names)} class names were given for "
           f"{h.num_classes} classes; make --num_classes match the label map.")
  _require(all(u > 0 for u in h.hidden_units),
           f"--head_hidden_units must be positive integers, got {list(h.hidden_units)}.")
  _require(0.0 <= h.dropout_rate < 1.0,
           f"--dropout_rate={h.dropout_rate} must be in [0, 1).")
  _require(0.0 <= h.label_smoothing < 1.0,
           f"--label_smoothing={h.label_smoothing} must be in [0, 1).")


def _validate_schedule(s) -> None:
  _require(len(s.values) == len(s.boundaries) + 1,
           f"--lr_values needs exactly one more value than --lr_boundaries "
           f"(got {len(s.values)} values for {len(s.boundaries)} boundaries).")
  _require(all(v >= 0 for v in s.values),
           f"--lr_values must not be negative, got {list(s.values)}.")
  _require(s.train_size >= 0, "--train_size must not be negative (0: count the data).")
  specs.check_boundaries(s.boundaries)
  specs.parse_multipliers(s.lr_multipliers)
  _require(s.warmup_steps >= 0, "--warmup_steps must not be negative.")


def _validate_optimizer(o) -> None:
  _require(0.0 <= o.weight_decay, "--weight_decay must not be negative.")
  _require(0.0 <= o.ema_decay < 1.0,
           f"--ema_decay={o.ema_decay} must be in [0, 1), e.g. 0.999 (0: off).")
  _require(o.name in OPTIMIZERS,
           f"--optimizer={o.name} is not supported; choose one of "
           f"{', '.join(OPTIMIZERS)}.")
  _require(o.clip_norm >= 0, "--clip_norm must not be negative.")


def _validate_input(i) -> None:
  _require(i.batch_size > 0, f"--batch_size must be positive, got {i.batch_size}.")
  _require(i.eval_batch_size >= 0, "--eval_batch_size must not be negative.")
  _require(i.on_bad_record in ("skip", "fail"),
           f"--on_bad_record={i.on_bad_record} is invalid; use skip or fail.")
  _require(i.shuffle_buffer >= 0, "--shuffle_buffer must not be negative.")
  _require(i.label_offset >= 0, f"--label_offset={i.label_offset} must not be negative; "
           "use 1 for slim build_image_data.py records, 0 for 0-based labels.")
  _validate_augmentation(i)
  _require(i.prefetch >= -1, f"--prefetch={i.prefetch} is invalid; give a number of "
           "batches, 0 for none or -1 for tf.data.AUTOTUNE.")


def _validate_augmentation(i) -> None:
  checks = [
      (i.random_flip in specs.FLIP_MODES,
       f"--random_flip={i.random_flip} is invalid; use one of "
       f"{', '.join(specs.FLIP_MODES)}."),
      (0.0 < i.crop_min_area <= 1.0,
       f"--crop_min_area={i.crop_min_area} must be in (0, 1], the smallest "
       "share of the image a random crop keeps (e.g. 0.25)."),
      (0.0 <= i.rotation_degrees <= 180.0,
       f"--rotation_degrees={i.rotation_degrees} must be in [0, 180]."),
      (0.0 <= i.brightness <= 1.0,
       f"--brightness={i.brightness} must be in [0, 1] (max added to pixels "
       "in [0, 1])."),
      (0.0 <= i.contrast < 1.0,
       f"--contrast={i.contrast} must be in [0, 1) (factor 1 +/- contrast)."),
      (0.0 <= i.saturation < 1.0,
       f"--saturation={i.saturation} must be in [0, 1) (factor 1 +/- "
       "saturation)."),
      (i.mixup_alpha >= 0.0,
       f"--mixup_alpha={i.mixup_alpha} must not be negative (0: off; "
       "0.2 is typical)."),
  ]
  for ok, message in checks:
    _require(ok, message)


def _validate_run(r) -> None:
  _require(r.max_steps > 0, f"--max_steps must be positive, got {r.max_steps}.")
  _require(r.save_checkpoints_steps > 0, "--save_checkpoints_steps must be positive.")
  _require(r.keep_checkpoint_max > 0, "--keep_checkpoint_max must be positive.")
  _require(r.log_every_steps > 0, "--log_every_steps must be positive.")
  _require(r.eval_steps >= 0, "--eval_steps must not be negative (0: whole eval set).")
  _require(r.mixed_precision in MIXED_PRECISION_POLICIES,
           f"--mixed_precision={r.mixed_precision} is not supported; choose one of "
           f"{', '.join(MIXED_PRECISION_POLICIES)}.")


def _validate_export(e, h) -> None:
  _require(e.exports_to_keep > 0, "--exports_to_keep must be positive.")
  unknown = [k for k in e.serving_inputs if k not in SERVING_INPUTS]
  _require(not unknown,
           f"--serving_inputs={','.join(e.serving_inputs)} is invalid; list one or "
           f"more of {', '.join(SERVING_INPUTS)} (the first is serving_default).")
  _require(len(set(e.serving_inputs)) == len(e.serving_inputs),
           f"--serving_inputs={','.join(e.serving_inputs)} names an input twice; "
           "list each once.")
  _require("tf_example" not in e.serving_inputs or h.kind != "regression" or
           h.num_outputs == 1,
           f"--serving_inputs=tf_example serves TF Serving's regress, which takes one "
           f"value per example, but the head has {h.num_outputs} outputs; drop "
           "tf_example from --serving_inputs.")
  _require(bool(e.best_metric.strip()), "--best_metric must name an eval metric, "
           "e.g. accuracy or loss.")
  _require(0 <= e.serving_warmup <= 1000,
           f"--serving_warmup={e.serving_warmup} must be between 0 (no warmup "
           "file) and 1000 (TF Serving's limit).")


def _validate_cluster(c) -> None:
  _require(c.distribution in DISTRIBUTIONS,
           f"--distribution={c.distribution} is not supported; choose one of "
           f"{', '.join(DISTRIBUTIONS)}.")
  _require(c.eval_throttle_secs >= 0, "--eval_throttle_secs must not be negative.")
  _require(c.wait_for_workers_secs >= 0,
           "--wait_for_workers_secs must not be negative.")


def _validate_continual(c) -> None:
  pairs = [p.strip() for p in c.warm_start_map.split(",") if p.strip()]
  _require(not pairs or c.warm_start_from,
           "--warm_start_map renames the variables of --warm_start_from; set "
           "--warm_start_from too, or drop --warm_start_map.")
  bad = [p for p in pairs if "=" not in p]
  _require(not bad, f"--warm_start_map entry {bad[0] if bad else ''!r} is not "
           "OLD_PREFIX=NEW_PREFIX; write e.g. --warm_start_map=resnet/block1/=conv1/.")
  _require(0.0 < c.replay_ratio < 1.0,
           f"--replay_ratio={c.replay_ratio} must be between 0 and 1 (exclusive): "
           "the expected share of replayed examples in each batch.")


def _validate_guards(g, e) -> None:
  _require(g.eval_every_steps >= 0, "--eval_every_steps must not be negative.")
  _require(g.metric_mode in specs.METRIC_MODES,
           f"--metric_mode={g.metric_mode} is invalid; use {', '.join(specs.METRIC_MODES)}.")
  _validate_metric_mode(g.metric_mode, g.early_stopping_metric, e.best_metric)
  _require(g.patience >= 0, "--patience must not be negative (0: no early stopping).")
  _require(g.min_delta >= 0, "--min_delta must not be negative.")
  _require(g.regression_tolerance is None or g.regression_tolerance >= 0,
           "--regression_tolerance must not be negative.")
  _require(0.0 < g.regression_lr_factor <= 1.0,
           f"--regression_lr_factor={g.regression_lr_factor} must be in (0, 1].")
  _require(bool(g.early_stopping_metric) or
           (not g.patience and g.regression_tolerance is None),
           "--patience and --regression_tolerance watch an eval metric; set "
           "--early_stopping_metric (e.g. accuracy or loss).")


def _validate_metric_mode(mode: str, early_stopping_metric: str, best_metric: str) -> None:
  """One mode compares both watched metrics: refuse a mode wrong for one of them.

  `auto` resolves per metric name, so it always fits. An explicit max/min
  is what the user says about the metric they watch; when early stopping and
  the best export watch different metrics it must also be what auto picks for
  each, or one of them would be compared backwards.
  """
  if mode == "auto" or not early_stopping_metric or early_stopping_metric == best_metric:
    return
  for metric in (early_stopping_metric, best_metric):
    _require(specs.metric_mode(metric) == mode,
             f"--metric_mode={mode} applies to both --early_stopping_metric="
             f"{early_stopping_metric} and --best_metric={best_metric}, but {metric} "
             f"is better when {'higher' if mode == 'min' else 'lower'} by its name; "
             f"watch one metric (--best_metric={early_stopping_metric}) or use "
             "--metric_mode=auto.")


def _validate_feature_cache(i, f) -> None:
  _require(i.cache_budget_mb >= 0, f"--cache_budget_mb={i.cache_budget_mb} must not be "
           "negative (0: a quarter of this machine's memory).")
  copies = i.cache_features_with_augmentation
  _require(copies >= 0, f"--cache_features_with_augmentation={copies} must not be "
           "negative (0: cache un-augmented features only).")
  if not i.cache_features:
    _require(not copies, "--cache_features_with_augmentation needs "
             "--cache_features=DIR, the directory of the feature cache.")
    return
  # Cached features are only valid while no weight below them moves: with a
  # partial freeze the frozen lower part is cached (model/split.py refuses,
  # knowing the backbone, a plan that leaves nothing frozen below a cut).
  _require(f.spec.strip() != "none" or f.unfreeze_schedule,
           "--cache_features needs a frozen backbone or a frozen lower part, but "
           "--freeze=none trains all of it; use --freeze=all or e.g. --freeze=last:N, or "
           "drop --cache_features.")
  _require(not i.mixup_alpha, "--mixup_alpha mixes images before the backbone, which "
           "--cache_features skips; drop one of the two.")
  if copies:
    _require(i.augments(), f"--cache_features_with_augmentation={copies} "
             "caches augmented copies but no augmentation is on; set e.g. "
             "--random_flip=horizontal, or use 0.")
  else:
    _require(not i.augments(), "--cache_features caches features of "
             "un-augmented images but augmentation is on (--random_flip, --random_crop, "
             "--rotation_degrees, --brightness, --contrast or --saturation); drop it, or "
             "cache K augmented copies with --cache_features_with_augmentation=K.")
