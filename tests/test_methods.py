"""The method plug-ins: the registry finds them by name, the harness names none of them, and
the Fast-NTK plug-in reaches the retrain ridge solution by each of its routes (checked
against numpy's closed form on a model linear in its parameters)."""

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import ROOT
from test_stream import C, D_IN, CrossClassLinear
from x64 import enable_x64

from fastntk_jax import config as config_lib
from fastntk_jax.data import schema
from fastntk_jax.experiment import methods
from fastntk_jax.experiment.methods import fastntk
from fastntk_jax.experiment.methods import random_label
from fastntk_jax.unlearn import api

N_R, N_F, LAM = 14, 5, 0.1


def test_the_registry_finds_every_plugin_by_name_without_importing_it():
  names = methods.names()
  assert {"fastntk", "max_loss", "random_label", "ft"} <= set(names)
  base = config_lib.base_config()
  for name in names:
    method = methods.get(name)
    assert method.name == name and method.label and method.reference
    methods.block(base, method)  # its config block exists in the schema
  with pytest.raises(ValueError, match="unknown method 'salum'.*'fastntk'"):
    methods.get("salum")
  assert methods.label("full") == "Full" and methods.label("fastntk") == "Fast-NTK"


def test_the_harness_names_no_method():
  """Adding a method touches its module and its config block only: the harness and the
  report must not name any plug-in (Fast-NTK's certificate aside)."""
  folder = os.path.join(ROOT, "fastntk_jax", "experiment")
  for module in ("run.py", "report.py", "finetune.py", "evaluate.py", "stages.py"):
    text = open(os.path.join(folder, module)).read()
    for name in methods.names():
      if name == "fastntk":
        continue
      assert f'"{name}"' not in text and f"'{name}'" not in text, (module, name)


def test_random_labels_are_never_the_true_one_and_seeded():
  y = np.arange(200) % 7
  a, b = random_label.wrong_labels(y, 7, seed=3), random_label.wrong_labels(y, 7, seed=3)
  np.testing.assert_array_equal(a, b)
  assert not np.any(a == y) and set(np.unique(a)) == set(range(7))
  assert not np.array_equal(a, random_label.wrong_labels(y, 7, seed=4))


class _Net:
  """CrossClassLinear on images [n, D_IN, 1, 1] (the data splits' layout)."""

  def __init__(self):
    self.linear = CrossClassLinear()

  def apply(self, w, x):
    return self.linear.apply(w, x.reshape(x.shape[0], -1))


def _problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N_R + N_F, D_IN)).astype(np.float32).astype(np.float64)  # as Split holds
  y = rng.integers(0, C, size=N_R + N_F).astype(np.int32)
  split = lambda s: schema.Split(x=x[s].reshape(-1, D_IN, 1, 1), y=y[s],
                                 index=np.arange(x.shape[0])[s], source="synthetic")
  data = types.SimpleNamespace(retain=split(slice(0, N_R)), forget=split(slice(N_R, None)),
                               train=split(slice(None)), num_classes=C)
  net = _Net()
  phi = net.linear.features(x)
  w0 = rng.normal(size=phi.shape[1]) * 0.3
  onehot = np.eye(C)[y].reshape(-1)

  def ridge(rows):  # numpy, float64: w0 + (ΦᵀΦ + λI)⁻¹Φᵀ(Y - Φw0) over `rows` samples
    p, yy = phi[rows], onehot[rows]
    return w0 + np.linalg.solve(p.T @ p + LAM * np.eye(p.shape[1]), p.T @ (yy - p @ w0))

  rows = lambda s: np.arange(N_R + N_F)[s].repeat(C) * C + np.tile(np.arange(C), len(
      np.arange(N_R + N_F)[s]))
  w_d, w_r = ridge(rows(slice(None))), ridge(rows(slice(0, N_R)))
  grams = {part: (phi[rows(s)].T @ phi[rows(s)],
                  phi[rows(s)].T @ (onehot[rows(s)] - phi[rows(s)] @ w0))
           for part, s in (("retain", slice(0, N_R)), ("forget", slice(N_R, None)))}
  return net, data, w0, w_d, w_r, grams


