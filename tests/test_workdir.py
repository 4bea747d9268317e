"""Periodic checkpoints written in the background (`workdir.BackgroundSaver`): overlap, order,
and no lost or hidden write."""

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
