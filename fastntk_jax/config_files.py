"""Config files: `get_config(arg)` of a Python file, as `--config=file.py:arg` loads it, for
programs that build configs without the command line."""

import importlib.util
import os

import ml_collections


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """A config file's `get_config(arg)` for `path` = "file.py" or "file.py:arg" (what
  `--config` loads; for programs that build configs without the command line).

  Raises:
    ValueError: no such file, not a Python file, no `get_config`, or it returned something
      other than a ConfigDict (the message names the file).
  """
  arg = None
  if ":" in os.path.basename(path):
    path, arg = path.rsplit(":", 1)
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location("fastntk_user_config", path)
  if spec is None:  # not a .py file
    raise ValueError(f"config file {path!r} is not a Python file (e.g. configs/default.py)")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config()")
  try:
    cfg = module.get_config(arg) if arg is not None else module.get_config()
  except (AttributeError, KeyError) as e:  # a misspelt field of the locked ConfigDict
    raise ValueError(f"config file {path!r}: {e}") from None
  return check_is_config(cfg, path)


def check_is_config(cfg, path: str) -> ml_collections.ConfigDict:
  """`cfg` if it is a ConfigDict, else a ValueError naming the file and what it returned."""
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ValueError(f"config file {path!r}: get_config() returned {type(cfg).__name__}, not "
                     "an ml_collections.ConfigDict (start from fastntk_jax.config.base_config())")
  return cfg