def _block(**fields):
  block = ml_collections.ConfigDict({"serve": False, "solver": "auto", "linearize_at": "init",
                                     "checkpoint_rows": 4})
  block.update(fields)
  return block


def _context(net, data, w0, w_d, forgetter, **fields):
  unravel = net.linear.unravel
  return methods.Context(seed=0, net=None, frozen={}, w0=unravel(w0), full=unravel(w_d),
                         data=data, linearized=True, forgetter=forgetter,
                         fit=lambda *a, **k: None, **fields)


@pytest.mark.parametrize("route", ["chunked_primal", "shared_grams", "dual", "cg", "served"])
def test_fastntk_plugin_reaches_the_retrain_ridge_solution_by_every_route(route, tmp_path):
  with enable_x64():
    net, data, w0, w_d, w_r, grams = _problem()
    solver = {"dual": "dual", "cg": "cg", "chunked_primal": "primal"}.get(route, "auto")
    forgetter = api.make_forgetter(net.apply, num_classes=C, damping=LAM, solver=solver,
                                   batch_size=4, solve_dtype=jnp.float64)
    shared = None
    if route == "shared_grams":
      shared = lambda: ((grams["retain"], grams["forget"]), (0.0, 0.0), 0.0)
    ctx = _context(net, data, w0, w_d, forgetter, grams=shared, folder=str(tmp_path))
    result = fastntk.METHOD.run(ctx, _block(serve=route == "served", solver=solver))
    got = np.concatenate([np.ravel(l) for l in (result.params["head"]["bias"],
                                                result.params["head"]["kernel"],
                                                result.params["mix"])])
  np.testing.assert_allclose(got, w_r, rtol=1e-8, atol=1e-10)
  assert np.linalg.norm(w_d - w_r) > 1e-2  # there was something to forget
  diag = result.diagnostics
  assert result.seconds == diag["seconds"] and result.seconds >= 0
  if route == "chunked_primal":
    assert "chunked" in diag["reason"] and diag["solver"] == "primal"
  if route == "shared_grams":
    assert "shared with the linearised Full/Retrain" in diag["reason"]
  if route == "served":
    assert "state of D" in diag["reason"] and diag["cold_seconds"] is not None
    assert os.path.exists(tmp_path / fastntk.STATE_OF_D)


def test_a_state_of_d_built_for_other_inputs_or_options_is_rebuilt_not_served(tmp_path):
  """A state left in the seed's folder by another damping, or built on other inputs of the
  same shape, or corrupt, is refused (`Forgetter.restore`) and built again; the right one is
  read back."""
  with enable_x64():
    net, data, w0, w_d, w_r, _ = _problem()
    make = lambda lam: api.make_forgetter(net.apply, num_classes=C, damping=lam,
                                          solver="primal", batch_size=4,
                                          solve_dtype=jnp.float64)

    def serve(forgetter, data):
      ctx = _context(net, data, w0, w_d, forgetter, folder=str(tmp_path))
      return fastntk.METHOD.run(ctx, _block(serve=True))

    serve(make(1.0), data)  # leaves a state of damping 1.0
    out = serve(make(LAM), data)
    assert out.diagnostics["cold_seconds"] is not None  # rebuilt, not read back
    again = serve(make(LAM), data)
    assert again.diagnostics["cold_seconds"] is None  # now the right state: read back
    np.testing.assert_array_equal(np.asarray(again.params["mix"]), np.asarray(out.params["mix"]))
    shifted = types.SimpleNamespace(**{**vars(data), "train": dataclasses.replace(
        data.train, x=data.train.x + 1.0)})
    assert serve(make(LAM), shifted).diagnostics["cold_seconds"] is not None
    path = tmp_path / fastntk.STATE_OF_D
    path.write_bytes(path.read_bytes()[:-100])  # truncated: fails its checksum
    assert serve(make(LAM), data).diagnostics["cold_seconds"] is not None
    forgetter = make(LAM)
    state = forgetter.init(net.linear.unravel(w0), (jnp.asarray(data.train.x),
                                                    jnp.asarray(data.train.y)))
    _, served = forgetter.serve(state, net.linear.unravel(w_d), np.array([N_R]))
    with pytest.raises(ValueError, match="already served"):
      forgetter.restore(served.arrays(), net.linear.unravel(w0),
                        (data.train.x, data.train.y))
    with pytest.raises(ValueError, match="another w0"):
      forgetter.restore(state.arrays(), net.linear.unravel(w0 + 1),
                        (data.train.x, data.train.y))


