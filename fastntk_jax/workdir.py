"""Atomic files and the workdir's ownership by one config."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` via a temp file in the same folder + rename (never half-written)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str, value: Any) -> None:
  atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True, default=_jsonable) + "\n")


def atomic_write_bytes(path: str, data: bytes) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  with os.fdopen(fd, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _jsonable(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  if isinstance(x, (set, tuple)):
    return list(x)
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def config_dict(cfg: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON-compatible data (the identity of a workdir)."""
  return json.loads(cfg.to_json_best_effort(sort_keys=True))


class WorkdirConflictError(ValueError):
  """The workdir holds results of a different config."""


def claim(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """Records `cfg` in `workdir`, or checks that the one recorded there is the same.

  Raises:
    WorkdirConflictError: the workdir was started with another config; results are never
      mixed (the message names the differing fields).
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  mine = config_dict(cfg)
  if os.path.exists(path):
    with open(path) as f:
      theirs = json.load(f)
    if theirs != mine:
      diffs = _diff(theirs, mine)
      raise WorkdirConflictError(
          f"workdir {workdir!r} holds results of a different config (differs in: "
          f"{', '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}); use a new --workdir "
          "or delete that one")
    return
  atomic_write_json(path, mine)


def _diff(a, b, prefix="") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [prefix.rstrip(".")]
