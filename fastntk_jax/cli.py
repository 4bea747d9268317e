"""The command line's plumbing: flags through `ml_collections.config_flags`, wrapped so that
every bad flag, config file or value is one line `fastntk_jax: error: ...` and exit code 2
before any work; quiet library logs; one line on the runtime.

`parse_flags` is the flags parser of `absl.app.run` (`fastntk_jax.main`). It leaves parsing
to config_flags and adds what the command line promised before it: `--config` may come after
its overrides; `--config.model.options.<key>=<value>` may add a model option the config
file did not list (the options are free-form: `models.get_model(**options)` checks them);
`--config.<field>=None` sets a field to None (config_flags cannot parse None for a typed
field; `config.validate` decides whether None is allowed there).
"""

from __future__ import annotations

import ast
import difflib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
import traceback
from typing import NoReturn

from absl import flags

PROG = "fastntk_jax"
CONFIG_FLAG = "config"
# The embedded default (scikit-learn's digits, no downloads), beside the package.
DEFAULT_CONFIG = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                               "configs", "default.py"))
_HELP_FLAGS = ("help", "h", "?", "helpshort", "helpfull", "helpxml")
FREE_FORM = "model.options"  # a group whose keys are free (get_model(**options))


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


def _literal(raw: str):
  try:
    return ast.literal_eval(raw.strip())
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return raw


def _split(argv):
  """(argv for absl with --config first, [(field, raw) kept aside for `_apply`])."""
  head, rest = argv[:1], list(argv[1:])
  config, others, aside = [], [], []
  i = 0
  while i < len(rest):
    arg = rest[i]
    if arg == "--":
      others.extend(rest[i:])
      break
    name, eq, raw = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name == CONFIG_FLAG:
      if not eq and i + 1 < len(rest):  # --config path
        config, i = [arg, rest[i + 1]], i + 2
        continue
      config = [arg]
    elif arg.startswith("-") and name.startswith(CONFIG_FLAG + ".") and eq:
      field = name[len(CONFIG_FLAG) + 1:]
      if field.startswith(FREE_FORM + ".") or raw.strip() == "None":
        aside.append((field, raw))
      else:
        others.append(arg)
    else:
      others.append(arg)
    i += 1
  return head + config + others, aside


def _apply(cfg, aside) -> None:
  """Sets the fields kept aside by `_split`: free-form model options and None values."""
  for field, raw in aside:
    parts = field.split(".")
    node = cfg
    for key in parts[:-1]:
      if key not in node:
        raise ValueError(f"--config.{field}={raw}: unknown config field "
                         f"{'.'.join(parts[:-1])!r}")
      node = node[key]
    value = None if raw.strip() == "None" else _literal(raw)
    if field.startswith(FREE_FORM + "."):
      with node.unlocked():
        try:
          node[parts[-1]] = value
        except TypeError:  # the config file gave the option a value of another type
          before = node[parts[-1]]
          a = lambda t: ("an " if t.__name__[0] in "aeiou" else "a ") + t.__name__
          raise ValueError(
              f"--config.{field}={raw}: config.{field} is {a(type(before))} in this config "
              f"({before!r}), and {raw!r} reads as {a(type(value))}; give {a(type(before))}"
              + (", e.g. '(4, 8, 8)'" if isinstance(before, (tuple, list)) else "")) from None
    elif parts[-1] not in node:
      raise ValueError(f"--config.{field}=None: unknown config field {field!r}"
                       f"{_did_you_mean(parts[-1], node.keys())}")
    else:
      try:
        node[parts[-1]] = None
      except (TypeError, ValueError) as e:
        raise ValueError(f"--config.{field}=None: config.{field} cannot be None") from e


def _did_you_mean(key: str, options) -> str:
  close = difflib.get_close_matches(key, [str(o) for o in options], n=1, cutoff=0.6)
  return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_key(error: Exception) -> str:
  """'unknown config field 'x'; did you mean 'y'?' from a locked ConfigDict's error."""
  text = " ".join(str(error).replace("\\", "").split())
  key = re.search(r'Key "([^"]+)"', text) or re.search(r"'([^']+)'", text)
  hint = re.search(r'Did you mean "([^"]+)"', text)
  return (f"unknown config field {key.group(1) if key else text!r}"
          + (f"; did you mean {hint.group(1)!r}?" if hint else ""))


