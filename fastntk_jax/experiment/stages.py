"""Resumable stages: each result is written atomically when computed and read back instead
of recomputed, so a killed run restarted with the same command continues where it stopped
and ends with the same numbers."""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable

import jax
import numpy as np

from fastntk_jax import workdir as wd
from fastntk_jax.models import checkpoints

PyTree = Any


def array_stage(path: str, target: PyTree, compute: Callable[[], PyTree]) -> PyTree:
  """Restores the checkpoint at `path` (a folder, complete once it exists) into the structure
  of `target`, or computes the pytree, saves it and removes the stage's periodic checkpoints
  (`path`.partial, `path`.<k>.partial, `path`_gram_*.state). Host (numpy) arrays either
  way: restored ones are not committed to one device, which a run on a mesh could not mix
  with its replicated arrays in one jitted call."""
  if os.path.isdir(path):
    return jax.tree_util.tree_map(np.asarray, checkpoints.restore_checkpoint(path, target))
  value = jax.tree_util.tree_map(np.asarray, compute())
  checkpoints.save_checkpoint(path, value, overwrite=True)
  for leftover in ([path + ".partial"] + glob.glob(glob.escape(path) + ".*.partial")
                   + glob.glob(glob.escape(path) + "_gram_*.state")):
    if os.path.exists(leftover):
      os.remove(leftover)
  return value


def json_stage(path: str, compute: Callable[[], dict]) -> dict:
  """Reads the JSON at `path`, or computes the dict and writes it atomically."""
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  value = compute()
  wd.atomic_write_json(path, value)
  return value


def read_json(path: str, default=None):
  """The JSON at `path`, or `default` when there is none."""
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)
