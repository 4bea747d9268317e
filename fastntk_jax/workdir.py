"""Atomic files, and the workdir's ownership: by one config (`claim`), and by one running
process at a time (`hold`)."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Optional

import ml_collections

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
log = logging.getLogger(__name__)
_MAGIC = b"FASTNTK1"


def _file_mode() -> int:
  """The mode a plain `open` would give a new file (0o666 less the umask): results are as
  readable as any file the user writes, not private like mkstemp's 0o600."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temp file in the same folder + rename (never half-written;
  the temp file is removed on any failure)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
      os.fchmod(f.fileno(), _file_mode())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  """`atomic_write_bytes` of `text` (UTF-8)."""
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, value: Any) -> None:
  atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  if isinstance(x, (set, tuple)):
    return list(x)
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def config_dict(cfg: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON-compatible data (the identity of a workdir)."""
  return json.loads(cfg.to_json_best_effort(sort_keys=True))


def make(workdir: str) -> None:
  """Creates `workdir` (and its parents) if missing.

  Raises:
    ValueError: it names a file, or it cannot be created (the message says why).
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir!r} is a file, not a folder; name a folder")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--workdir {workdir!r} cannot be created: {e.strerror or e}") from None


class WorkdirConflictError(ValueError):
  """The workdir holds results of a different config."""


def _with_added_fields(theirs, mine, defaults):
  """`theirs` with every field it lacks taken from `mine` where `mine` holds that field's
  default (`defaults`): a field added to the config after the workdir was started, left at
  its default, changes nothing the workdir holds."""
  if not (isinstance(theirs, dict) and isinstance(mine, dict) and isinstance(defaults, dict)):
    return theirs
  out = dict(theirs)
  for k, v in mine.items():
    if k not in theirs:
      if k in defaults and defaults[k] == v:
        out[k] = v
    else:
      out[k] = _with_added_fields(theirs[k], v, defaults.get(k))
  return out


def claim(workdir: str, cfg: ml_collections.ConfigDict,
          defaults: Optional[ml_collections.ConfigDict] = None) -> None:
  """Records `cfg` in `workdir`, or checks that the one recorded there is the same: the same
  but for fields the recorded config lacks and `cfg` holds at their value in `defaults` (the
  base config: fields added since the workdir was started, at their defaults).

  Raises:
    WorkdirConflictError: the workdir was started with another config; results are never
      mixed (the message names the differing fields).
  """
  make(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  mine = config_dict(cfg)
  if os.path.exists(path):
    with open(path) as f:
      try:
        theirs = json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirConflictError(
            f"workdir {workdir!r}: its {CONFIG_FILE} is not a config ({e}); the folder was "
            "edited or is another program's: use a new --workdir") from None
    if not isinstance(theirs, dict):
      raise WorkdirConflictError(f"workdir {workdir!r}: its {CONFIG_FILE} holds a "
                                 f"{type(theirs).__name__}, not a config; use a new --workdir")
    if defaults is not None:
      filled = _with_added_fields(theirs, mine, config_dict(defaults))
      if filled == mine and filled != theirs:
        # Recorded, so that a later change of those defaults is a conflict, not a mix.
        atomic_write_json(path, filled)
      theirs = filled
    if theirs != mine:
      diffs = _diff(theirs, mine)
      raise WorkdirConflictError(
          f"workdir {workdir!r} holds results of a different config (differs in: "
          f"{', '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}); use a new --workdir "
          "or delete that one")
    return
  atomic_write_json(path, mine)


class WorkdirBusyError(ValueError):
  """Another running process holds the workdir."""


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      info = json.load(f)
    return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}"
  except (OSError, ValueError):
    return "a process that left no details"


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (OSError, ValueError, TypeError):
    return False
  return True


