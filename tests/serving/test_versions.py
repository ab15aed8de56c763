"""TF Serving layout: version numbers, atomic publish, pruning, stale temps."""
import os
import time

import pytest

from estimator_transfer.errors import ConfigError
from estimator_transfer.serving import versions


def _version(root, name, complete=True):
  path = root / name
  path.mkdir()
  if complete:
    (path / "saved_model.pb").write_bytes(b"")
  return str(path)


def test_new_version_is_above_complete_and_temporary_ones(tmp_path):
  future = int(time.time()) + 1000
  _version(tmp_path, str(future))
  (tmp_path / f"temp-{future + 5}-abcd1234").mkdir()  # an export under way
  (tmp_path / "notes").mkdir()
  assert versions.new_version(str(tmp_path)) == future + 6


def test_list_and_latest_skip_incomplete_and_non_numeric(tmp_path):
  _version(tmp_path, "10")
  _version(tmp_path, "9")
  _version(tmp_path, "11", complete=False)
  _version(tmp_path, "temp-12-00000000")
  assert versions.list_versions(str(tmp_path)) == [str(tmp_path / "9"), str(tmp_path / "10")]
  assert versions.latest_version(str(tmp_path)) == str(tmp_path / "10")
  assert versions.latest_version(str(tmp_path / "9")) == str(tmp_path / "9")
  assert versions.list_versions(str(tmp_path / "missing")) == []
  with pytest.raises(ConfigError, match="has no version directories"):
    versions.latest_version(str(tmp_path / "11"))


def test_publish_renames_when_complete_and_removes_temp_on_failure(tmp_path):
  export_dir = str(tmp_path / "serving")

  def write(temp):
    assert os.path.basename(temp).startswith(versions.TEMP_PREFIX)
    os.makedirs(temp)
    open(os.path.join(temp, "saved_model.pb"), "wb").close()

  final = versions.publish_version(export_dir, write)
  assert os.listdir(export_dir) == [os.path.basename(final)]

  def fail(temp):
    write(temp)
    raise ValueError("no")

  with pytest.raises(ValueError, match="no"):
    versions.publish_version(export_dir, fail)
  assert os.listdir(export_dir) == [os.path.basename(final)]


def test_stale_temps_are_removed_fresh_ones_kept(tmp_path):
  stale = tmp_path / "temp-1-aaaaaaaa"
  fresh = tmp_path / "temp-2-bbbbbbbb"
  stale.mkdir()
  fresh.mkdir()
  old = time.time() - 2 * 3600  # older than an hour: the export that made it is dead
  os.utime(stale, (old, old))
  versions.remove_stale_temps(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == [fresh.name]


@pytest.mark.parametrize("keep, left", [(2, ["3", "4"]), (0, ["1", "2", "3", "4"])])
def test_prune_keeps_the_newest(tmp_path, keep, left):
  for v in "1234":
    _version(tmp_path, v)
  versions.prune_versions(str(tmp_path), keep)
  assert sorted(os.listdir(tmp_path)) == left
