"""et-train refuses a bad setting or path in one sentence, with model_dir untouched.

Each case runs the REAL et-train console script in a subprocess and checks:
exit code 1, one `et-train: error:` sentence naming the thing and the fix, no
traceback, and a model_dir that is byte-for-byte what it was (every file
hashed before and after, `fault_tools.tree_digest`).
"""
import os
import shutil
import subprocess

import pytest

from faults import fault_tools

read_only = fault_tools.read_only


def _et(tool, *args, timeout=240):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([fault_tools.console_script(tool), *args], capture_output=True,
                        text=True, timeout=timeout, env=env)


def _train_args(tiny_data, tiny_backbone, model_dir, max_steps=2):
  return [f"--model_dir={model_dir}", f"--backbone={tiny_backbone['h5']}",
          f"--train_data={tiny_data['train']}", "--batch_size=8", "--freeze=none",
          f"--max_steps={max_steps}", "--save_checkpoints_steps=2", "--shuffle_buffer=16"]


def assert_user_error(done, *words):
  """Exit 1, one error line holding every word, no traceback."""
  assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("et-train: error:")]
  assert len(errors) == 1, done.stderr[-3000:]
  for word in words:
    assert word in errors[0], errors[0]
  return errors[0]


@pytest.fixture(scope="module")
def trained(tiny_data, tiny_backbone, tmp_path_factory):
  """A model_dir trained to step 2 (copied per test, never changed)."""
  model_dir = str(tmp_path_factory.mktemp("trained") / "model")
  done = _et("et-train", *_train_args(tiny_data, tiny_backbone, model_dir))
  assert done.returncode == 0, done.stderr[-3000:]
  return model_dir


@pytest.fixture
def model_dir(trained, tmp_path):
  path = str(tmp_path / "model")
  shutil.copytree(trained, path)
  return path


@pytest.mark.parametrize("spec,words", [
    ("until:no_such_layer", ("--freeze=until:no_such_layer", "names no layer")),
    ("regex:^zzz_nothing$", ("--freeze=regex:^zzz_nothing$", "matches no layer")),
])
def test_rejected_freeze_never_reaches_model_dir(model_dir, tmp_path, spec, words):
  before = fault_tools.tree_files(model_dir)
  done = _et("et-train", f"--model_dir={model_dir}", f"--freeze={spec}", "--max_steps=4")
  assert_user_error(done, *words)
  assert fault_tools.tree_files(model_dir) == before
  # The saved settings still work: plain et-export and et-train need no flag.
  export_dir = str(tmp_path / "export")
  done = _et("et-export", f"--model_dir={model_dir}", f"--export_dir={export_dir}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert os.listdir(export_dir), "et-export published nothing"
  done = _et("et-train", f"--model_dir={model_dir}", "--max_steps=4")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "trained to step 4" in done.stdout, done.stdout


@pytest.mark.parametrize("existing", [False, True])
def test_rejected_freeze_of_a_new_run_leaves_model_dir_empty(tiny_data, tiny_backbone,
                                                             tmp_path, existing):
  # A new run skips the scratch build: the real graph build refuses the
  # setting, and what the run had written is removed again (an existing empty
  # directory stays, empty).
  model_dir = str(tmp_path / "model")
  if existing:
    os.makedirs(model_dir)
  done = _et("et-train", *_train_args(tiny_data, tiny_backbone, model_dir),
             "--freeze=until:no_such_layer")
  assert_user_error(done, "--freeze=until:no_such_layer", "names no layer")
  assert fault_tools.tree_files(model_dir) == {}
  # The corrected command then trains there from scratch.
  done = _et("et-train", *_train_args(tiny_data, tiny_backbone, model_dir))
  assert done.returncode == 0, done.stderr[-3000:]
  assert "trained to step 2" in done.stdout, done.stdout


@pytest.mark.parametrize("data,words", [
    ("/nonexistent/x*", ("--train_data=/nonexistent/x* matches no file", "check the path")),
    ("{jpeg}", ("is a JPEG image, not a TFRecord file",)),
])
def test_bad_train_data_is_named_before_the_classes(tiny_backbone, tmp_path, data, words):
  jpeg = tmp_path / "photo.jpg"
  jpeg.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 200)
  model_dir = str(tmp_path / "model")
  data = data.format(jpeg=jpeg)
  done = _et("et-train", f"--model_dir={model_dir}", f"--backbone={tiny_backbone['h5']}",
             f"--train_data={data}")
  line = assert_user_error(done, *words)
  assert "classes are unknown" not in line
  assert fault_tools.tree_files(model_dir) == {}


def test_read_only_model_dir_is_one_sentence(model_dir, read_only):
  before = fault_tools.tree_files(model_dir)
  read_only(model_dir)
  done = _et("et-train", f"--model_dir={model_dir}", "--max_steps=4")
  assert_user_error(done, f"cannot write to {model_dir}", "read-only file system",
                    "make it writable")
  assert fault_tools.tree_files(model_dir) == before
