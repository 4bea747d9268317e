"""Atomic files (readable, never half-written) and periodic checkpoints written in the
background (`workdir.BackgroundSaver`): overlap, order,
and no lost or hidden write."""

import os
import stat
import threading
import time

import numpy as np
import pytest

from fastntk_jax import workdir as wd


def test_submit_returns_while_the_write_runs_and_files_advance_in_order(tmp_path, monkeypatch):
  real = wd.save_state
  release = threading.Event()
  order = []

  def slow_save(path, tree):
    release.wait(5)  # held until the caller has gone on
    real(path, tree)
    order.append(int(tree["next"]))

  monkeypatch.setattr(wd, "save_state", slow_save)
  path = str(tmp_path / "chunk.state")
  with wd.BackgroundSaver() as saver:
    start = time.perf_counter()
    saver.submit(path, {"g": np.ones((3, 3)), "next": 1})
    assert time.perf_counter() - start < 1.0 and not order  # not written yet: overlapped
    release.set()
    saver.submit(path, {"g": 2 * np.ones((3, 3)), "next": 2})  # waits for the first
    assert order == [1]
  assert order == [1, 2]  # the exit waited for the last write
  got = wd.load_state(path, {"g": np.zeros((3, 3)), "next": 0})
  np.testing.assert_array_equal(got["g"], 2 * np.ones((3, 3)))
  assert saver.wait_seconds > 0


def test_a_failed_write_raises_from_the_next_submit_or_the_exit(tmp_path, monkeypatch):
  def broken(path, tree):
    raise OSError("disk full")

  monkeypatch.setattr(wd, "save_state", broken)
  with pytest.raises(OSError, match="disk full"):
    with wd.BackgroundSaver() as saver:
      saver.submit(str(tmp_path / "a"), {"x": 1})
  saver = wd.BackgroundSaver()
  saver.submit(str(tmp_path / "a"), {"x": 1})
  with pytest.raises(OSError, match="disk full"):
    saver.submit(str(tmp_path / "a"), {"x": 2})


def test_the_last_write_finishes_when_the_loop_crashes(tmp_path):
  path = str(tmp_path / "chunk.state")
  with pytest.raises(RuntimeError, match="loop died"):
    with wd.BackgroundSaver() as saver:
      saver.submit(path, {"next": np.asarray(7)})
      raise RuntimeError("loop died")
  assert int(wd.load_state(path, {"next": np.asarray(0)})["next"]) == 7


def test_atomic_files_are_as_readable_as_any_file_the_user_writes(tmp_path):
  old = os.umask(0o022)
  try:
    wd.atomic_write_text(str(tmp_path / "results.md"), "ok\n")
    wd.atomic_write_bytes(str(tmp_path / "state.bin"), b"\x00")
    (tmp_path / "plain.txt").write_text("")
  finally:
    os.umask(old)
  plain = stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
  assert plain == 0o644
  for name in ("results.md", "state.bin"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == plain, name
  assert (tmp_path / "results.md").read_text() == "ok\n"


def test_a_failed_atomic_write_leaves_neither_the_file_nor_a_temporary(tmp_path, monkeypatch):
  def no_room(*args):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(wd.os, "fsync", no_room)
  with pytest.raises(OSError, match="No space"):
    wd.atomic_write_text(str(tmp_path / "results.json"), "{}")
  assert os.listdir(tmp_path) == []


def test_a_workdir_started_before_a_field_existed_resumes_when_it_is_at_its_default(tmp_path):
  """A config field added after a workdir was started (absent from its config.json) changes
  nothing there when the run leaves it at its default; set otherwise, it is a conflict that
  names it. Fields the workdir holds are compared as before."""
  import json  # pylint: disable=g-import-not-at-top
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg, defaults = config_lib.base_config(), config_lib.base_config()
  workdir = str(tmp_path / "w")
  wd.claim(workdir, cfg, defaults)
  path = os.path.join(workdir, wd.CONFIG_FILE)
  with open(path) as f:
    stored = json.load(f)
  del stored["pretrain"]["batch_stats"]  # as written before the field existed
  with open(path, "w") as f:
    json.dump(stored, f)
  wd.claim(workdir, cfg, defaults)
  with open(path) as f:  # the field is recorded at the value the resumed run used
    assert json.load(f)["pretrain"]["batch_stats"] == "running"
  changed = config_lib.base_config()
  changed.pretrain.batch_stats = "recompute"  # a later version changing that default
  with pytest.raises(wd.WorkdirConflictError, match="pretrain.batch_stats"):
    wd.claim(workdir, changed, changed)
  with open(path, "w") as f:  # as written before the field existed, again
    json.dump(stored, f)
  with pytest.raises(wd.WorkdirConflictError, match="pretrain.batch_stats"):
    wd.claim(workdir, cfg)  # without the defaults: every difference counts
  cfg.pretrain.batch_stats = "recompute"
  with pytest.raises(wd.WorkdirConflictError, match="pretrain.batch_stats"):
    wd.claim(workdir, cfg, defaults)
  cfg.pretrain.batch_stats = "running"
  cfg.unlearn.damping = 0.5
  with pytest.raises(wd.WorkdirConflictError, match="unlearn.damping"):
    wd.claim(workdir, cfg, defaults)
