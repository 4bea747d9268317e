"""Fault injection for the preemption tests: stop this process at a named point.

`FASTNTK_KILL_AT=<point>` makes `maybe_kill(<point>)` kill the process with SIGKILL — no
cleanup, no finally blocks, exactly like a preempted batch job. Points are named
"<stage>:<unit>", e.g. "seed0/full:epoch3" or "seed0/fastntk:gram_retain_chunk1".
`raise_at(<point>)` stops the run in-process instead, by raising `Killed` (a BaseException:
no handler of the package catches it; finally blocks do run), so one test process can stop
and resume a run at every point. Outside the tests, `maybe_kill` does nothing.
"""

import contextlib
import os
import signal
from typing import Optional

ENV = "FASTNTK_KILL_AT"
_RAISE_AT: list = [None]


class Killed(BaseException):
  """The run was stopped at a fault-injection point (`raise_at`)."""


def maybe_kill(point: str) -> None:
  if os.environ.get(ENV) == point:
    os.kill(os.getpid(), signal.SIGKILL)
  if _RAISE_AT[0] == point:
    raise Killed(point)


@contextlib.contextmanager
def raise_at(point: Optional[str]):
  """Within the block, `maybe_kill(point)` raises `Killed`."""
  before, _RAISE_AT[0] = _RAISE_AT[0], point
  try:
    yield
  finally:
    _RAISE_AT[0] = before
