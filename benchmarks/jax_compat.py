"""pytest plugin for `benchmarks/gpu_check.sh`: runs jax-0.5-era tests on jax >= 0.10.

`tests/test_unlearn_exact.py` does `from jax.experimental import enable_x64`. That alias was
deprecated in jax 0.8 and removed in jax 0.10 (replaced by the `jax.enable_x64` context
manager), so on the GPU image (jax 0.11) the module would fail to import before any test runs.
Loaded with `pytest -p benchmarks.jax_compat`, this plugin restores the alias *only when it is
missing*, delegating to `jax.enable_x64`; on jax 0.5.x it does nothing. gpu_check.sh prints
whether it was needed. The lasting fix belongs in the tests (use `jax.enable_x64(True)` where
it exists, else `jax.experimental.enable_x64()`).
"""

from __future__ import annotations

import contextlib

import jax
import jax.experimental

NEEDED = not hasattr(jax.experimental, "enable_x64")

if NEEDED:

  @contextlib.contextmanager
  def _enable_x64(new_val: bool = True):
    """`jax.experimental.enable_x64` as it was: a context manager, True by default."""
    if hasattr(jax, "enable_x64"):
      with jax.enable_x64(new_val):
        yield
    else:  # pragma: no cover - neither API: fall back to the global flag
      old = jax.config.jax_enable_x64
      jax.config.update("jax_enable_x64", new_val)
      try:
        yield
      finally:
        jax.config.update("jax_enable_x64", old)

  jax.experimental.enable_x64 = _enable_x64


def pytest_report_header(config):  # pylint: disable=unused-argument
  return (f"benchmarks.jax_compat: jax {jax.__version__}; jax.experimental.enable_x64 "
          + ("was missing: shimmed onto jax.enable_x64" if NEEDED else "present: no shim"))
