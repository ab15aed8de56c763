"""et-evaluate: evaluate a checkpoint or an export; writes the eval report.

  et-evaluate --model_dir=runs/x                        # latest checkpoint
  et-evaluate --model_dir=runs/x --checkpoint_path=best # best kept by et-train
  et-evaluate --model_dir=runs/x --checkpoint_path=runs/x/model.ckpt-400
  et-evaluate --export_path=exports/x --eval_data=data/validation

Writes eval_results.json (accuracy, top-k, loss, per-class precision/recall/
F1, confusion matrix, number of examples, checkpoint step) and
confusion_matrix.png into --eval_output_dir (default: the model_dir, or the
export version directory's parent for an export).
"""
import json
import os

from absl import flags

from estimator_transfer.cli import common
from estimator_transfer.cli import flags as et_flags
from estimator_transfer.cli import trained_model
from estimator_transfer.errors import ConfigError
from estimator_transfer.evaluation import export_eval
from estimator_transfer.evaluation import report as evaluation
from estimator_transfer.training import experiment as runner


def define_evaluate_flags():
  et_flags.define_flags()
  if "export_path" in flags.FLAGS:
    return
  flags.DEFINE_string("export_path", "", "et-evaluate: evaluate this SavedModel export "
                      "(a version dir, or an export base dir for its newest version) "
                      "instead of a checkpoint; needs --eval_data.")
  flags.DEFINE_string("eval_output_dir", "", "et-evaluate: where to write "
                      "eval_results.json and confusion_matrix.png (default: model_dir).")


def _print_summary(report, what):
  scalars = {k: v for k, v in report.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
  print(json.dumps(scalars, sort_keys=True))
  for name, row in report.get("per_class", {}).items():
    print(f"  {name:>16}  precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
          f"f1 {row['f1']:.3f}  n={row['support']}")
  step = f" at step {report['global_step']}" if "global_step" in report else ""
  print(f"et-evaluate: accuracy {report['accuracy']:.4f}{step} on "
        f"{report.get('eval_data', '')} ({what})")


def _evaluate_export(f) -> None:
  """et-evaluate --export_path: the export's report, next to its versions by default."""
  if not f.eval_data:
    raise ConfigError("--eval_data is required to evaluate an export.")
  if not os.path.exists(f.export_path):
    raise ConfigError(f"--export_path={f.export_path} does not exist.")
  if (f.eval_batch_size or f.batch_size) < 1:
    raise ConfigError("--eval_batch_size (or --batch_size) must be at least 1.")
  trained_model.check_output_dir(f.eval_output_dir, "--eval_output_dir")
  try:
    report = export_eval.evaluate_export(f.export_path, f.eval_data, f.image_key,
                                         f.label_key, f.eval_batch_size or f.batch_size,
                                         f.label_offset)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(f"cannot evaluate {f.export_path}: {str(e).rstrip('.')}.") from e
  out = f.eval_output_dir or os.path.dirname(os.path.abspath(report["export"].rstrip("/")))
  trained_model.check_output_dir(out, "--eval_output_dir")
  paths = evaluation.write_report(report, out)
  _print_summary(report, f"export {f.export_path}")
  print(f"et-evaluate: report {paths['json']}")


def main(argv):
  del argv
  f = flags.FLAGS
  if f.export_path:
    _evaluate_export(f)
    return
  trained_model.check_model_dir(f.model_dir, f.checkpoint_path)
  cfg = et_flags.flags_to_config(f)
  trained_model.check_same_classes(cfg, cfg.run.model_dir)
  trained_model.check_output_dir(f.eval_output_dir or cfg.run.model_dir,
                                 "--eval_output_dir" if f.eval_output_dir else "--model_dir")
  checkpoint = trained_model.resolve_checkpoint(cfg.run.model_dir, f.checkpoint_path)
  experiment = runner.Experiment(cfg)
  experiment.evaluate(checkpoint_path=checkpoint, output_dir=f.eval_output_dir or None)
  report = experiment.last_report
  _print_summary(report, os.path.basename(report.get("checkpoint", "")) or "latest")
  out = f.eval_output_dir or cfg.run.model_dir
  print(f"et-evaluate: report {os.path.join(out, evaluation.REPORT_FILENAME)}")


def run():
  common.run_main("et-evaluate", define_evaluate_flags, main)


if __name__ == "__main__":
  run()
