"""Fault injection for the preemption tests: SIGKILL this process at a named point.

`FASTNTK_KILL_AT=<point>` makes `maybe_kill(<point>)` kill the process with SIGKILL — no
cleanup, no finally blocks, exactly like a preempted batch job. Points are named
"<stage>:<unit>", e.g. "seed0/full:epoch3" or "seed0/fastntk:gram_retain_chunk1".
Unset (always, outside the tests), `maybe_kill` does nothing.
"""

import os
import signal

ENV = "FASTNTK_KILL_AT"


def maybe_kill(point: str) -> None:
  if os.environ.get(ENV) == point:
    os.kill(os.getpid(), signal.SIGKILL)