@contextlib.contextmanager
def hold(workdir: str, *, exclusive: bool = True):
  """Holds `workdir` for this process while the block runs: a second run on it is refused.

  The lock is an `fcntl.flock` on `<workdir>/.lock`, which records the holder's pid, host and
  start time; the kernel releases it when the holder exits or is killed, so the lock of a
  killed run is taken over by the next one. On a filesystem without flock (some NFS or
  Lustre mounts) the recorded pid decides: a holder on this host that is no longer running
  is taken over; one on another host is refused (remove `.lock` if it is gone).

  Args:
    exclusive: False for the processes of one multi-host run other than the first, which
      share the workdir by design and take no lock.

  Raises:
    WorkdirBusyError: another run holds it (the message names the holder).
  """
  if not exclusive:
    yield
    return
  import fcntl  # pylint: disable=g-import-not-at-top
  make(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  busy = lambda: WorkdirBusyError(
      f"workdir {workdir!r} is in use by another run ({_holder(path)}); wait for it to "
      "finish or use another --workdir")
  with open(path, "a+") as f:
    locked = False
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locked = True
    except BlockingIOError:
      raise busy() from None
    except OSError:  # no flock here: the recorded holder decides
      try:
        with open(path) as g:
          info = json.load(g)
      except (OSError, ValueError):
        info = {}
      if info and (info.get("host") != socket.gethostname() or _pid_alive(info.get("pid"))):
        raise busy() from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "since": datetime.datetime.now().isoformat(timespec="seconds")}))
    f.flush()
    try:
      yield
    finally:
      f.seek(0)
      f.truncate()
      f.flush()
      if locked:
        fcntl.flock(f, fcntl.LOCK_UN)


def _diff(a, b, prefix="") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [prefix.rstrip(".")]


def save_state(path: str, tree: Any) -> None:
  """Saves a pytree (arrays, optax states, ints) atomically with a SHA-256 checksum.

  Used for the periodic checkpoints inside long stages (training epochs, Gram chunks).
  """
  from flax import serialization  # pylint: disable=g-import-not-at-top
  payload = serialization.to_bytes(tree)
  atomic_write_bytes(path, _MAGIC + hashlib.sha256(payload).digest() + payload)


class BackgroundSaver:
  """`save_state` off the caller's thread, so a long loop's checkpoints overlap its compute.

  At most one write is in flight: `submit` first waits for the previous one (files advance
  in order; memory holds at most one state besides the caller's), then starts the next.
  Leaving the `with` block waits for the last write, also when the loop raised, so a crash
  loses no finished chunk; a failed write raises from the next `submit` or from the exit.
  Each write is atomic: a process killed mid-write leaves the previous complete file.

  Attributes:
    wait_seconds: time the caller spent blocked on writes (the part not overlapped).
  """

  def __init__(self):
    self._thread: Optional[threading.Thread] = None
    self._error: Optional[BaseException] = None
    self.wait_seconds = 0.0

  def submit(self, path: str, tree: Any, then: Optional[Callable[[], None]] = None) -> None:
    """Waits for the previous write, then writes `tree` to `path` in the background and
    calls `then` (e.g. a fault-injection point) once it is on disk."""
    self.wait()

    def write():
      try:
        save_state(path, tree)
        if then is not None:
          then()
      except BaseException as e:  # pylint: disable=broad-except
        self._error = e

    self._thread = threading.Thread(target=write, name=f"save {os.path.basename(path)}",
                                    daemon=True)
    self._thread.start()

  def wait(self) -> None:
    """Blocks until no write is in flight; raises the error of a failed one."""
    if self._thread is not None:
      start = time.perf_counter()
      self._thread.join()
      self.wait_seconds += time.perf_counter() - start
      self._thread = None
    if self._error is not None:
      error, self._error = self._error, None
      raise error

  def __enter__(self) -> "BackgroundSaver":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.wait()
    else:  # keep the loop's own error; still let the last write finish
      try:
        self.wait()
      except BaseException:  # pylint: disable=broad-except
        log.exception("a background checkpoint write failed as well")


def load_state(path: str, target: Any) -> Optional[Any]:
  """Restores a `save_state` file into the structure of `target`.

  Returns:
    The restored pytree, or None when there is no file, or when it fails verification
    (wrong header, checksum mismatch, undecodable): a periodic checkpoint that cannot be
    trusted is discarded with a warning and its stage restarts from the beginning, which
    gives the same final numbers.
  """
  from flax import serialization  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    blob = f.read()
  head, digest, payload = blob[:8], blob[8:40], blob[40:]
  if head != _MAGIC or hashlib.sha256(payload).digest() != digest:
    log.warning("discarding %s: failed checksum verification (truncated or corrupt)", path)
    return None
  try:
    return serialization.from_bytes(target, payload)
  except Exception as e:  # pylint: disable=broad-except
    log.warning("discarding %s: cannot be decoded into the expected structure (%r)", path, e)
    return None
