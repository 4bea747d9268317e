"""`enable_x64()` context manager on every JAX this project runs on.

jax 0.5 (our pinned version) has `jax.experimental.enable_x64`; jax >= 0.10 (e.g. the GPU
image's 0.11) removed it in favour of `jax.enable_x64(True)`.
"""

import contextlib

import jax

try:
  from jax.experimental import enable_x64  # pylint: disable=unused-import
except ImportError:  # jax >= 0.10

  @contextlib.contextmanager
  def enable_x64(new_val: bool = True):
    with jax.enable_x64(new_val):
      yield
