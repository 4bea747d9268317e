"""Unlearning methods as plug-ins: one module of this package per method, found by name.

A plug-in module defines `METHOD = Method(...)`: its name (the entry of `config.methods`),
its label in the tables, the dotted path of its config block, and `run(context, block)`,
which receives what every method receives (`Context`: the model as the methods are trained
and evaluated, Full's parameters, D_r and D_f, a seed, the run's Forgetter, a training
helper) and returns the new trainable parameters with the seconds the unlearning took
(`Result`). The harness runs, evaluates and reports every method of `config.methods`
without naming it: adding a method touches its own module and its config block only.

Full and Retrain are not plug-ins: they are the fine-tuning every method starts from and
is measured against (`experiment.finetune`).

Example: `ft.py` (plain fine-tuning on D_r), the whole of which is a `run` and its `METHOD`,
with its block `baselines.ft` in `config.base_config` (docs/plugins.md walks through it).
A method defined outside this package is added with `register(method)` (its block then comes
from `Method.default_block`, at `baselines.<name>`).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import pkgutil
from typing import Any, Callable, Optional

# The reference methods every run has (`experiment.finetune`), and their labels.
REFERENCES = {"full": "Full", "retrain": "Retrain"}


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method receives for one seed.

  Attributes:
    seed: the run seed.
    net: what every method is trained and evaluated as: the Flax model, or the model
      linearised at w0 (`unlearn.linear.Linearized`).
    frozen: Full's frozen collections for `net` (its BatchNorm statistics; w0 under
      `LINEARIZATION_POINT` when linearised).
    w0: the trainable parameters before fine-tuning (the linearisation point).
    full: Full's trainable parameters, where every method starts.
    data: the run's `UnlearningData` (`retain` = D_r, `forget` = D_f, `train` = D, ...).
    linearized: whether fine-tuning was linearised (`finetune.mode`).
    forgetter: the run's `unlearn.Forgetter` (its options are `config.unlearn`'s).
    fit: `(params, split, spec, *, seed_offset, tag=None) -> (params, seconds)`: trains
      `params` of `net` on `split` = (x, y) with a `train.TrainSpec`, batch order seeded by
      seed + seed_offset, resumable under the method's stage when the run keeps files.
    fit_objective: `(params, streams, objective, spec, *, seed_offset, hparams=None,
      aux=None, grad_mask=None, batch_sizes=None, passes=None, tag=None) -> (params,
      seconds)`:
      `objectives.fit_objective` on `net` (an objective over several streams, e.g.
      {"retain": (x, y), "forget": (x, y)}), timed and resumable like `fit`.
    grams: `() -> ((stats_r, stats_f), (seconds_r, seconds_f), compile_seconds)`, each
      stats = (G, b) as `Forgetter.gram_stats` gives them: the Gram statistics at w0 that
      linearised fine-tuning in closed form solved Full and Retrain from, the seconds each
      took and their compilation; None in other modes.
    kernel: `() -> (stats, num_retain, seconds)`: the kernel statistics of D at w0
      (`Forgetter.kernel_stats`, D_r's `num_retain` samples first) that linearised
      fine-tuning in the dual solved Full and Retrain from, and the seconds they took; None
      in other modes.
    folder: the seed's folder for a method's resumable files (None: keep none).
    workdir: the run's folder (its audit log), None in the KLoM population.
    record: whether this is a reported seed (certificates and the audit log), not a model
      of the KLoM population.
    mesh: the data-parallel mesh, or None.
  """
  seed: int
  net: Any
  frozen: dict
  w0: Any
  full: Any
  data: Any
  linearized: bool
  forgetter: Any
  fit: Callable
  fit_objective: Optional[Callable] = None
  grams: Optional[Callable] = None
  kernel: Optional[Callable] = None
  folder: Optional[str] = None
  workdir: Optional[str] = None
  record: bool = False
  mesh: Any = None


@dataclasses.dataclass
class Result:
  """What a method returns: its trainable parameters (like `Context.full`), the seconds the
  unlearning took (compilation apart, where the method can tell), and anything it reports
  (`diagnostics`, written to `seed_<s>/<name>_diagnostics.json` and results.json)."""
  params: Any
  seconds: Optional[float]
  diagnostics: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
  """An unlearning method (see the module docstring).

  Attributes:
    name: its entry in `config.methods` and key in results.json.
    label: its name in tables and plots.
    run: `(Context, block: ConfigDict) -> Result`.
    config_group: the dotted path of its config block (e.g. "baselines.max_loss").
    reference: the paper and code its recipe follows.
    validate: `(block) -> None`, raising ValueError naming a bad field of its block (run
      before any work); None when `config.validate` already checks every field (a block
      with every field of a training group is validated as one).
    default_block: `() -> ConfigDict`, the block with the reference's defaults, for a
      method registered from outside this package (`register`); `config.base_config` puts
      it at `config_group`, which must then be "baselines.<name>". The package's own
      plug-ins have their blocks written in `config.base_config`.
    search_space: `(cfg) -> {field of the block: tuple of values}`, the grid the fair tuning
      (`experiment.tuning`) searches, every method under the same rule and budget
      (`config.tuning`); the block's own values (the reference's defaults) should be in
      it. None or {}: nothing to tune.
  """
  name: str
  label: str
  run: Callable[[Context, Any], Result]
  config_group: str
  reference: str = ""
  validate: Optional[Callable[[Any], None]] = None
  default_block: Optional[Callable[[], Any]] = None
  search_space: Optional[Callable[[Any], dict]] = None