# --------------------------------------------------------------------------------------------
# A method from outside the package (`methods.register`)
# --------------------------------------------------------------------------------------------


def _outside_block() -> ml_collections.ConfigDict:
  """A block as an eight-method suite writes one: a training group with a field of its own,
  and a second training group inside it."""
  block = config_lib.train_group(epochs=3, lr=0.01, batch_size=16, loss="ce")
  block.alpha = 0.5  # the method's own field (checked by its validate)
  block.forget_phase = config_lib.train_group(epochs=2, lr=0.02, batch_size=8, loss="ce")
  return block


def _check_alpha(block) -> None:
  if not 0 <= block.alpha <= 1:
    raise ValueError(f"config.baselines.outside.alpha={block.alpha} must be in [0, 1]")


def _start_from_full(ctx, block):
  del block
  return methods.Result(ctx.full, 0.0, {"note": "unchanged"})


OUTSIDE = methods.Method(name="outside", label="Outside", run=_start_from_full,
                         config_group="baselines.outside", reference="a test method",
                         validate=_check_alpha, default_block=_outside_block)


@pytest.fixture
def registered_outside():
  yield methods.register(OUTSIDE)
  methods._REGISTERED.pop("outside", None)  # pylint: disable=protected-access


def test_a_method_from_outside_the_package_is_registered_with_its_block(registered_outside):
  assert "outside" in methods.names() and methods.get("outside") is OUTSIDE
  assert methods.label("outside") == "Outside"
  cfg = config_lib.base_config()
  assert cfg.baselines.outside.alpha == 0.5
  with cfg.unlocked():
    cfg.methods = ("full", "retrain", "outside")
  config_lib.validate(cfg)
  # Both training groups of the block are found (and validated, and shrunk by :tiny).
  groups = config_lib.train_groups(cfg)
  assert {"baselines.outside", "baselines.outside.forget_phase"} <= set(groups)
  cfg.baselines.outside.forget_phase.epochs = -1
  with pytest.raises(ValueError, match=r"config\.baselines\.outside\.forget_phase\.epochs=-1"):
    config_lib.validate(cfg)
  cfg.baselines.outside.forget_phase.epochs = 2
  cfg.baselines.outside.alpha = 2.0
  config_lib.validate(cfg)  # the plug-in's own field is the plug-in's to check
  with pytest.raises(ValueError, match="alpha=2.0 must be in"):
    methods.checked_plugins(cfg)
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("configs_common",
                                                os.path.join(ROOT, "configs", "common.py"))
  common = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(common)
  common.tiny_training(cfg)
  assert cfg.baselines.outside.epochs == 1 and cfg.baselines.outside.forget_phase.epochs == 1


def test_register_refuses_what_it_cannot_place(registered_outside):
  del registered_outside
  with pytest.raises(ValueError, match="'ft' is taken"):
    methods.register(dataclasses.replace(OUTSIDE, name="ft", config_group="baselines.ft"))
  with pytest.raises(ValueError, match="config_group must be 'baselines.other'"):
    methods.register(dataclasses.replace(OUTSIDE, name="other", config_group="unlearn"))
  with pytest.raises(ValueError, match="needs default_block"):
    methods.register(dataclasses.replace(OUTSIDE, name="other", config_group="baselines.other",
                                         default_block=None))
  methods.register(OUTSIDE)  # the same method again is no conflict,
  again = dataclasses.replace(OUTSIDE, label="Outside, reloaded")  # nor its module reloaded
  assert methods.register(again) is again and methods.get("outside") is again
  # The config file executed again under another module name (config_flags does): its
  # functions are new objects of the same source.
  reloaded = types.FunctionType(_start_from_full.__code__, {"methods": methods},
                                "_start_from_full")
  methods.register(dataclasses.replace(OUTSIDE, run=reloaded))
  with pytest.raises(ValueError, match="'outside' is taken"):  # another `run` is
    methods.register(dataclasses.replace(OUTSIDE, run=_check_alpha))