def _unknown_field(argv, error: Exception) -> str:
  """A one-line message for an override naming no field of the config."""
  text = " ".join(str(error).replace("\\", "").split())
  quoted = re.findall(r"'([^']+)'", text)
  key = quoted[0] if quoted else text.strip("'\"")
  hint = re.search(r'Did you mean "([^"]+)"', text)
  hint = f"; did you mean {hint.group(1)!r}?" if hint else ""
  for arg in argv[1:]:
    name = arg.lstrip("-").partition("=")[0]
    if name.startswith(CONFIG_FLAG + ".") and key in name.split("."):
      return (f"{arg}: unknown config field {name[len(CONFIG_FLAG) + 1:]!r}{hint} "
              f"(python -m fastntk_jax.main --dry_run prints every field)")
  return f"unknown config field {key!r}{hint}"


# The argv config_flags reads its overrides from (`DEFINE_config_file(sys_argv=ARGV)`): filled
# by `parse_flags` before each parse. It starts with a bare --config so that the overrides are
# registered while parsing, never when the flag is defined (from whatever sys.argv was then).
ARGV = [PROG, f"--{CONFIG_FLAG}"]


def _forget_overrides() -> None:
  """Removes the override flags an earlier parse registered (a process that parses twice)."""
  for name in list(flags.FLAGS):
    if name.startswith(CONFIG_FLAG + "."):
      delattr(flags.FLAGS, name)


def _through_a_value(argv, path: str):
  """The message for an override whose field path passes through a value, or None."""
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    cfg = config_lib.load_config_file(path)
  except Exception:  # pylint: disable=broad-except  # then the file itself is the problem
    return None
  for arg in argv[1:]:
    name = arg.lstrip("-").partition("=")[0]
    if not name.startswith(CONFIG_FLAG + "."):
      continue
    node, walked = cfg, []
    for key in name.split(".")[1:-1]:
      walked.append(key)
      node = node.get(key) if hasattr(node, "get") else None
      if node is not None and not hasattr(node, "get"):
        return f"{arg}: config.{'.'.join(walked)} is a value, not a group of fields"
  return None


def _last_error_line(text: str) -> str:
  """The exception line of a message that quotes a whole traceback (config_flags does)."""
  if "Traceback" not in text:
    return text
  found = re.findall(r"(\w+(?:Error|Exception): .*?)(?= File \"|$)", " ".join(text.split()))
  return found[-1] if found else text


def parse_flags(argv):
  """absl's parsing through config_flags, one line and exit 2 for anything it refuses."""
  argv, aside = _split(argv)
  config = next((a for a in argv[1:] if a.lstrip("-").partition("=")[0] == CONFIG_FLAG), None)
  if config is None:
    config = f"--{CONFIG_FLAG}={DEFAULT_CONFIG}"
    argv = argv[:1] + [config] + argv[1:]
  path = config.partition("=")[2]
  if not path.strip():
    fail(f"--{CONFIG_FLAG} needs a config file, e.g. --{CONFIG_FLAG}=configs/default.py "
         f"(or leave it out for the embedded default)")
  ARGV[:] = argv
  _forget_overrides()
  # config_flags loads the file into the module `config_config`, reusing one a previous parse
  # left (whose get_config would then answer for a file that has none).
  sys.modules.pop(f"{CONFIG_FLAG}_config", None)
  # config_flags logs its own warning (e.g. "get_config() returned None") through absl before
  # the log is set up; the refusal below says it in our one line instead.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    rest = flags.FLAGS(argv)
    cfg = flags.FLAGS[CONFIG_FLAG].value
    if cfg is None or not hasattr(cfg, "unlocked"):
      raise ValueError(f"get_config() returned {type(cfg).__name__}, not an "
                       "ml_collections.ConfigDict (start from fastntk_jax.config.base_config())")
  except SystemExit as e:  # absl exits 1 after printing --help; asking for help is no error
    if any(a.lstrip("-").split("=")[0] in _HELP_FLAGS for a in argv[1:] if a.startswith("-")):
      sys.exit(0)
    raise
  except (AttributeError, KeyError) as e:
    if "FrozenConfigDict" in str(e):
      fail(f"config file {path.partition(':')[0]!r}: get_config() returned a FrozenConfigDict; "
           "return the ml_collections.ConfigDict itself (overrides must be able to set it)")
    if "get_config" in str(e):
      fail(f"config file {path.rsplit(':', 1)[0]!r} defines no get_config()")
    where = _where_in(path)
    if where:  # the config file itself sets a field the schema lacks
      fail(f"config file {path.partition(':')[0]!r}: {_unknown_key(e)}{where}")
    fail(_unknown_field(argv, e))
  except TypeError as e:  # an override that walks into a value: --config.seeds.first=1
    fail(_through_a_value(argv, path) or f"--config={path}: TypeError: {e}{_where_in(path)}")
  except flags.Error as e:
    text = _last_error_line(str(e))
    if "get_config() takes 0 positional arguments" in text:
      file, _, arg = path.partition(":")
      fail(f"config file {file!r} takes no argument (its get_config() has no parameter); "
           f"drop ':{arg}'")
    where = _where_in(path)
    if where:  # raised by the config file itself, not by an override
      fail(f"config file {path.partition(':')[0]!r}: {text.replace('Could not override', 'Could not set')}{where}")
    fail(f"bad flags: {text}")
  except Exception as e:  # pylint: disable=broad-except  # a config file that fails to load
    if "No such file or directory" in str(e):
      fail(_missing_file(path))
    fail(f"--config={path}: {_last_error_line(f'{type(e).__name__}: {e}')}"
         f"{_where_in(path)}")
  finally:
    absl_logger.setLevel(level)
  try:
    _apply(cfg, aside)
  except ValueError as e:  # the overrides kept aside, not the file, are at fault
    fail(e)
  return rest


