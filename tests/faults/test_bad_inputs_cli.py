"""Wrong inputs to the read-only console scripts: one sentence, exit 1, nothing damaged.

et-evaluate, et-export, et-predict, et-inspect-export and et-prepare-data are
driven with missing paths, empty and truncated files, files of the wrong kind
(a JPEG where a SavedModel, TFRecord, label map or model_dir is expected), a
directory where a file is expected and the reverse, FIFOs and broken links
(root ignores file modes, so these stand for unreadable inputs), bad label
maps, corrupt images, half-written SavedModel versions, truncated checkpoints,
read-only output directories (real read-only bind mounts) and out-of-range
flag values. Every case must exit 1 (or 0 where skipping is the documented
behaviour) with ONE `<script>: error: ...` line last on stderr, no traceback,
and leave the trained model_dir, the export and the input byte-for-byte as
they were.

Speed: ~100 cases would cost ~100 TensorFlow imports as separate console
scripts. Instead one subprocess (this file run as a script) imports the
scripts' modules once and fork()s a fresh process per case, which calls the
very `run()` entry point the console script calls, with the case's argv, its
own stdout/stderr files and its own exit status. A few cases also run as the
installed console scripts, to show the two agree.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from faults import fault_tools  # noqa: E402  # pylint: disable=wrong-import-position

import pytest  # noqa: E402

SCRIPTS = {"et-evaluate": "evaluate", "et-export": "export", "et-predict": "predict",
           "et-inspect-export": "inspect_export", "et-prepare-data": "prepare_data"}
CASE_TIMEOUT = 60  # seconds; a hang (a FIFO opened for reading) ends as rc -14

ERR, OK = "error", "ok"

# (id, script, args, expected outcome, substrings of the error line / stdout).
# Placeholders: {M} the trained model_dir, {X} its export base, {F} the bad
# files, {D} good eval TFRecords, {I} a good image folder, {O} fresh outputs.
CASES = [
    # --- et-evaluate: model_dir, checkpoints, config.json
    ("ev_model_dir_missing", "et-evaluate", ["--model_dir={F}/nope"], ERR, ["does not exist"]),
    ("ev_model_dir_empty", "et-evaluate", ["--model_dir={F}/emptydir"], ERR, ["holds no trained model"]),
    ("ev_model_dir_is_jpeg", "et-evaluate", ["--model_dir={F}/photo.jpg"], ERR, ["is a file, not a directory"]),
    ("ev_no_checkpoints", "et-evaluate", ["--model_dir={F}/model_nockpt"], ERR, ["no checkpoint in"]),
    ("ev_truncated_checkpoint", "et-evaluate", ["--model_dir={F}/model_truncckpt"], ERR,
     ["model.ckpt-4.data-00000-of-00001 is unreadable"]),
    ("ev_garbage_index", "et-evaluate", ["--model_dir={F}/model_badindex"], ERR, ["model.ckpt-4.index is unreadable"]),
    ("ev_state_names_missing_ckpt", "et-evaluate", ["--model_dir={F}/model_badstate"], ERR, ["model.ckpt-99.index is missing"]),
    ("ev_state_file_is_jpeg", "et-evaluate", ["--model_dir={F}/model_garbstate"], ERR, ["checkpoint state file"]),
    ("ev_config_truncated", "et-evaluate", ["--model_dir={F}/model_badconfig"], ERR, ["config.json is not a valid"]),
    ("ev_config_empty", "et-evaluate", ["--model_dir={F}/model_emptyconfig"], ERR, ["config.json is not a valid"]),
    ("ev_config_is_list", "et-evaluate", ["--model_dir={F}/model_listconfig"], ERR, ["JSON list"]),
    ("ev_config_is_dir", "et-evaluate", ["--model_dir={F}/model_dirconfig"], ERR, ["config.json is not a regular file"]),
    ("ev_checkpoint_missing", "et-evaluate", ["--model_dir={M}", "--checkpoint_path={F}/nope/model.ckpt-3"], ERR,
     ["--checkpoint_path=", "is missing"]),
    ("ev_checkpoint_best_none", "et-evaluate", ["--model_dir={M}", "--checkpoint_path=best"], ERR, ["no best checkpoint"]),
    ("ev_checkpoint_is_jpeg", "et-evaluate", ["--model_dir={M}", "--checkpoint_path={F}/photo.jpg"], ERR,
     ["is a file but not a checkpoint"]),
    ("ev_checkpoint_is_dir", "et-evaluate", ["--model_dir={M}", "--checkpoint_path={F}/emptydir"], ERR, ["is a directory"]),
    # --- et-evaluate: eval data
    ("ev_data_missing", "et-evaluate", ["--model_dir={M}", "--eval_data={F}/nope/x*"], ERR, ["no TFRecord files found"]),
    ("ev_data_jpeg", "et-evaluate", ["--model_dir={M}", "--eval_data={F}/photo.jpg"], ERR, ["is a JPEG image, not a TFRecord"]),
    ("ev_data_empty", "et-evaluate", ["--model_dir={M}", "--eval_data={F}/empty"], ERR, ["are all empty"]),
    ("ev_data_text", "et-evaluate", ["--model_dir={M}", "--eval_data={F}/text.txt"], ERR, ["is a text file"]),
    ("ev_data_truncated_header", "et-evaluate", ["--model_dir={M}", "--eval_data={F}/trunc_header.tfrecord"], ERR,
     ["is not a TFRecord file"]),
    ("ev_data_emptydir", "et-evaluate", ["--model_dir={M}", "--eval_data={F}/emptydir"], ERR, ["no TFRecord files found"]),
    ("ev_data_fifo", "et-evaluate", ["--model_dir={M}", "--eval_data={F}/fifo"], ERR, ["is not a regular file"]),
    ("ev_data_broken_link", "et-evaluate", ["--model_dir={M}", "--eval_data={F}/broken_link"], ERR,
     ["is a broken symbolic link"]),
    ("ev_data_truncated_tail_skipped", "et-evaluate",
     ["--model_dir={F}/model_copy", "--eval_data={F}/trunc.tfrecord", "--eval_output_dir={O}/ev_trunc"], OK,
     ["et-evaluate: accuracy"]),
    # --- et-evaluate: label maps, outputs, flags
    ("ev_label_map_empty", "et-evaluate", ["--model_dir={M}", "--label_map={F}/labels_empty.txt"], ERR, ["is empty"]),
    ("ev_label_map_duplicate", "et-evaluate", ["--model_dir={M}", "--label_map={F}/labels_dup.txt"], ERR,
     ["lists a class twice"]),
    ("ev_label_map_blank_line", "et-evaluate", ["--model_dir={M}", "--label_map={F}/labels_blank.txt"], ERR,
     ["line 2 of label map"]),
    ("ev_label_map_other_classes", "et-evaluate", ["--model_dir={M}", "--label_map={F}/labels_other.txt"], ERR,
     ["cat, dog, bird", "has 3 classes"]),
    ("ev_label_map_missing", "et-evaluate", ["--model_dir={M}", "--label_map={F}/nope.txt"], ERR, ["does not exist"]),
    ("ev_label_map_dir", "et-evaluate", ["--model_dir={M}", "--label_map={F}/emptydir"], ERR, ["is a directory"]),
    ("ev_label_map_binary", "et-evaluate", ["--model_dir={M}", "--label_map={F}/photo.jpg"], ERR, ["is not UTF-8 text"]),
    ("ev_label_map_fifo", "et-evaluate", ["--model_dir={M}", "--label_map={F}/fifo"], ERR, ["is not a regular file"]),
    ("ev_output_is_file", "et-evaluate", ["--model_dir={M}", "--eval_output_dir={F}/photo.jpg"], ERR,
     ["is a file, not a directory"]),
    ("ev_batch_negative", "et-evaluate", ["--model_dir={M}", "--eval_batch_size=-3"], ERR, ["--eval_batch_size"]),
    ("ev_eval_steps_negative", "et-evaluate", ["--model_dir={M}", "--eval_steps=-1"], ERR, ["--eval_steps"]),
    # --- et-evaluate --export_path
    ("ev_export_missing", "et-evaluate", ["--export_path={F}/nope", "--eval_data={D}"], ERR, ["does not exist"]),
    ("ev_export_is_jpeg", "et-evaluate", ["--export_path={F}/photo.jpg", "--eval_data={D}"], ERR, ["is not a SavedModel"]),
    ("ev_export_truncated_pb", "et-evaluate", ["--export_path={F}/exp_truncpb", "--eval_data={D}"], ERR,
     ["saved_model.pb is not a readable SavedModel"]),
    ("ev_export_jpeg_pb", "et-evaluate", ["--export_path={F}/exp_jpegpb", "--eval_data={D}"], ERR,
     ["saved_model.pb is not a readable SavedModel"]),
    ("ev_export_no_variables", "et-evaluate", ["--export_path={F}/exp_novars", "--eval_data={D}"], ERR,
     ["cannot load the SavedModel"]),
    ("ev_export_truncated_variables", "et-evaluate", ["--export_path={F}/exp_truncvars", "--eval_data={D}"], ERR,
     ["cannot load the SavedModel"]),
    ("ev_export_only_temp_version", "et-evaluate", ["--export_path={F}/exp_onlytemp", "--eval_data={D}"], ERR,
     ["no version directories"]),
    ("ev_export_data_jpeg", "et-evaluate", ["--export_path={X}", "--eval_data={F}/photo.jpg"], ERR,
     ["is a JPEG image, not a TFRecord"]),
    ("ev_export_data_truncated_skipped", "et-evaluate",
     ["--export_path={X}", "--eval_data={F}/trunc.tfrecord", "--eval_output_dir={O}/ev_x_trunc"], OK,
     ["et-evaluate: accuracy"]),
    ("ev_export_batch_zero", "et-evaluate", ["--export_path={X}", "--eval_data={D}", "--eval_batch_size=0",
                                             "--batch_size=0"], ERR, ["must be at least 1"]),
    ("ev_export_output_is_file", "et-evaluate", ["--export_path={X}", "--eval_data={D}",
                                                 "--eval_output_dir={F}/photo.jpg"], ERR, ["is a file"]),
    # --- et-export
    ("ex_model_dir_missing", "et-export", ["--model_dir={F}/nope", "--export_dir={O}/ex"], ERR, ["does not exist"]),
    ("ex_model_dir_is_jpeg", "et-export", ["--model_dir={F}/photo.jpg", "--export_dir={O}/ex"], ERR, ["is a file"]),
    ("ex_no_checkpoints", "et-export", ["--model_dir={F}/model_nockpt", "--export_dir={O}/ex"], ERR, ["no checkpoint in"]),
    ("ex_truncated_checkpoint", "et-export", ["--model_dir={F}/model_truncckpt", "--export_dir={O}/ex"], ERR,
     ["is unreadable at tensor"]),
    ("ex_checkpoint_is_jpeg", "et-export", ["--model_dir={M}", "--checkpoint_path={F}/photo.jpg",
                                            "--export_dir={O}/ex"], ERR, ["not a checkpoint"]),
    ("ex_export_dir_is_file", "et-export", ["--model_dir={M}", "--export_dir={F}/photo.jpg"], ERR,
     ["is a file, not a directory"]),
    ("ex_export_dir_under_file", "et-export", ["--model_dir={M}", "--export_dir={F}/photo.jpg/sub"], ERR,
     ["is under the file"]),
    ("ex_label_map_other_classes", "et-export", ["--model_dir={M}", "--label_map={F}/labels_other.txt",
                                                 "--export_dir={O}/ex"], ERR, ["has 3 classes"]),
    ("ex_keep_negative", "et-export", ["--model_dir={M}", "--export_dir={O}/ex", "--exports_to_keep=-1"], ERR,
     ["--exports_to_keep"]),
    # --- et-predict
    ("pr_data_missing", "et-predict", ["--export_dir={X}", "--predict_data={F}/nope", "--output={O}/p.csv"], ERR,
     ["no TFRecord files found"]),
    ("pr_data_emptydir", "et-predict", ["--export_dir={X}", "--predict_data={F}/emptydir", "--output={O}/p.csv"], ERR,
     ["no images"]),
    ("pr_data_empty_file", "et-predict", ["--export_dir={X}", "--predict_data={F}/empty", "--output={O}/p.csv"], ERR,
     ["are all empty"]),
    ("pr_data_text", "et-predict", ["--export_dir={X}", "--predict_data={F}/text.txt", "--output={O}/p.csv"], ERR,
     ["is a text file"]),
    ("pr_data_fifo", "et-predict", ["--export_dir={X}", "--predict_data={F}/fifo", "--output={O}/p.csv"], ERR,
     ["is not a regular file"]),
    ("pr_data_fifo_png", "et-predict", ["--export_dir={X}", "--predict_data={F}/fifo.png", "--output={O}/p.csv"], ERR,
     ["is not a regular file"]),
    ("pr_data_broken_link", "et-predict", ["--export_dir={X}", "--predict_data={F}/broken_link",
                                           "--output={O}/p.csv"], ERR, ["broken symbolic link"]),
    ("pr_data_truncated_tail_is_a_row", "et-predict", ["--export_dir={X}", "--predict_data={F}/trunc.tfrecord",
                                                       "--output={O}/pr_trunc.csv"], OK, ["(1 errors)"]),
    ("pr_bad_images_are_rows", "et-predict", ["--export_dir={X}", "--predict_data={F}/imgs_bad",
                                              "--output={O}/pr_bad.csv"], OK, ["errors)"]),
    ("pr_output_is_dir", "et-predict", ["--export_dir={X}", "--predict_data={F}/photo.jpg",
                                        "--output={F}/dir.csv"], ERR, ["is a directory"]),
    ("pr_output_extension", "et-predict", ["--export_dir={X}", "--predict_data={F}/photo.jpg",
                                           "--output={O}/p.txt"], ERR, [".csv or .jsonl"]),
    ("pr_output_under_file", "et-predict", ["--export_dir={X}", "--predict_data={F}/photo.jpg",
                                            "--output={F}/photo.jpg/p.csv"], ERR, ["is under the file"]),
    ("pr_top_k_zero", "et-predict", ["--export_dir={X}", "--predict_data={F}/photo.jpg", "--output={O}/p.csv",
                                     "--top_k=0"], ERR, ["--top_k=0"]),
    ("pr_num_shards_zero", "et-predict", ["--export_dir={X}", "--predict_data={F}/photo.jpg", "--output={O}/p.csv",
                                          "--num_shards=0"], ERR, ["--num_shards=0"]),
    ("pr_shard_index_out_of_range", "et-predict", ["--export_dir={X}", "--predict_data={F}/photo.jpg",
                                                   "--output={O}/p.csv", "--num_shards=2", "--shard_index=2"],
     ERR, ["--shard_index=2"]),
    ("pr_batch_zero", "et-predict", ["--export_dir={X}", "--predict_data={F}/photo.jpg", "--output={O}/p.csv",
                                     "--batch_size=0"], ERR, ["--batch_size"]),
    ("pr_export_missing", "et-predict", ["--export_dir={F}/nope", "--predict_data={F}/photo.jpg",
                                         "--output={O}/p.csv"], ERR, ["does not exist"]),
    ("pr_export_truncated_pb", "et-predict", ["--export_dir={F}/exp_truncpb", "--predict_data={F}/photo.jpg",
                                              "--output={O}/p.csv"], ERR, ["not a readable SavedModel"]),
    ("pr_export_truncated_variables", "et-predict", ["--export_dir={F}/exp_truncvars",
                                                     "--predict_data={F}/photo.jpg", "--output={O}/p.csv"],
     ERR, ["cannot load the SavedModel"]),
    ("pr_model_dir_missing", "et-predict", ["--model_dir={F}/nope", "--predict_data={F}/photo.jpg",
                                            "--output={O}/p.csv"], ERR, ["does not exist"]),
    ("pr_truncated_checkpoint", "et-predict", ["--model_dir={F}/model_truncckpt", "--predict_data={F}/photo.jpg",
                                               "--output={O}/p.csv"], ERR, ["is unreadable at tensor"]),
    # --- et-inspect-export
    ("in_missing", "et-inspect-export", ["--export_dir={F}/nope"], ERR, ["does not exist"]),
    ("in_is_jpeg", "et-inspect-export", ["--export_dir={F}/photo.jpg"], ERR, ["is not a SavedModel"]),
    ("in_emptydir", "et-inspect-export", ["--export_dir={F}/emptydir"], ERR, ["no version directories"]),
    ("in_truncated_pb", "et-inspect-export", ["--export_dir={F}/exp_truncpb"], ERR, ["not a readable SavedModel"]),
    ("in_empty_pb", "et-inspect-export", ["--export_dir={F}/exp_emptypb"], ERR, ["no 'serve' meta graph"]),
    ("in_jpeg_pb", "et-inspect-export", ["--export_dir={F}/exp_jpegpb"], ERR, ["not a readable SavedModel"]),
    ("in_no_variables", "et-inspect-export", ["--export_dir={F}/exp_novars"], ERR, ["checks failed, first 'load'"]),
    ("in_truncated_variables", "et-inspect-export", ["--export_dir={F}/exp_truncvars"], ERR,
     ["checks failed, first 'load'"]),
    ("in_only_temp_version", "et-inspect-export", ["--export_dir={F}/exp_onlytemp"], ERR, ["no version directories"]),
    ("in_incomplete_newer_version_warned", "et-inspect-export", ["--export_dir={F}/exp_emptyver"], OK,
     ["checks passed"]),
    ("in_check_batch_zero", "et-inspect-export", ["--export_dir={X}", "--check_batch=0"], ERR, ["--check_batch=0"]),
    # --- et-prepare-data
    ("pp_image_dir_missing", "et-prepare-data", ["--image_dir={F}/nope", "--output_dir={O}/pp"], ERR,
     ["is not a directory"]),
    ("pp_image_dir_is_jpeg", "et-prepare-data", ["--image_dir={F}/photo.jpg", "--output_dir={O}/pp"], ERR,
     ["is not a directory"]),
    ("pp_image_dir_empty", "et-prepare-data", ["--image_dir={F}/emptydir", "--output_dir={O}/pp"], ERR,
     ["has no class sub-folders"]),
    ("pp_images_not_in_class_folders", "et-prepare-data", ["--image_dir={F}/imgs_flat", "--output_dir={O}/pp"], ERR,
     ["has no class sub-folders"]),
    ("pp_class_folders_without_images", "et-prepare-data", ["--image_dir={F}/imgs_noimg", "--output_dir={O}/pp"],
     ERR, ["no images in the class folders"]),
    ("pp_all_images_bad", "et-prepare-data", ["--image_dir={F}/imgs_allbad", "--output_dir={O}/pp_allbad"], ERR,
     ["--max_bad_fraction"]),
    ("pp_bad_images_skipped_and_listed", "et-prepare-data", ["--image_dir={F}/imgs_bad", "--output_dir={O}/pp_bad",
                                                             "--max_bad_fraction=0.5"], OK,
     ["bad: green/text.jpg", "bad: red/trunc.jpg", "bad: red/zero.jpg"]),
    ("pp_output_is_file", "et-prepare-data", ["--image_dir={I}", "--output_dir={F}/photo.jpg"], ERR, ["is a file"]),
    ("pp_output_under_file", "et-prepare-data", ["--image_dir={I}", "--output_dir={F}/photo.jpg/x"], ERR,
     ["is a file"]),
    ("pp_output_is_a_class_folder", "et-prepare-data", ["--image_dir={I}", "--output_dir={I}/red"], ERR,
     ["is a class folder"]),
    ("pp_label_map_missing", "et-prepare-data", ["--image_dir={I}", "--output_dir={O}/pp",
                                                 "--label_map={F}/nope.txt"], ERR, ["does not exist"]),
    ("pp_label_map_empty", "et-prepare-data", ["--image_dir={I}", "--output_dir={O}/pp",
                                               "--label_map={F}/labels_empty.txt"], ERR, ["is empty"]),
    ("pp_label_map_spaces_only", "et-prepare-data", ["--image_dir={I}", "--output_dir={O}/pp",
                                                     "--label_map={F}/labels_spaces.txt"], ERR, ["is empty"]),
    ("pp_label_map_duplicate", "et-prepare-data", ["--image_dir={I}", "--output_dir={O}/pp",
                                                   "--label_map={F}/labels_dup.txt"], ERR, ["twice"]),
    ("pp_label_map_blank_line", "et-prepare-data", ["--image_dir={I}", "--output_dir={O}/pp",
                                                    "--label_map={F}/labels_blank.txt"], ERR, ["is blank"]),
    ("pp_label_map_lacks_a_folder", "et-prepare-data", ["--image_dir={I}", "--output_dir={O}/pp",
                                                        "--label_map={F}/labels_two.txt"], ERR,
     ["class folder 'blue' is not in"]),
    ("pp_label_map_dir", "et-prepare-data", ["--image_dir={I}", "--output_dir={O}/pp",
                                             "--label_map={F}/emptydir"], ERR, ["is a directory"]),
    ("pp_label_map_binary", "et-prepare-data", ["--image_dir={I}", "--output_dir={O}/pp",
                                                "--label_map={F}/photo.jpg"], ERR, ["not UTF-8 text"]),
    ("pp_label_map_fifo", "et-prepare-data", ["--image_dir={I}", "--output_dir={O}/pp",
                                              "--label_map={F}/fifo"], ERR, ["not a regular file"]),
] + [
    (f"pp_flag_{flag.strip('-').split('=')[0]}_{i}", "et-prepare-data",
     ["--image_dir={I}", "--output_dir={O}/pp", flag, *extra], ERR, [flag.split("=")[0]])
    for i, (flag, extra) in enumerate([
        ("--num_shards=0", []), ("--validation_percent=-1", []), ("--validation_percent=150", []),
        ("--test_percent=60", ["--validation_percent=50"]), ("--validation_percent=nan", []),
        ("--max_bad_fraction=2", []), ("--num_workers=-1", []), ("--jpeg_quality=0", []),
        ("--jpeg_quality=101", []), ("--max_image_side=-1", []), ("--max_image_pixels=0", []),
        ("--num_shards=abc", [])])
] + [
    (f"{script}_{kind}", script, [arg], ERR, [want])
    for script in SCRIPTS
    for kind, arg, want in (("unknown_flag", "--no_such_flag=1", "no_such_flag"),
                            ("stray_argument", "stray", "unexpected argument"))
]

# Run while {R} (a copy of the model_dir, an export base and an output dir)
# is a read-only bind mount.
READ_ONLY_CASES = [
    ("ro_evaluate_report_into_model_dir", "et-evaluate", ["--model_dir={R}/model"], ERR,
     ["read-only file system"]),
    ("ro_evaluate_output_dir", "et-evaluate", ["--model_dir={M}", "--eval_output_dir={R}/out"], ERR,
     ["read-only file system"]),
    ("ro_export_dir", "et-export", ["--model_dir={M}", "--export_dir={R}/export"], ERR, ["read-only file system"]),
    ("ro_predict_output", "et-predict", ["--export_dir={X}", "--predict_data={F}/photo.jpg",
                                         "--output={R}/out/p.csv"], ERR, ["read-only file system"]),
    ("ro_prepare_output", "et-prepare-data", ["--image_dir={I}", "--output_dir={R}/out"], ERR,
     ["read-only file system"]),
]


# --- the fork-per-case driver (this file run as a script) ---------------------


def digest(path: str) -> str:
  """fault_tools.tree_digest, with FIFOs named instead of opened (that blocks)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import stat  # pylint: disable=import-outside-toplevel
  if os.path.lexists(path) and not os.path.isdir(path):
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
      return f"special {stat.S_IFMT(mode)} {os.readlink(path) if os.path.islink(path) else ''}"
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  special = []
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      if not os.path.islink(full) and not stat.S_ISREG(os.lstat(full).st_mode):
        special.append(full)
  if not special:
    return fault_tools.tree_digest(path)
  listing = hashlib.sha256()
  for root, dirs, names in sorted(os.walk(path)):
    for name in sorted(dirs + names):
      full = os.path.join(root, name)
      listing.update(full.encode("utf-8", "surrogateescape") + b"\0")
      if os.path.isfile(full) and not os.path.islink(full):
        with open(full, "rb") as f:
          listing.update(hashlib.sha256(f.read()).digest())
      elif os.path.islink(full):
        listing.update(os.readlink(full).encode())
  return listing.hexdigest()


