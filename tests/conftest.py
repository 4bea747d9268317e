"""Suite-wide fixtures and guards.

Two tiers. The unit tier (`python -m pytest -q -m "not slow" tests`) checks the math, the
API, validation and I/O against independent computations, in minutes. The end-to-end tier
(`-m slow`) runs whole experiments: the tiny run every reading test shares (`tiny_run`), the
CLI, kill and resume, every config on mock data. The README's test command runs both.

Guard: no test may leave JAX's global 64-bit mode changed for the tests after it (a leak
made every later "float64 without x64 is refused" test pass vacuously or fail depending on
test order).
"""

import os
import shutil
import tempfile

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.py")

# The deletion log's signing key (fastntk_jax.audit): one test key for the suite, never the
# user's (~/.config/fastntk_jax). Subprocesses inherit it.
os.environ.setdefault("FASTNTK_AUDIT_KEY", os.path.join(
    tempfile.gettempdir(), f"fastntk_jax_test_{os.getuid()}", "audit_ed25519.pem"))


@pytest.fixture(autouse=True)
def _x64_mode_is_left_as_found():
  before = bool(jax.config.read("jax_enable_x64"))
  yield
  after = bool(jax.config.read("jax_enable_x64"))
  if after != before:
    jax.config.update("jax_enable_x64", before)  # keep the rest of the suite meaningful
    pytest.fail(f"this test left jax_enable_x64={after} (it was {before} before the test)")


def tiny_config(arg: str = "tiny"):
  """The embedded default's config in its tiny mode (`configs/default.py:<arg>`)."""
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_config_file(f"{DEFAULT}:{arg}")


def shared_tiny_config():
  """The shared run's config: `:tiny` (linearised, float64 closed form) over seeds 0 and 1,
  with a KLoM population of 2 + 2 seeds and every method plug-in of the default."""
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.seeds = (0, 1)
    cfg.eval.population_seeds = 3
    cfg.methods = config_lib.DEFAULT_METHODS  # every method the package has
  return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(workdir, results) of `shared_tiny_config`, run once for the whole test session: under
  pytest-xdist the first worker that needs it makes it in the folder the workers share, the
  others wait on a file lock and read it back (every stage restored). For tests that only
  read its outputs: copy it (`copy_run`) to change anything."""
  import fcntl  # pylint: disable=g-import-not-at-top
  from fastntk_jax.experiment import run as run_lib  # pylint: disable=g-import-not-at-top
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    shared = shared.parent  # the workers' common base folder
  workdir = str(shared / "tiny_run")
  with open(str(shared / "tiny_run.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      return workdir, run_lib.run(shared_tiny_config(), workdir, show_progress=False)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def copy_run(run, destination) -> str:
  """A copy of a run's workdir, to tamper with or resume."""
  dst = str(destination)
  shutil.copytree(run[0], dst)
  return dst
