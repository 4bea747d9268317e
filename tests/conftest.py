"""Suite-wide guard: no test may leave JAX's global 64-bit mode changed for the tests after it.

A leak once made every later "float64 without x64 is refused" test pass vacuously or fail
depending on test order (pipeline.run switched x64 on for good).
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def _x64_mode_is_left_as_found():
  before = bool(jax.config.read("jax_enable_x64"))
  yield
  after = bool(jax.config.read("jax_enable_x64"))
  if after != before:
    jax.config.update("jax_enable_x64", before)  # keep the rest of the suite meaningful
    pytest.fail(f"this test left jax_enable_x64={after} (it was {before} before the test)")