def _drive(cases_path: str, results_path: str) -> None:
  """Runs every case in a fork()ed child of a process that imported the scripts once."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import importlib  # pylint: disable=import-outside-toplevel
  modules = {name: importlib.import_module(f"estimator_transfer.cli.{module}")
             for name, module in SCRIPTS.items()}
  with open(cases_path, encoding="utf-8") as f:
    cases = json.load(f)
  results = []
  for case in cases:
    before = {p: digest(p) for p in case["watch"]}
    out_path, err_path = results_path + ".stdout", results_path + ".stderr"
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the case's own process
      code = 99
      try:
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(err, 2)
        signal.alarm(CASE_TIMEOUT)
        sys.argv = list(case["argv"])
        modules[sys.argv[0]].run()
        code = 0
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      except BaseException:  # pylint: disable=broad-except
        import traceback  # pylint: disable=import-outside-toplevel
        traceback.print_exc()
      finally:
        # What interpreter exit would do before os._exit: multiprocessing's
        # finalizers (a Pool's semaphores), so its tracker reports no leak.
        from multiprocessing import util  # pylint: disable=import-outside-toplevel
        util._exit_function()  # pylint: disable=protected-access
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # pylint: disable=protected-access
    _, status = os.waitpid(pid, 0)
    with open(out_path, encoding="utf-8", errors="replace") as f:
      stdout = f.read()
    with open(err_path, encoding="utf-8", errors="replace") as f:
      stderr = f.read()
    results.append({"id": case["id"], "rc": os.waitstatus_to_exitcode(status),
                    "seconds": round(time.monotonic() - start, 2),
                    "stdout": stdout, "stderr": stderr,
                    "changed": [p for p in case["watch"]
                                if digest(p) != before[p]]})
  with open(results_path, "w", encoding="utf-8") as f:
    json.dump(results, f)


if __name__ == "__main__":
  _drive(sys.argv[1], sys.argv[2])
  sys.exit(0)


# --- the files every case reads -----------------------------------------------


def _copy_model(model_dir: str, dest: str) -> str:
  shutil.copytree(model_dir, dest)
  return dest


def _make_bad_files(root: str, model_dir: str, export_dir: str, tiny_data) -> str:
  """Writes every wrong input under root/f; returns that directory."""
  import glob  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  f = os.path.join(root, "f")
  os.makedirs(os.path.join(f, "emptydir"))
  jpg = sorted(glob.glob(os.path.join(tiny_data["images"], "red", "*.jpg")))[0]
  shutil.copy(jpg, os.path.join(f, "photo.jpg"))
  open(os.path.join(f, "empty"), "wb").close()
  _write(os.path.join(f, "text.txt"), "hello\n")
  os.mkfifo(os.path.join(f, "fifo"))
  os.mkfifo(os.path.join(f, "fifo.png"))
  os.symlink(os.path.join(f, "nothing-here"), os.path.join(f, "broken_link"))
  os.makedirs(os.path.join(f, "dir.csv"))
  record = sorted(glob.glob(os.path.join(tiny_data["eval"], "*.tfrecord")))[0]
  data = open(record, "rb").read()
  _write(os.path.join(f, "trunc.tfrecord"), data[:len(data) // 2])
  _write(os.path.join(f, "trunc_header.tfrecord"), data[:5])
  for name, text in (("labels_empty.txt", ""), ("labels_dup.txt", "red\ngreen\nred\n"),
                     ("labels_blank.txt", "red\n\ngreen\nblue\n"), ("labels_two.txt", "red\ngreen\n"),
                     ("labels_other.txt", "cat\ndog\nbird\n"), ("labels_spaces.txt", "  \n\n")):
    _write(os.path.join(f, name), text)
  _make_bad_model_dirs(f, model_dir)
  _make_bad_exports(f, export_dir)
  _make_image_folders(f, tiny_data["images"], jpg, np, Image)
  return f


def _write(path: str, data) -> None:
  with open(path, "wb" if isinstance(data, bytes) else "w") as out:
    out.write(data)


def _make_bad_model_dirs(f: str, model_dir: str) -> None:
  import glob  # pylint: disable=import-outside-toplevel
  _copy_model(model_dir, os.path.join(f, "model_copy"))
  nockpt = _copy_model(model_dir, os.path.join(f, "model_nockpt"))
  for path in glob.glob(os.path.join(nockpt, "model.ckpt*")) + [os.path.join(nockpt, "checkpoint")]:
    os.remove(path)
  latest = os.path.basename(open(os.path.join(model_dir, "checkpoint")).read().split('"')[1])
  trunc = _copy_model(model_dir, os.path.join(f, "model_truncckpt"))
  data = os.path.join(trunc, f"{latest}.data-00000-of-00001")
  with open(data, "r+b") as out:
    out.truncate(os.path.getsize(data) // 2)
  _write(os.path.join(_copy_model(model_dir, os.path.join(f, "model_badindex")),
                      f"{latest}.index"), b"garbage")
  _write(os.path.join(_copy_model(model_dir, os.path.join(f, "model_badstate")), "checkpoint"),
         'model_checkpoint_path: "model.ckpt-99"\n')
  _write(os.path.join(_copy_model(model_dir, os.path.join(f, "model_garbstate")), "checkpoint"),
         open(os.path.join(f, "photo.jpg"), "rb").read())
  for name, text in (("badconfig", '{"backbone": {"han'), ("emptyconfig", ""), ("listconfig", "[1, 2]")):
    _write(os.path.join(_copy_model(model_dir, os.path.join(f, f"model_{name}")), "config.json"), text)
  dirconfig = _copy_model(model_dir, os.path.join(f, "model_dirconfig"))
  os.remove(os.path.join(dirconfig, "config.json"))
  os.makedirs(os.path.join(dirconfig, "config.json"))


def _make_bad_exports(f: str, export_dir: str) -> None:
  import glob  # pylint: disable=import-outside-toplevel
  version = sorted(os.listdir(export_dir))[-1]

  def copy(name):
    shutil.copytree(export_dir, os.path.join(f, name))
    return os.path.join(f, name, version)

  pb = os.path.join(copy("exp_truncpb"), "saved_model.pb")
  with open(pb, "r+b") as out:
    out.truncate(os.path.getsize(pb) // 2)
  open(os.path.join(copy("exp_emptypb"), "saved_model.pb"), "wb").close()
  shutil.copy(os.path.join(f, "photo.jpg"), os.path.join(copy("exp_jpegpb"), "saved_model.pb"))
  shutil.rmtree(os.path.join(copy("exp_novars"), "variables"))
  shard = glob.glob(os.path.join(copy("exp_truncvars"), "variables", "*.data*"))[0]
  with open(shard, "r+b") as out:
    out.truncate(os.path.getsize(shard) // 2)
  temp = os.path.join(f, "exp_onlytemp", "temp-1999999999")
  os.makedirs(temp)
  shutil.copy(os.path.join(export_dir, version, "saved_model.pb"), temp)
  copy("exp_emptyver")
  os.makedirs(os.path.join(f, "exp_emptyver", "1999999999"))  # newer, half-written


def _make_image_folders(f: str, images: str, jpg: str, np, Image) -> None:  # noqa: N803
  bad = os.path.join(f, "imgs_bad")
  shutil.copytree(images, bad)
  rng = np.random.RandomState(0)
  pixels = (rng.rand(16, 16, 3) * 255).astype(np.uint8)
  _write(os.path.join(bad, "red", "zero.jpg"), b"")
  _write(os.path.join(bad, "red", "trunc.jpg"), open(jpg, "rb").read()[:200])
  _write(os.path.join(bad, "green", "text.jpg"), "this is not an image\n")
  Image.fromarray(pixels).convert("CMYK").save(os.path.join(bad, "green", "cmyk.jpg"), "JPEG")
  Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 200).save(
      os.path.join(bad, "blue", "sixteen.png"))
  Image.fromarray(pixels).convert("RGBA").save(os.path.join(bad, "blue", "rgba.png"))
  Image.fromarray(pixels).convert("P").save(os.path.join(bad, "blue", "palette.png"))
  os.makedirs(os.path.join(bad, "red", "nested", "deeper"))
  Image.fromarray(pixels).save(os.path.join(bad, "red", "nested", "deeper", "n1.png"))
  os.symlink(os.path.join(f, "nothing"), os.path.join(bad, "red", "broken.png"))
  os.mkfifo(os.path.join(bad, "green", "fifo.png"))  # reading it would block forever
  _write(os.path.join(bad, "notes.txt"), "not in a class folder\n")
  for name in ("a", "b"):
    os.makedirs(os.path.join(f, "imgs_allbad", name))
    _write(os.path.join(f, "imgs_allbad", name, "x.jpg"), b"")
  os.makedirs(os.path.join(f, "imgs_flat"))
  shutil.copy(jpg, os.path.join(f, "imgs_flat", "a.jpg"))
  for name in ("red", "blue"):
    os.makedirs(os.path.join(f, "imgs_noimg", name))
    _write(os.path.join(f, "imgs_noimg", name, "a.txt"), "x")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_data, tiny_backbone):
  """A trained model_dir, its export, and every wrong input, made by the real scripts."""
  from conftest import run_cli  # pylint: disable=import-outside-toplevel
  root = str(tmp_path_factory.mktemp("bad_inputs"))
  model_dir, export_dir = os.path.join(root, "model"), os.path.join(root, "export")
  trained = run_cli("et-train", f"--backbone={tiny_backbone['h5']}",
                    f"--train_data={tiny_data['train']}", f"--eval_data={tiny_data['eval']}",
                    f"--model_dir={model_dir}",
                    "--freeze=none", "--lr_values=0.05", "--batch_size=8", "--max_steps=4",
                    "--save_checkpoints_steps=4", "--seed=1")
  assert trained.returncode == 0, trained.stderr[-3000:]
  exported = run_cli("et-export", f"--model_dir={model_dir}", f"--export_dir={export_dir}")
  assert exported.returncode == 0, exported.stderr[-3000:]
  images = os.path.join(root, "images")
  shutil.copytree(tiny_data["images"], images)
  bad = _make_bad_files(root, model_dir, export_dir, tiny_data)
  os.makedirs(os.path.join(root, "out"))
  return {"M": model_dir, "X": export_dir, "F": bad, "D": tiny_data["eval"], "I": images,
          "O": os.path.join(root, "out"), "R": os.path.join(root, "ro"), "root": root}


def _inputs(args, world):
  """The existing paths a case's flags name (watched for changes)."""
  out = []
  for arg in args:
    value = arg.split("=", 1)[-1]
    if (os.path.lexists(value) and not value.startswith(world["O"]) and
        not value.endswith("/model_copy") and  # et-evaluate writes model_dir/eval/
        not value.startswith(world["R"] + "/out")):
      out.append(value)
  return out


