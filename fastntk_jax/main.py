"""Command line: `python -m fastntk_jax.main [--config=configs/x.py[:arg]] [--workdir=DIR]`.

Intentionally thin: flags, then `pipeline.run(config, workdir)`. Without --config it runs
the embedded default (scikit-learn's digits, no downloads): `configs/default.py`.
Any config field can be overridden from the command line, e.g.
`--config.data.images_per_class=50 --config.seeds='(0,1)'` (ml_collections config_flags).
"""

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags


def _default_config_path() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  return os.path.normpath(os.path.join(here, "..", "configs", "default.py"))


_CONFIG = config_flags.DEFINE_config_file(
    "config", _default_config_path(),
    "Config file (configs/*.py, optionally 'file.py:arg'); default: the embedded digits run "
    "(configs/default.py). Fields can be overridden with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir_default",
                               "Output folder; rerunning the same command resumes.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Our own progress at INFO; library chatter (orbax, absl) stays at WARNING.
  logging.getLogger("fastntk_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  # Imported here so that --help is instant and flag errors come before JAX starts.
  from fastntk_jax import pipeline  # pylint: disable=g-import-not-at-top
  from fastntk_jax import sharding  # pylint: disable=g-import-not-at-top
  try:
    # Before anything starts the JAX backend: joins the processes of a multi-host launch
    # (FASTNTK_DISTRIBUTED=1, set by launch/*.sh; a no-op for a single process).
    sharding.maybe_initialize_distributed()
    try:
      cfg = _CONFIG.value  # config_flags loads the file and applies overrides lazily
    except AttributeError as e:  # a misspelt --config.field override
      raise ValueError(f"unknown config field in an override: {e}") from None
    results = pipeline.run(cfg, _WORKDIR.value, show_progress=_PROGRESS.value)
  except (ValueError, TypeError, KeyError, OSError) as e:
    # Bad input: one clear line and a non-zero exit, never a traceback.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f"fastntk_jax: error: {' '.join(lines)}", file=sys.stderr)
    sys.exit(2)
  from fastntk_jax import report  # pylint: disable=g-import-not-at-top
  print(report.markdown(results))
  print(f"Wrote {os.path.join(_WORKDIR.value, 'results.md')} and plots.")


def _parse_flags(argv):
  """absl's parsing, but a bad config file/override is one line and exit 2, no traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    lines = [l.strip() for l in str(e).replace("\\n", "\n").splitlines() if l.strip()]
    # config_flags embeds the config file's own traceback: its last line is the cause.
    message = lines[-1] if any("Traceback" in l for l in lines) else " ".join(lines)
    print(f"fastntk_jax: error: bad flags or config: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