def _missing_file(path: str) -> str:
  """The message for a --config file that is not there (config_flags reads 'file:arg')."""
  # The whole value, or all of it but a last ':arg', names a file: a ':' split its path.
  whole = path if os.path.isfile(path) else path.rpartition(":")[0]
  if ":" in whole and os.path.isfile(whole):
    return (f"config file {whole!r}: config_flags reads the text after the first ':' as the "
            "config's argument, so a path with ':' in it cannot be loaded; move or link the "
            "file to a path without ':'")
  file, _, arg = path.partition(":")
  return (f"config file {file!r} does not exist" + (f" (':{arg}' is its argument)" if arg
                                                    else ""))


def _where_in(path: str) -> str:
  """' (at FILE:LINE)' for the innermost frame of the exception being handled that lies in
  the config file `path`, or ''."""
  file = os.path.abspath(path.partition(":")[0])
  error, line, seen = sys.exc_info()[1], None, set()
  while error is not None and id(error) not in seen and line is None:
    # The error itself, else what it was raised from (config_flags wraps a config file's
    # own exception in a flags.Error).
    seen.add(id(error))
    tb = error.__traceback__
    while tb is not None:
      if os.path.abspath(tb.tb_frame.f_code.co_filename) == file:
        line = tb.tb_lineno
      tb = tb.tb_next
    error = error.__cause__ or error.__context__
  return f" (at {path.partition(':')[0]}:{line})" if line else ""


def start_logging() -> logging.Logger:
  """Our progress at INFO, library chatter quiet, TensorFlow's first-import chatter held back,
  and Python warnings (e.g. a `PrecisionWarning`) shown once, as log lines."""
  quiet_library_logs()
  logging.captureWarnings(True)
  if "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietFirstImport())
  return logging.getLogger("fastntk_jax.main")


# What a full disk or a refused write looks like in a library's message (tensorstore puts
# its whole specification, kilobytes of JSON, around the operating system's words).
_OS_WORDS = re.compile(r"(No space left on device|Disk quota exceeded|Permission denied|"
                       r"Read-only file system)")
_PATH = re.compile(r"(?:file|path|\")\W{0,3}(/[^\"'\s,}]+)")
LONGEST_LINE = 400


def short_error(error: BaseException) -> str:
  """One short line for an error: an operating system's refusal as its words and the path
  (a full disk, a permission); any other message cut to `LONGEST_LINE` characters (the
  whole of it goes to the traceback file)."""
  if isinstance(error, OSError) and error.errno is not None and error.filename:
    return f"{error.strerror or os.strerror(error.errno)}: {error.filename}"
  text = " ".join(str(error).split())
  words = _OS_WORDS.search(text)
  if words:
    path = _PATH.search(text)
    return words.group(1) + (f": {path.group(1)}" if path else "")
  if len(text) > LONGEST_LINE:
    return text[:LONGEST_LINE] + " ..."
  return text