def _two_phases(ctx, block):
  """Gradient ascent on D_f, then descent on D_r, each phase long enough to leave a periodic
  checkpoint; phase 2 is also trained directly (no checkpoint) as the reference."""
  from fastntk_jax import train  # pylint: disable=g-import-not-at-top
  forget = (ctx.data.forget.x, ctx.data.forget.y)
  retain = (ctx.data.retain.x, ctx.data.retain.y)
  first = train.TrainSpec.from_config(block.forget_phase, ascent=True)
  second = train.TrainSpec.from_config(block)
  p1, t1 = ctx.fit(ctx.full, forget, first, seed_offset=11)
  p2, t2 = ctx.fit(p1, retain, second, seed_offset=12)
  direct, _, _ = train.fit(ctx.net, p1, ctx.frozen, retain, second, ctx.data.num_classes,
                           seed=ctx.seed + 12)
  a, b = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
          for t in (p2, direct))
  return methods.Result(p2, t1 + t2, {"phase2_vs_direct": float(np.abs(a - b).max())})


def _two_phase_block():
  block = config_lib.train_group(epochs=3, lr=0.01, batch_size=64, loss="ce")
  block.forget_phase = config_lib.train_group(epochs=3, lr=0.01, batch_size=64, loss="ce")
  return block


@pytest.mark.slow
def test_registered_methods_are_run_reported_and_resume_each_phase(registered_outside,
                                                                    tmp_path):
  """Two methods from outside the package in one run: one returns Full's parameters (its
  accuracies must be Full's, its rows in results.md), one trains in two phases (each
  `ctx.fit` call has its own checkpoint: they shared one, and phase 2 resumed phase 1)."""
  from conftest import DEFAULT  # pylint: disable=g-import-not-at-top
  from fastntk_jax.experiment import run as run_lib  # pylint: disable=g-import-not-at-top
  two = methods.register(methods.Method(
      name="two_phase_test", label="Two phases", run=_two_phases,
      config_group="baselines.two_phase_test", reference="a test method",
      default_block=_two_phase_block))
  try:
    cfg = config_lib.load_config_file(f"{DEFAULT}:tiny")  # built after the registrations
    with cfg.unlocked():
      cfg.methods = ("full", "retrain", "outside", "two_phase_test")
      cfg.baselines.two_phase_test.epochs = 3  # :tiny set 1: no periodic checkpoint then
      cfg.baselines.two_phase_test.forget_phase.epochs = 3
    assert cfg.baselines.outside.forget_phase.epochs == 1  # :tiny reaches the nested group
    results = run_lib.run(cfg, str(tmp_path / "w"), show_progress=False)
  finally:
    methods._REGISTERED.pop(two.name, None)  # pylint: disable=protected-access
  text = open(tmp_path / "w" / "results.md").read()
  assert "Outside" in text and "Two phases" in text
  ours, full = results["methods"]["outside"], results["methods"]["full"]
  for metric in ("acc_forget", "acc_retain", "acc_test_forget", "acc_test_retain"):
    assert ours[metric]["per_seed"] == full[metric]["per_seed"], metric
  assert results["timing"]["methods"]["outside"]["seconds"]["per_seed"] == [0.0]
  diag = json.load(open(tmp_path / "w" / "seed_0" / "two_phase_test_diagnostics.json"))
  assert diag["phase2_vs_direct"] == 0.0, diag
  assert not [f for f in os.listdir(tmp_path / "w" / "seed_0") if f.endswith(".partial")]