def _run_batch(world, cases, name):
  specs = []
  for case_id, script, args, _, _ in cases:
    argv = [script] + [a.format(**world) for a in args]
    watch = sorted({world["M"], world["X"], world["I"], *_inputs(argv[1:], world)})
    specs.append({"id": case_id, "argv": argv, "watch": watch})
  cases_path = os.path.join(world["root"], f"{name}.json")
  results_path = os.path.join(world["root"], f"{name}-results.json")
  with open(cases_path, "w", encoding="utf-8") as f:
    json.dump(specs, f)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  done = subprocess.run([sys.executable, os.path.abspath(__file__), cases_path, results_path],
                        cwd=world["root"], env=env, capture_output=True, text=True,
                        timeout=CASE_TIMEOUT * len(cases) + 120, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(results_path, encoding="utf-8") as f:
    return {r["id"]: r for r in json.load(f)}


@pytest.fixture(scope="module")
def results(world):
  return _run_batch(world, CASES, "cases")


@pytest.fixture(scope="module")
def read_only_results(world):
  ro = world["R"]
  _copy_model(world["M"], os.path.join(ro, "model"))
  os.makedirs(os.path.join(ro, "out"))
  os.makedirs(os.path.join(ro, "export"))
  with fault_tools.read_only_bind(ro):
    yield _run_batch(world, READ_ONLY_CASES, "read_only")


def check(result, script, expected, wants):
  """The contract: exit code, one error line last on stderr, nothing changed."""
  stderr = result["stderr"]
  detail = f"rc={result['rc']}\nstderr:\n{stderr[-3000:]}\nstdout:\n{result['stdout'][-1500:]}"
  assert "Traceback" not in stderr, detail
  assert result["changed"] == [], f"changed: {result['changed']}\n{detail}"
  lines = [l for l in stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith(f"{script}: error:")]
  if expected == ERR:
    assert result["rc"] == 1, detail
    assert len(errors) == 1 and lines[-1] == errors[0], detail
    for want in wants:
      assert want.lower() in errors[0].lower(), f"{want!r} not in {errors[0]!r}"
  else:
    assert result["rc"] == 0 and not errors, detail
    for want in wants:
      assert want in result["stdout"], f"{want!r} not in stdout\n{detail}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(results, case):
  case_id, script, _, expected, wants = case
  check(results[case_id], script, expected, wants)


@pytest.mark.parametrize("case", READ_ONLY_CASES, ids=[c[0] for c in READ_ONLY_CASES])
def test_read_only_output(read_only_results, case):
  case_id, script, _, expected, wants = case
  check(read_only_results[case_id], script, expected, wants)


def test_skipped_images_are_listed_in_the_report(results, world):
  with open(os.path.join(world["O"], "pp_bad", "prepare_report.json"), encoding="utf-8") as f:
    report = json.load(f)
  bad = {e["path"] for e in report["bad_files"]}
  ignored = {e["path"]: e["reason"] for e in report["ignored_files"]}
  assert bad == {"green/text.jpg", "red/trunc.jpg", "red/zero.jpg"}
  assert "not a regular file" in ignored["green/fifo.png"]
  assert "red/broken.png" in ignored and "notes.txt" in ignored
  assert report["conversions"]["converted from JPEG CMYK"] == 1
  assert report["conversions"]["converted from PNG RGBA"] == 1
  assert report["examples"]["train"] + report["examples"]["validation"] == 18 + 5  # + nested


def test_bad_predict_rows_name_the_file(results, world):
  import csv  # pylint: disable=import-outside-toplevel
  with open(os.path.join(world["O"], "pr_bad.csv"), encoding="utf-8") as f:
    rows = {os.path.relpath(r["path"], world["F"]): r for r in csv.DictReader(f)}
  assert rows["imgs_bad/green/fifo.png"]["error"].startswith("not a regular file")
  assert rows["imgs_bad/red/zero.jpg"]["error"]
  assert rows["imgs_bad/green/text.jpg"]["error"]
  assert rows["imgs_bad/blue/rgba.png"]["error"] == "" and rows["imgs_bad/blue/rgba.png"]["class"]
  with open(os.path.join(world["O"], "pr_trunc.csv"), encoding="utf-8") as f:
    trunc = list(csv.DictReader(f))
  assert [r["error"] for r in trunc[:-1]] == [""] * (len(trunc) - 1)
  assert "truncated" in trunc[-1]["error"]


@pytest.mark.parametrize("script,args,want", [
    ("et-predict", ["--export_dir={X}", "--predict_data={F}/fifo", "--output={O}/real.csv"],
     "is not a regular file"),
    ("et-inspect-export", ["--export_dir={F}/exp_truncpb"], "not a readable SavedModel"),
    ("et-evaluate", ["--model_dir={F}/model_listconfig"], "JSON list"),
], ids=["predict_fifo", "inspect_truncated_pb", "evaluate_list_config"])
def test_installed_console_script_agrees(world, script, args, want):
  before = digest(world["F"])
  done = subprocess.run([fault_tools.console_script(script)] + [a.format(**world) for a in args],
                        cwd=world["root"], capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=False)
  lines = [l for l in done.stderr.splitlines() if l.strip()]
  assert done.returncode == 1, done.stderr[-3000:]
  assert "Traceback" not in done.stderr
  assert lines[-1].startswith(f"{script}: error:") and want in lines[-1], lines[-1]
  assert digest(world["F"]) == before
