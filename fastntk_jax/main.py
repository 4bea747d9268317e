"""Command line: `python -m fastntk_jax.main [--config=configs/x.py[:arg]] [--workdir=DIR]`.

Intentionally thin: flags, then `experiment.run.run(config, workdir)`. Without --config it
runs the embedded default (scikit-learn's digits, no downloads): `configs/default.py`.
Every config field can be overridden (`ml_collections.config_flags`), lists and tuples too:
  --config.data.images_per_class=50 --config.seeds='(0,1)' --config.data.forget_classes=3,4
  --config.methods='("fastntk","max_loss")' --config.model.options.widths='(4,8,8)'
`--dry_run` prints the resulting config as JSON and exits without starting JAX. Every bad
flag, config file or value is one line `fastntk_jax: error: ...` on stderr and exit code 2,
before any work (`fastntk_jax.cli`).
"""

import os

# Before anything imports jaxlib or TensorFlow (neural-tangents, TFDS): their C++ INFO and
# WARNING chatter (oneDNN notices, CUDA stubs on a CPU machine) stays off. A value set by the
# user wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from fastntk_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    cli.CONFIG_FLAG, cli.DEFAULT_CONFIG,
    "Config file (configs/*.py, optionally 'file.py:arg'); default: the embedded digits run "
    "(configs/default.py). Any field can be overridden with --config.a.b=value.",
    lock_config=True, sys_argv=cli.ARGV)
_WORKDIR = flags.DEFINE_string("workdir", "workdir_default",
                               "Output folder; rerunning the same command resumes.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Validate the config with its overrides, print it as JSON and exit "
    "(nothing is run or written; JAX is not started).")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]} (config fields are set with --config.a.b=value)")
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    cfg = config_lib.validate(_CONFIG.value)
  except (ValueError, TypeError, KeyError) as e:
    cli.fail(e)
  if not _WORKDIR.value.strip():
    cli.fail("--workdir is empty; name the output folder, e.g. --workdir=workdir_default")
  if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
    cli.fail(f"--workdir {_WORKDIR.value!r} is a file, not a folder; name a folder")
  if _DRY_RUN.value:
    from fastntk_jax.experiment import methods  # pylint: disable=g-import-not-at-top
    try:
      methods.checked_plugins(cfg)  # each plug-in's own block check
    except (ValueError, TypeError, KeyError) as e:
      cli.fail(e)
    print(cfg.to_json_best_effort(indent=2, sort_keys=True))
    return
  log = cli.start_logging()
  logging.getLogger("fastntk_jax").setLevel(logging.WARNING)  # INFO once the run is ready
  # Imported here so that --help and --dry_run are instant and flag errors come before JAX.
  from fastntk_jax import sharding  # pylint: disable=g-import-not-at-top
  from fastntk_jax.experiment import run as run_lib  # pylint: disable=g-import-not-at-top
  try:
    # Before anything starts the JAX backend: joins the processes of a multi-host launch
    # (FASTNTK_DISTRIBUTED=1, set by launch/*.sh; a no-op for a single process).
    sharding.maybe_initialize_distributed()
    if str(cfg.unlearn.kernel_impl).startswith("neural_tangents"):
      # Asked for explicitly: refused now (naming the stack that has it), not after training.
      from fastntk_jax import ntk  # pylint: disable=g-import-not-at-top
      ntk.import_neural_tangents()
    # Everything else that can refuse the run, before the log starts and the workdir exists:
    # a refusal stays one line.
    prepared = run_lib.prepare(cfg)
  except (ValueError, TypeError, KeyError, OSError) as e:
    cli.fail(cli.short_error(e))
  except ImportError as e:
    if "pip install" not in str(e):  # a broken install or a bug: keep the traceback
      raise
    cli.fail(e)  # an optional extra that this config needs (e.g. TFDS for CIFAR): names the fix

  def start_log():  # once this run holds the workdir: a refused workdir logs nothing
    logging.getLogger("fastntk_jax").setLevel(logging.INFO)
    log.info("config %s, workdir %s", " ".join(a for a in sys.argv[1:]
                                               if a.startswith("--config")), _WORKDIR.value)
    log.info("%s", cli.describe_runtime())

  from fastntk_jax import signing  # pylint: disable=g-import-not-at-top
  from fastntk_jax import workdir as wd  # pylint: disable=g-import-not-at-top
  try:
    results = run_lib.run(cfg, _WORKDIR.value, show_progress=_PROGRESS.value,
                          prepared=prepared, on_ready=start_log)
  except (wd.WorkdirBusyError, wd.WorkdirConflictError, signing.SigningKeyError) as e:
    cli.fail(e)  # the workdir is another run's, or the key unusable: nothing is written
  except (ValueError, TypeError, KeyError, OSError) as e:
    # Bad input: one clear line and a non-zero exit, never a traceback on the terminal; but
    # the same exception types also come from bugs, so the traceback is kept in a file.
    cli.fail(f"{cli.short_error(e)} (traceback: {cli.save_traceback(_WORKDIR.value)})")
  from fastntk_jax.experiment import report  # pylint: disable=g-import-not-at-top
  print(report.markdown(results))
  print(f"Wrote {os.path.join(_WORKDIR.value, 'results.md')} and plots.")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
