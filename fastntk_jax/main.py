"""Command line: `python -m fastntk_jax.main [--config=configs/x.py[:arg]] [--workdir=DIR]`.

Intentionally thin: flags, then `pipeline.run(config, workdir)`. Without --config it runs
the embedded default (scikit-learn's digits, no downloads): `configs/default.py`.
"""

import logging
import os
import sys

from absl import app
from absl import flags

_CONFIG = flags.DEFINE_string(
    "config", None, "Config file (configs/*.py, optionally 'file.py:arg'); default: the "
    "embedded digits run (configs/default.py).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir_default",
                               "Output folder; rerunning the same command resumes.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def _default_config_path() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  for candidate in (os.path.join(here, "..", "configs", "default.py"),
                    os.path.join(here, "default_config.py")):
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError("configs/default.py not found next to the package")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Our own progress at INFO; library chatter (orbax, absl) stays at WARNING.
  logging.getLogger("fastntk_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  # Imported here so that --help is instant and flag errors come before JAX starts.
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from fastntk_jax import pipeline  # pylint: disable=g-import-not-at-top
  try:
    cfg = config_lib.load_config_file(_CONFIG.value or _default_config_path())
    results = pipeline.run(cfg, _WORKDIR.value, show_progress=_PROGRESS.value)
  except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
    # Bad input: one clear line and a non-zero exit, never a traceback.
    print(f"fastntk_jax: error: {e}", file=sys.stderr)
    sys.exit(2)
  from fastntk_jax import report  # pylint: disable=g-import-not-at-top
  print(report.markdown(results))
  print(f"Wrote {os.path.join(_WORKDIR.value, 'results.md')} and plots.")


if __name__ == "__main__":
  app.run(main)
