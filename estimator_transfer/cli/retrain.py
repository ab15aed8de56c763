"""et-retrain: keep a served model learning from a folder that new data lands in.

    et-retrain --train_data=incoming/ --eval_data=validation/ \
      --model_dir=runs/live --export_dir=serving/live --backbone=... \
      --min_new_examples=500 --epochs_per_round=2 --replay_ratio=0.5 \
      --max_regression=0.01 --ema_decay=0.999

The et-train flags set the model and its training (--train_data is the
watched folder); the retrain flags (config.sections.RetrainConfig) set when a
round starts and what it may publish. See estimator_transfer/retrain/.
"""
import logging

from absl import flags

from estimator_transfer.cli import common
from estimator_transfer.cli import flags as et_flags
from estimator_transfer.config.sections import RetrainConfig
from estimator_transfer.config.settings import section_settings
from estimator_transfer.retrain import service

log = logging.getLogger("estimator_transfer")

_DEFINE = {"integer": flags.DEFINE_integer, "float": flags.DEFINE_float,
           "bool": flags.DEFINE_bool, "string": flags.DEFINE_string}


def define_flags() -> None:
  """The et-train flags plus the RetrainConfig settings (idempotent)."""
  et_flags.define_flags()
  for field, meta in section_settings(RetrainConfig):
    if meta.flag not in flags.FLAGS:
      _DEFINE[meta.kind](meta.flag, meta.default_for_flag(field.default), meta.help)


def retrain_config(flag_values=flags.FLAGS) -> RetrainConfig:
  return RetrainConfig(**{field.name: meta.parse(flag_values[meta.flag].value)
                          for field, meta in section_settings(RetrainConfig)})


def _format(value) -> str:
  return "-" if value is None else f"{value:.3f}"


def print_round(line: dict) -> None:
  """One console line per finished round."""
  challenger = line.get("challenger") or {}
  champion = line.get("champion") or {}
  version = line["version"] if line["version"] is not None else "-"
  print(f"et-retrain: round {line['round']}: {line['new_examples']} new examples "
        f"from {len(line['shards'])} shard(s), {line['steps']} steps; challenger old/new "
        f"{_format(challenger.get('old_class_accuracy'))}/"
        f"{_format(challenger.get('new_class_accuracy'))}, champion old "
        f"{_format(champion.get('old_class_accuracy'))}; {line['decision']} "
        f"(version {version}; {line['reason']})", flush=True)


def main(argv):
  del argv
  base = et_flags.flags_to_config(flags.FLAGS)
  summary = service.Service(base, retrain_config(), report=print_round).run()
  how = f"stopped by {summary.stopped_by}" if summary.stopped_by else "done"
  print(f"et-retrain: {how} after {len(summary.rounds)} round(s) in this run; ledger "
        f"{base.run.model_dir}/ledger.jsonl", flush=True)


def run():
  common.run_main("et-retrain", define_flags, main)


if __name__ == "__main__":
  run()