# Methods registered from outside this package (`register`), by name.
_REGISTERED: dict = {}


def register(method: Method) -> Method:
  """Adds a method defined outside this package, so that `config.methods` may name it.

  Register before building the config (`config.base_config` adds the block of every
  registered method), e.g. at the top of the config file that runs it. The same definition
  registered again (its module loaded once more) replaces the earlier one.

  Args:
    method: a `Method` whose `config_group` is "baselines.<name>" and whose
      `default_block()` returns its config block.

  Returns:
    `method` (so that a module may write `METHOD = register(Method(...))`).

  Raises:
    ValueError: a name taken by a reference, a plug-in of this package or another
      registered method; no `default_block`; another `config_group`.
  """
  if not isinstance(method, Method):
    raise ValueError(f"register() takes a methods.Method, got {type(method).__name__}")
  if not method.name.isidentifier():
    raise ValueError(f"method name {method.name!r} must be a Python identifier")
  taken = _REGISTERED.get(method.name)
  if method.name in REFERENCES or method.name in _package_names() or (
      taken is not None and not _same_definition(taken, method)):
    raise ValueError(f"method name {method.name!r} is taken; the methods are {list(names())}")
  if method.config_group != f"baselines.{method.name}":
    raise ValueError(f"a registered method's config_group must be 'baselines.{method.name}', "
                     f"got {method.config_group!r}")
  if method.default_block is None:
    raise ValueError(f"method {method.name!r}: a registered method needs default_block, the "
                     "function returning its config block (e.g. config.train_group(...))")
  _REGISTERED[method.name] = method
  return method


def _same_definition(a: Method, b: Method) -> bool:
  """Whether `b` is `a` defined again (its module loaded once more, maybe under another
  module name, as config_flags does): the same `run` by source file and qualified name."""
  def where(f):
    code = getattr(f, "__code__", None)
    return (getattr(code, "co_filename", getattr(f, "__module__", None)),
            getattr(f, "__qualname__", None))
  return a is b or (a.config_group == b.config_group and where(a.run) == where(b.run))


def registered() -> tuple[Method, ...]:
  """The methods registered from outside this package, in the order of registration."""
  return tuple(_REGISTERED.values())


def _package_names() -> tuple[str, ...]:
  here = os.path.dirname(__file__)
  return tuple(sorted(m.name for m in pkgutil.iter_modules([here]) if not m.name.startswith("_")))


def names() -> tuple[str, ...]:
  """The plug-ins by name: this package's modules (found without importing them), then the
  registered methods."""
  return _package_names() + tuple(_REGISTERED)


def get(name: str) -> Method:
  """The plug-in named `name` (its module's `METHOD`).

  Raises:
    ValueError: no such plug-in (the message lists them).
  """
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in names():
    raise ValueError(f"unknown method {name!r}; the plug-ins are {list(names())}")
  method = importlib.import_module(f"{__name__}.{name}").METHOD
  if not isinstance(method, Method) or method.name != name:
    raise ValueError(f"{__name__}.{name}.METHOD must be a Method named {name!r}")
  return method


def label(name: str) -> str:
  """The table label of a method or reference ("full", "retrain") by name."""
  return REFERENCES.get(name) or get(name).label


def block(cfg, method: Method):
  """The method's config block (`method.config_group` of `cfg`)."""
  node = cfg
  for part in method.config_group.split("."):
    node = node[part]
  return node


def search_space_of(cfg, method: Method) -> dict:
  """The method's search space under `cfg`, {field: tuple of values} ({}: nothing to tune)."""
  space = (method.search_space(cfg) if method.search_space is not None else None) or {}
  return {field: tuple(values) for field, values in space.items()}


def checked_plugins(cfg) -> tuple[Method, ...]:
  """The plug-ins `cfg.methods` names, each block checked by its `Method.validate` (before any
  work: `experiment.run.prepare` and `--dry_run`).

  Raises:
    ValueError: an unknown method, or a bad field of a block (named by the plug-in).
  """
  plugins = tuple(get(name) for name in cfg.methods if name not in REFERENCES)
  for method in plugins:
    if method.validate is not None:
      method.validate(block(cfg, method))
    if cfg.tuning.enabled:
      _check_search_space(cfg, method)
  return plugins


def _check_search_space(cfg, method: Method) -> None:
  """A grid the tuning can run: fields of the block, values of the field's type (numbers for
  a number), at most `tuning.max_trials` points (the same budget for every method)."""
  space = search_space_of(cfg, method)
  node = block(cfg, method)
  for field, values in space.items():
    if field not in node:
      raise ValueError(f"{method.name}: its search space names {field!r}, which "
                       f"config.{method.config_group} does not have")
    if not values:
      raise ValueError(f"{method.name}: its search space gives {field!r} no values")
    number = isinstance(node[field], (int, float)) and not isinstance(node[field], bool)
    for v in values:
      if number:
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and (not isinstance(node[field], int) or float(v).is_integer()))
      else:
        ok = type(v) is type(node[field])
      if not ok:
        raise ValueError(f"{method.name}: its search space gives {field!r} the value {v!r}, "
                         f"not a finite value of the field's type ({node[field]!r})")
  size = 1
  for values in space.values():
    size *= len(values)
  if space and size > cfg.tuning.max_trials:
    raise ValueError(f"{method.name}: its search space has {size} points, above "
                     f"config.tuning.max_trials={cfg.tuning.max_trials} (the same budget for "
                     "every method)")
