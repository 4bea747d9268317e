"""Command line: `python -m fastntk_jax.main [--config=configs/x.py[:arg]] [--workdir=DIR]`.

Intentionally thin: flags, then `pipeline.run(config, workdir)`. Without --config it runs
the embedded default (scikit-learn's digits, no downloads): `configs/default.py`.
Every config field can be overridden from the command line, lists and tuples too:
  --config.data.images_per_class=50 --config.seeds='(0,1)' --config.data.forget_classes=3,4
  --config.data.num_classes=None --config.model.options.widths='(4,8,8)'
(`fastntk_jax.config.apply_overrides`). `--dry_run` prints the resulting config as JSON and
exits without starting JAX. Every bad flag, config file or value is one line
`fastntk_jax: error: ...` on stderr and exit code 2, before any heavy work.
"""

import os

# Before anything imports jaxlib or TensorFlow (neural-tangents, TFDS): their C++ INFO and
# WARNING chatter (oneDNN notices, CUDA stubs on a CPU machine) stays off. A value set by the
# user wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.abc  # pylint: disable=g-import-not-at-top,wrong-import-position
import importlib.machinery  # pylint: disable=g-import-not-at-top,wrong-import-position
import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import re  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
import traceback  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

PROG = "fastntk_jax"
OVERRIDE_PREFIXES = ("--config.", "-config.")
_HELP_FLAGS = ("help", "h", "?", "helpshort", "helpfull", "helpxml")


def _default_config_path() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  return os.path.normpath(os.path.join(here, "..", "configs", "default.py"))


_CONFIG = flags.DEFINE_string(
    "config", _default_config_path(),
    "Config file (configs/*.py, optionally 'file.py:arg'); default: the embedded digits run "
    "(configs/default.py). Any field can be overridden with --config.a.b=value (lists: "
    "--config.seeds='(0,1)' or --config.seeds=0,1; None: --config.data.num_classes=None).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir_default",
                               "Output folder; rerunning the same command resumes.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Load the config, apply the --config.* overrides, validate, print the "
    "result as JSON and exit (nothing is run or written; JAX is not started).")

# (field, raw value or None) of every --config.field[=value] flag, in order (set by _parse_flags).
_OVERRIDES: list = []


def fail(message: str) -> "NoReturn":  # noqa: F821
  """One line on stderr, exit code 2: the contract for every bad input at the command line."""
  lines = [l.strip() for l in str(message).replace("\\n", "\n").splitlines() if l.strip()]
  print(f"{PROG}: error: {' '.join(lines)}", file=sys.stderr)
  sys.exit(2)


def save_traceback(workdir: str) -> str:
  """Writes the exception being handled, with its traceback, to `<workdir>/error_traceback.txt`
  (or a temporary file when the workdir was never made: a refusal must not create it);
  returns the file's path."""
  text = traceback.format_exc()
  if os.path.isdir(workdir):
    path = os.path.join(workdir, "error_traceback.txt")
    try:
      with open(path, "w") as f:
        f.write(text)
      return path
    except OSError:  # an unwritable workdir or a full disk, maybe the error itself
      pass
  try:
    with tempfile.NamedTemporaryFile("w", prefix="fastntk_jax_error_", suffix=".txt",
                                     delete=False) as f:
      f.write(text)
      return f.name
  except OSError as e:
    return f"not saved: {e}"


def split_overrides(argv):
  """Separates `--config.a.b=value` (or `--config.a.b value`) flags from the others.

  Returns:
    (the remaining argv for absl, [(field, raw value or None for a bare flag), ...]).
  """
  rest, overrides = [argv[0]] if argv else [], []
  args = list(argv[1:])
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == "--":  # everything after it is positional
      rest.extend(args[i:])
      break
    prefix = next((p for p in OVERRIDE_PREFIXES if arg.startswith(p)), None)
    if prefix is None:
      rest.append(arg)
    elif "=" in arg:
      field, _, raw = arg[len(prefix):].partition("=")
      overrides.append((field, raw))
    elif i + 1 < len(args) and not args[i + 1].startswith("--"):
      overrides.append((arg[len(prefix):], args[i + 1]))
      i += 1
    else:
      overrides.append((arg[len(prefix):], None))  # a bare boolean flag: true
    i += 1
  return rest, overrides


def load_config(path: str, overrides):
  """The config file's `get_config`, the overrides applied in order, validated.

  Raises:
    ValueError: naming the file, flag or field (one line).
  """
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    cfg = config_lib.load_config_file(path)
  except ValueError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # e.g. a SyntaxError in the file
    raise ValueError(f"config file {path!r}: {type(e).__name__}: {e}") from None
  cfg = config_lib.apply_overrides(cfg, overrides)
  return config_lib.validate(cfg)


def quiet_library_logs() -> None:
  """Our own progress at INFO; absl, orbax and JAX backend chatter at WARNING and above."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("fastntk_jax").setLevel(logging.INFO)
  # "Unable to initialize backend 'rocm'/'tpu'" (INFO) on every CPU-only machine, and "An
  # NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed"
  # (WARNING): which devices JAX found, and that hint, are our own line instead
  # (`describe_runtime`).
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


# Lines that TensorFlow's native code writes straight to file descriptor 2 while it is first
# imported (neural-tangents, TFDS), whatever TF_CPP_MIN_LOG_LEVEL says: absl's pre-init notice,
# INFO/WARNING records (oneDNN, "Could not find cuda drivers"), the CPU-feature note, and its
# CUDA build's failed cuInit on a machine without a GPU driver (TF only reads data here).
_NATIVE_CHATTER = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IW]\d{4} \d\d:\d\d:\d\d"
    r"|To enable the following instructions:|This TensorFlow binary is optimized"
    r"|E\d{4} \d\d:\d\d:\d\d\S* +\d+ cuda_platform\.cc:\d+\] failed call to cuInit)")


class _QuietFirstImport(importlib.abc.MetaPathFinder):
  """Holds back what `import tensorflow` writes to fd 2; replays all of it if the import
  fails and, if it succeeds, every line that is not start-up chatter (`_NATIVE_CHATTER`)."""

  def __init__(self, names=("tensorflow",)):
    self.names = names

  def find_spec(self, name, path=None, target=None):
    # Libraries probe with importlib.util.find_spec without importing: stay in place until
    # a module is actually executed (then `_FdQuietLoader` removes this finder).
    if name not in self.names:
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is not None and spec.loader is not None:
      spec.loader = _FdQuietLoader(spec.loader, self)
    return spec


class _FdQuietLoader(importlib.abc.Loader):

  def __init__(self, loader, finder):
    self.loader = loader
    self.finder = finder

  def create_module(self, spec):
    return self.loader.create_module(spec)

  def exec_module(self, module):
    import tempfile  # pylint: disable=g-import-not-at-top
    if self.finder in sys.meta_path:  # the first import only
      sys.meta_path.remove(self.finder)
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
      saved = os.dup(2)
      os.dup2(held.fileno(), 2)
      ok = False
      try:
        self.loader.exec_module(module)
        ok = True
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        held.seek(0)
        text = held.read().decode("utf-8", "replace")
        keep = [l for l in text.splitlines() if not ok or not _NATIVE_CHATTER.match(l)]
        if keep:
          print("\n".join(keep), file=sys.stderr)

  def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
    return getattr(self.loader, name)


def describe_runtime() -> str:
  """One line: JAX version and devices, and which kernel the dual solver will use."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  kinds = sorted({d.platform for d in devices})
  try:
    nt = (f"neural-tangents {md.version('neural-tangents')} (used when it imports, except "
          "where the Jacobian rows of D are kept: see results.json)")
  except md.PackageNotFoundError:
    nt = "the built-in one (neural-tangents is not installed)"
  line = (f"jax {jax.__version__} on {'/'.join(kinds)} ({len(devices)} device"
          f"{'s' if len(devices) != 1 else ''}); the dual solver's kernel: {nt}")
  from fastntk_jax import devices as devices_lib  # pylint: disable=g-import-not-at-top
  if kinds == ["cpu"] and devices_lib.nvidia_driver_present():
    line += ("; an NVIDIA driver is present but this JAX runs on the CPU "
             "(python -m fastntk_jax.devices says why)")
  return line


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]} (config fields are set with --config.a.b=value)")
  try:
    cfg = load_config(_CONFIG.value, _OVERRIDES)
  except (ValueError, TypeError, KeyError, OSError) as e:
    fail(e)
  if not _WORKDIR.value.strip():
    fail("--workdir is empty; name the output folder, e.g. --workdir=workdir_default")
  if _DRY_RUN.value:
    print(cfg.to_json_best_effort(indent=2, sort_keys=True))
    return
  quiet_library_logs()
  if "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietFirstImport())
  log = logging.getLogger("fastntk_jax.main")
  log.info("config %s%s, workdir %s", _CONFIG.value,
           "".join(f" --config.{f}" + ("" if v is None else f"={v}") for f, v in _OVERRIDES),
           _WORKDIR.value)
  # Imported here so that --help and --dry_run are instant and flag errors come before JAX.
  from fastntk_jax import sharding  # pylint: disable=g-import-not-at-top
  try:
    # Before anything starts the JAX backend: joins the processes of a multi-host launch
    # (FASTNTK_DISTRIBUTED=1, set by launch/*.sh; a no-op for a single process).
    sharding.maybe_initialize_distributed()
    log.info("%s", describe_runtime())
    if str(cfg.unlearn.kernel_impl).startswith("neural_tangents"):
      # Asked for explicitly: refused now (naming the stack that has it), not after training.
      from fastntk_jax import ntk  # pylint: disable=g-import-not-at-top
      ntk.import_neural_tangents()
    from fastntk_jax import pipeline  # pylint: disable=g-import-not-at-top
    results = pipeline.run(cfg, _WORKDIR.value, show_progress=_PROGRESS.value)
  except (ValueError, TypeError, KeyError, OSError) as e:
    # Bad input: one clear line and a non-zero exit, never a traceback on the terminal; but
    # the same exception types also come from bugs, so the traceback is kept in a file.
    fail(f"{e} (traceback: {save_traceback(_WORKDIR.value)})")
  except ImportError as e:
    if "pip install" not in str(e):  # a broken install or a bug: keep the traceback
      raise
    fail(e)  # an optional extra that this config needs (e.g. TFDS for CIFAR): names the fix
  from fastntk_jax import report  # pylint: disable=g-import-not-at-top
  print(report.markdown(results))
  print(f"Wrote {os.path.join(_WORKDIR.value, 'results.md')} and plots.")


def _parse_flags(argv):
  """absl's parsing of our flags, the --config.* overrides kept aside; a bad flag is one line
  and exit 2, no traceback."""
  rest, overrides = split_overrides(argv)
  _OVERRIDES[:] = overrides
  try:
    return flags.FLAGS(rest)
  except flags.Error as e:
    fail(f"bad flags: {e}")
  except SystemExit as e:  # absl exits 1 after printing --help; asking for help is no error
    if any(a.lstrip("-").split("=")[0] in _HELP_FLAGS for a in rest[1:] if a.startswith("-")):
      sys.exit(0)
    raise


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
