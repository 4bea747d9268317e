"""The field's comparison set: the method plug-ins of Unlearn-Sparse, SalUn, SCRUB, SSD, Bad
Teacher and IU, their shared trainer (`objectives.fit_objective`) and the fair tuning.

Each method runs on `:tiny` (linearised and standard fine-tuning), changes only the trainable
collection and raises D_f's loss; its pieces are checked against independent computations
(the plain trainer, a per-example gradient loop, numpy formulas worked out here); the tuning
chooses by the rule it states and never sees a report seed."""

import dataclasses
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from fastntk_jax import objectives
from fastntk_jax import train
from fastntk_jax.experiment import finetune
from fastntk_jax.experiment import methods
from fastntk_jax.experiment import prepare as prepare_lib
from fastntk_jax.experiment import pretrain
from fastntk_jax.experiment import progress as progress_lib
from fastntk_jax.experiment import run as run_lib
from fastntk_jax.experiment import tuning
from fastntk_jax.experiment.methods import _objectives as obj
from fastntk_jax.experiment.methods import iu
from fastntk_jax.experiment.methods import ssd
from fastntk_jax.models import trainable as tr
from fastntk_jax.unlearn import linear

COMPARISON = ("max_loss", "random_label", "ft", "neggrad_plus", "l1_sparse", "salun", "scrub",
              "ssd", "bad_teacher", "iu")

# Settings strong enough to move a tiny model within a few epochs (the direction test).
STRONG = {"max_loss": {"epochs": 3, "learning_rate": 0.01},
          "random_label": {"epochs": 5, "learning_rate": 0.05},
          "ft": {"epochs": 10, "learning_rate": 0.1},
          "neggrad_plus": {"epochs": 5, "learning_rate": 0.05, "alpha": 0.5},
          "l1_sparse": {"epochs": 10, "learning_rate": 0.1},
          "salun": {"epochs": 5, "learning_rate": 0.05},
          "scrub": {"epochs": 3, "learning_rate": 0.05},
          "ssd": {"alpha": 1.0},
          "bad_teacher": {"epochs": 10, "learning_rate": 0.01},
          "iu": {"alpha": 1.0}}


def _setup(tmp, mode: str):
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.unlearn.solve_dtype = "float32"  # no 64-bit JAX here: the methods, not the solve
    if mode == "standard":  # SGD long enough for Full to know D_f (what is forgotten)
      cfg.finetune.mode = "standard"
      cfg.finetune.bn_mode = "train"
      cfg.finetune.loss = "ce"
      cfg.finetune.learning_rate = 0.05
      cfg.finetune.epochs = 30
  p = prepare_lib.prepare(cfg)
  progress = progress_lib.Progress(str(tmp), False)
  pretrained = pretrain.pretrain_stage(p.cfg, p.model, p.data, str(tmp), progress)
  w_pre, frozen_pre = tr.split(pretrained)
  setup = run_lib.Setup(cfg=p.cfg, workdir=str(tmp), model=p.model, frozen_pre=frozen_pre,
                        w_pre=w_pre, forgetter=run_lib.make_forgetter(
                            p.cfg, p.model, frozen_pre, p.data.num_classes),
                        methods=p.plugins, progress=progress, mesh=None)
  w0 = tr.fresh_head(w_pre, p.model, p.data.image_shape, 0)
  tuner = finetune.FineTuner(p.cfg, p.model, frozen_pre, w0, p.data, 0,
                             forgetter=setup.forgetter,
                             fit=run_lib.make_fit(setup, p.data.num_classes), mesh=None)
  full, _ = tuner.fit(p.data.train, "full")
  return setup, tuner, p.data, full, w0


# Standard fine-tuning (the network itself by SGD) in the full tier; linearised in both.
@pytest.fixture(scope="module",
                params=["linearized", pytest.param("standard", marks=pytest.mark.slow)])
def tiny_setup(request, tmp_path_factory):
  if request.param == "linearized":
    return _setup_cached()  # the one linearised setup of this module
  return _setup(tmp_path_factory.mktemp(request.param), request.param)


def _context(tiny_setup, name):
  setup, tuner, data, full, w0 = tiny_setup
  return run_lib.method_context(setup, tuner, data, 0, methods.get(name), full, w0)


def _forget_loss(ctx, params) -> float:
  logits = train.predict(ctx.net, params, ctx.frozen, ctx.data.forget.x)
  return float(np.mean(train.per_example_loss(jnp.asarray(logits), ctx.data.forget.y,
                                              ctx.data.num_classes, "ce")))


def _strong_block(cfg, name):
  method = methods.get(name)
  return methods.block(tuning.with_overrides(cfg, method, STRONG[name]), method)


@pytest.mark.parametrize("name", COMPARISON)
def test_each_method_changes_only_the_collection_and_raises_the_forget_loss(tiny_setup, name):
  setup = tiny_setup[0]
  ctx = _context(tiny_setup, name)
  frozen_before = jax.tree_util.tree_map(np.array, ctx.frozen)
  full_before = jax.tree_util.tree_map(np.array, ctx.full)
  result = methods.get(name).run(ctx, _strong_block(setup.cfg, name))
  # The collection's structure, shapes and dtypes; nothing else returned or changed.
  assert jax.tree_util.tree_structure(result.params) == jax.tree_util.tree_structure(ctx.full)
  for new, old in zip(jax.tree_util.tree_leaves(result.params),
                      jax.tree_util.tree_leaves(ctx.full)):
    assert np.shape(new) == np.shape(old) and np.asarray(new).dtype == np.asarray(old).dtype
    assert np.all(np.isfinite(np.asarray(new)))
  jax.tree_util.tree_map(np.testing.assert_array_equal, ctx.frozen, frozen_before)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ctx.full, full_before)
  assert result.seconds is not None and result.seconds >= 0
  # Every method of the set claims to forget D_f: its loss goes up from Full's (which fits it).
  assert _forget_loss(ctx, ctx.full) < math.log(ctx.data.num_classes)  # better than chance
  assert _forget_loss(ctx, result.params) > _forget_loss(ctx, ctx.full) + 1e-4, name


def test_the_objective_trainer_equals_the_plain_trainer_on_plain_training(tiny_setup):
  """`fit_objective` with the plain loss is `train.fit` (same batches, optimiser, steps); in
  linearised mode it runs the tabulated f_lin, the plain trainer the forward-mode one."""
  ctx = _context(tiny_setup, "ft")
  spec = train.TrainSpec(epochs=3, learning_rate=0.05, batch_size=8, loss="ce",
                         weight_decay=5e-4)
  split = (ctx.data.retain.x, ctx.data.retain.y)
  plain, _, _ = train.fit(ctx.net, ctx.full, ctx.frozen, split, spec, ctx.data.num_classes,
                          seed=3)
  # The harness's fit (tabulated f_lin in linearised mode), seed 0 + offset 3.
  mine, _ = ctx.fit_objective(ctx.full, {"retain": split}, obj.lead_loss, spec, seed_offset=3)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                         mine, plain)


def test_the_tabulated_linearised_model_is_the_linearised_model():
  setup, tuner, data, full, w0 = _setup_cached()
  frozen = run_lib.frozen_of(tuner, full)
  rng = np.random.default_rng(0)
  w = jax.tree_util.tree_map(lambda a: a + 0.1 * rng.normal(size=np.shape(a)).astype(a.dtype),
                             full["trainable"])
  model, tab_frozen, rows = linear.tabulate(tuner.net, frozen, [data.retain.x, data.forget.x])
  direct = tuner.net.apply({**frozen, "trainable": w}, data.forget.x)
  tabulated = model.apply({**tab_frozen, "trainable": w}, rows[1])
  np.testing.assert_allclose(tabulated, direct, rtol=1e-4, atol=1e-5)
  assert linear.tabulate(tuner.net, frozen, [data.retain.x], max_bytes=10) is None


_CACHE = {}


def _setup_cached():
  if "lin" not in _CACHE:
    import tempfile  # pylint: disable=g-import-not-at-top
    _CACHE["lin"] = _setup(tempfile.mkdtemp(), "linearized")
  return _CACHE["lin"]


def test_negative_weight_one_and_no_l1_are_plain_fine_tuning():
  """NegGrad+ at α = 1 and l1-sparse at α = 0 reduce to FT (the same spec, seed, batches)."""
  setup, tuner, data, full, w0 = _setup_cached()
  cfg = setup.cfg
  runs = {}
  for name, extra in (("ft", {}), ("neggrad_plus", {"alpha": 1.0}), ("l1_sparse", {"alpha": 0.0})):
    method = methods.get(name)
    over = {"epochs": 2, "learning_rate": 0.05, "batch_size": 8, "weight_decay": 0.0, **extra}
    block = methods.block(tuning.with_overrides(cfg, method, over), method)
    ctx = run_lib.method_context(setup, tuner, data, 0, method, full, w0)
    # Same batch seed for the three: FT's seed offset.
    ctx = dataclasses.replace(ctx, fit_objective=_fixed_offset(ctx.fit_objective, 5))
    runs[name] = method.run(ctx, block).params
  for name in ("neggrad_plus", "l1_sparse"):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           runs[name], runs["ft"])


def _fixed_offset(fit_objective, offset):
  def fixed(*args, seed_offset, **kwargs):
    del seed_offset
    return fit_objective(*args, seed_offset=offset, **kwargs)
  return fixed


def test_per_example_gradients_match_a_gradient_per_example(tiny_setup):
  """Through the table (linearised) and by a vmapped gradient (standard)."""
  setup, tuner, data, full, w0 = tiny_setup
  frozen = run_lib.frozen_of(tuner, full)
  x, y = data.forget.x[:3], data.forget.y[:3]
  ctx = _context(tiny_setup, "ssd")
  rows = obj.per_example_gradients(ctx, full["trainable"], types.SimpleNamespace(x=x, y=y))
  np.testing.assert_allclose(  # the plain path, in blocks of 3
      objectives.per_example_gradients(tuner.net, full["trainable"], frozen, (x, y), loss="ce",
                                  batch_size=3), rows, rtol=1e-4, atol=1e-6)
  for i in range(3):
    def loss(w, i=i):
      z = tuner.net.apply({**frozen, "trainable": w}, x[i:i + 1])
      return train.per_example_loss(z, y[i:i + 1], data.num_classes, "ce")[0]
    g = jax.grad(loss)(full["trainable"])
    np.testing.assert_allclose(rows[i], obj.flat_params(g), rtol=1e-4, atol=1e-6)


def test_a_masked_entry_stays_exactly_where_it_is_with_weight_decay():
  setup, tuner, data, full, w0 = _setup_cached()
  frozen = run_lib.frozen_of(tuner, full)
  mask = jax.tree_util.tree_map(lambda a: (np.arange(np.size(a)).reshape(np.shape(a)) % 2
                                           ).astype(np.float32), full["trainable"])
  spec = train.TrainSpec(epochs=2, learning_rate=0.1, batch_size=8, loss="ce",
                         weight_decay=0.1)
  new, _ = objectives.fit_objective(tuner.net, full["trainable"], frozen,
                               {"retain": (data.retain.x, data.retain.y)}, obj.lead_loss, spec,
                               seed=0, grad_mask=mask)
  for a, b, m in zip(*(jax.tree_util.tree_leaves(t) for t in (new, full["trainable"], mask))):
    np.testing.assert_array_equal(np.asarray(a)[m == 0], np.asarray(b)[m == 0])
    assert np.any(np.asarray(a)[m == 1] != np.asarray(b)[m == 1])


def test_distillation_kl_and_bad_teachers_loss_are_the_references_formulas():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
  temp = 2.0
  soft = lambda z: np.exp(z / temp) / np.exp(z / temp).sum(-1, keepdims=True)
  expected = (soft(t) * (np.log(soft(t)) - np.log(soft(s)))).sum(-1) * temp ** 2
  np.testing.assert_allclose(obj.distillation_kl(jnp.asarray(s), jnp.asarray(t), temp),
                             expected, rtol=1e-5)
  # Bad Teacher: PyTorch's kl_div(log_softmax(s/T), softmax(t/T)), reduction "mean" (over B·C).
  from fastntk_jax.experiment.methods import bad_teacher  # pylint: disable=g-import-not-at-top
  from fastntk_jax.data.batches import Batch  # pylint: disable=g-import-not-at-top
  batch = Batch(x=np.zeros((4, 1)), y=np.arange(4), mask=np.ones(4, np.float32))
  value = bad_teacher.objective(lambda p, x: jnp.asarray(s), None, {"mixed": batch},
                                {"temperature": temp}, {"teacher": jnp.asarray(t)}, "ce", "mixed")
  torch_mean = np.mean(soft(t) * (np.log(soft(t)) - np.log(soft(s))))
  np.testing.assert_allclose(float(value), torch_mean, rtol=1e-5)


def test_ssd_importances_and_dampening_by_hand():
  grads = np.array([[1.0, 0.0], [3.0, 2.0], [-1.0, 4.0]])
  # One batch of all three rows: the squared mean gradient.
  np.testing.assert_allclose(ssd.importances(grads, 3, seed=0), [1.0, 4.0])
  # Batches of one row: the mean of the squared rows.
  np.testing.assert_allclose(ssd.importances(grads, 1, seed=0), [11 / 3, 20 / 3])
  theta = np.array([2.0, -3.0, 5.0, 1.0])
  imp_all = np.array([1.0, 1.0, 1.0, 0.0])
  imp_forget = np.array([5.0, 20.0, 0.5, 0.0])
  # alpha 10: only entry 1 (20 > 10) is dampened, by lam·1/20.
  np.testing.assert_allclose(ssd.dampen(theta, imp_all, imp_forget, alpha=10, lam=1),
                             [2.0, -3.0 / 20, 5.0, 1.0])
  # alpha 2: entries 0 and 1; lam 10 caps entry 0's factor at 1 (10/5 > 1).
  np.testing.assert_allclose(ssd.dampen(theta, imp_all, imp_forget, alpha=2, lam=10),
                             [2.0, -3.0 * 10 / 20, 5.0, 1.0])


def test_iu_woodfisher_direction_by_hand():
  g_f = np.array([[2.0, 0.0]])
  g_r = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  n_big = 2
  # v = (1/4)·(2, 0) − (1/(4·3))·(2, 2) = (1/3, −1/6); o = (1, 0).
  # g = (0, 1): t = 0, k·g = −1/6: k ← k + (1/6)/2·o = (1/3 + 1/12, −1/6); o unchanged.
  k = np.array([1 / 3 + 1 / 12, -1 / 6])
  # g = (1, 1): t = 1, k·g = 1/4: k ← k − (1/4)/3·o = (5/12 − 1/12, −1/6); o ← o − o/3.
  k = np.array([5 / 12 - 1 / 12, -1 / 6])
  np.testing.assert_allclose(iu.woodfisher_direction(g_f, g_r, n_big), k, rtol=1e-12)
  # N caps the recursion: with N = 1 only the second retain example updates k.
  np.testing.assert_allclose(iu.woodfisher_direction(g_f, g_r, 1),
                             [1 / 3 + (1 / 6) / 1, -1 / 6], rtol=1e-12)


def test_the_grid_and_the_choice_follow_the_stated_rule():
  assert tuning.grid({"a": (1, 2), "b": (3,)}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
  cfg = tiny_config()
  method = methods.get("iu")
  retrain = {"ua": 100.0, "ra": 100.0, "ta": 80.0, "mia_efficacy": 50.0}
  outcomes = {0.05: FloatingPointError("diverged"), 0.1: 1.0, 0.2: 3.0, 0.5: 1.0}

  def run_trial(trial_cfg):
    alpha = methods.block(trial_cfg, method).alpha
    outcome = outcomes[alpha]
    if isinstance(outcome, Exception):
      raise outcome
    return methods.Result({"w": np.array([outcome])}, 0.0)

  measure = lambda p: {**retrain, "ta": 80.0 + 4 * float(p["w"][0])}
  search = tuning.search(cfg, method, {"alpha": (0.05, 0.1, 0.2, 0.5)}, run_trial=run_trial,
                         measure=measure, retrain=retrain)
  gaps = [t["avg_gap"] for t in search["trials"]]
  assert gaps[0] is None and "diverged" in search["trials"][0]["error"]
  assert gaps[1:] == [1.0, 3.0, 1.0]  # |Δ TA| / 4
  assert search["chosen"] == {"alpha": 0.1}  # the smallest gap, the earlier of a tie
  tuned = tuning.tuned_config(cfg, [method], {"iu": search["chosen"]})
  assert tuned.baselines.iu.alpha == 0.1 and cfg.baselines.iu.alpha == 0.2  # a copy
  outcomes.update({0.1: FloatingPointError("x"), 0.2: FloatingPointError("x"),
                   0.5: FloatingPointError("x")})
  with pytest.raises(ValueError, match="every point of its search space failed"):
    tuning.search(cfg, method, {"alpha": (0.05, 0.1, 0.2, 0.5)}, run_trial=run_trial,
                  measure=measure, retrain=retrain)


@pytest.mark.parametrize("change, message", [
    ({"seed": 0}, "is a report seed"),
    ({"seed": run_lib.POPULATION_SEED_BASE + 1}, "seed of the KLoM population"),
    ({"max_trials": 4}, "above config.tuning.max_trials=4"),
    ({"mia_subsamples": 0}, "mia_subsamples=0 must be an int > 0"),
])
def test_a_tuning_that_could_read_a_report_seed_or_overspend_is_refused(change, message):
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.tuning.enabled = True
    cfg.eval.population_seeds = 4
    for k, v in change.items():
      cfg.tuning[k] = v
  with pytest.raises(ValueError, match=message):
    prepare_lib.prepare(cfg)


@pytest.mark.slow
def test_the_tuned_run_never_reads_a_report_seed_and_reports_its_choice(tmp_path, monkeypatch):
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.tuning.enabled = True
    cfg.tuning.mia_subsamples = 2
    cfg.methods = ("full", "retrain", "fastntk", "ssd", "iu")
    cfg.seeds = (0, 1)
  seen, in_tuning = [], [False]
  real_init, real_stage = finetune.FineTuner.__init__, run_lib.tuning_stage

  def spy_init(self, cfg, model, frozen_pre, w0, data, seed, **kwargs):
    if in_tuning[0]:
      seen.append(seed)
    real_init(self, cfg, model, frozen_pre, w0, data, seed, **kwargs)

  def spy_stage(*args, **kwargs):
    in_tuning[0] = True
    try:
      return real_stage(*args, **kwargs)
    finally:
      in_tuning[0] = False

  monkeypatch.setattr(finetune.FineTuner, "__init__", spy_init)
  monkeypatch.setattr(run_lib, "tuning_stage", spy_stage)
  results = run_lib.run(cfg, str(tmp_path), show_progress=False)
  assert seen and set(seen) == {cfg.tuning.seed}
  assert set(results["tuning"]) == {"ssd", "iu"}  # Fast-NTK: linearised, no λ to tune
  for name, search in results["tuning"].items():
    assert len(search["trials"]) <= cfg.tuning.max_trials
    chosen = search["chosen"]
    for field, value in chosen.items():  # the report seeds ran the chosen point
      assert results["config"]["baselines"][name][field] == value
  stored = json.load(open(tmp_path / "results.json"))
  assert stored["tuning"]["ssd"]["space"] == {"alpha": [1.0, 2.5, 5.0, 10.0, 25.0, 50.0,
                                                        100.0, 250.0], "lam": [0.1, 1.0]}
  md = open(tmp_path / "results.md").read()
  assert "## Fair tuning (validation seed 90000; its models are never reported)" in md
  assert "| SSD | alpha ∈ {1, 2.5, 5, 10, 25, 50, 100, 250}; lam ∈ {0.1, 1} | 16 |" in md
  assert "RTE per request (s) | precompute (s) | KLoM (P95) |" in md
  assert "**Standing**: Fast-NTK's Avg. Gap is" in md
  # The stored config is the user's (a resumed run compares against it), not the tuned one.
  claimed = json.load(open(tmp_path / "config.json"))
  assert claimed["baselines"]["ssd"]["alpha"] == 10.0


@pytest.mark.parametrize("name, field, value, message", [
    ("scrub", "bn_mode", "train", "baselines.scrub.bn_mode='train'.*set bn_mode='frozen'"),
    ("ft", "schedule", "cosine", "baselines.ft.schedule='cosine'"),
    ("max_loss", "warmup_epochs", 1.0, "baselines.max_loss.warmup_epochs=1.0"),
    ("bad_teacher", "temperature", math.inf, "temperature=inf must be a finite number"),
    ("ssd", "alpha", math.inf, "baselines.ssd.alpha=inf must be a finite number"),
    ("scrub", "gamma", math.inf, "baselines.scrub.gamma=inf"),
    ("l1_sparse", "alpha", math.nan, "baselines.l1_sparse.alpha=nan"),
    ("scrub", "max_steps", -1, r"max_steps=-1 must be a finite int"),
    ("bad_teacher", "loss", "mse", "Bad Teacher's loss is the KL"),
])
def test_a_bad_option_of_a_method_is_refused_before_any_work_naming_it(name, field, value,
                                                                      message):
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.methods = config_lib.DEFAULT_METHODS
    methods.block(cfg, methods.get(name))[field] = value
  with pytest.raises(ValueError, match=message):
    methods.checked_plugins(cfg)  # what prepare and --dry_run call


def test_the_tuning_fields_are_checked_by_validate_and_named_when_unused():
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.tuning.enabled = True
    cfg.tuning.seed = 1
    cfg.seeds = (0, 1)
  with pytest.raises(ValueError, match="tuning.seed=1 is a report seed"):
    config_lib.validate(cfg)  # --dry_run's check, before any import of JAX
  with cfg.unlocked():
    cfg.tuning.enabled = False
  notes = " ".join(config_lib.ignored_fields(config_lib.validate(cfg)))
  assert "tuning.seed, max_trials and mia_subsamples are not used" in notes
  with cfg.unlocked():
    cfg.tuning.enabled, cfg.tuning.seed, cfg.tuning.max_trials = True, 90_000, 4
  with pytest.raises(ValueError, match="above config.tuning.max_trials=4"):
    methods.checked_plugins(cfg)


def test_a_grid_value_of_the_wrong_kind_is_refused_and_strings_are_printed():
  from fastntk_jax.experiment import report  # pylint: disable=g-import-not-at-top
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.tuning.enabled = True
  method = dataclasses.replace(methods.get("ft"),
                               search_space=lambda c: {"epochs": (1, 2.5)})
  with pytest.raises(ValueError, match="gives 'epochs' the value 2.5"):
    methods._check_search_space(cfg, method)  # pylint: disable=protected-access
  method = dataclasses.replace(methods.get("ft"),
                               search_space=lambda c: {"optimizer": ("sgd", "adam")})
  methods._check_search_space(cfg, method)  # pylint: disable=protected-access
  results = {"config": {"tuning": {"max_trials": 16, "mia_subsamples": 10},
                        "data": {"draw_per_seed": False}},
             "tuning": {"ft": {"fields": ["optimizer"], "space": {"optimizer": ["sgd", "adam"]},
                               "trials": [{"avg_gap": 1.0, "seconds": 1.0},
                                          {"avg_gap": 0.5, "seconds": 2.0}],
                               "chosen": {"optimizer": "adam"}, "chosen_index": 1,
                               "criterion": "c", "seed": 9}}}
  text = "\n".join(report.tuning_lines(results))
  assert "optimizer ∈ {sgd, adam}" in text and "optimizer=adam" in text
  assert "not independent of the hold-out" in text  # the shared data is stated


def test_a_failing_point_scores_infinity_and_every_error_is_named():
  cfg = tiny_config()
  method = methods.get("iu")
  retrain = {"ua": 1.0, "ra": 1.0, "ta": 1.0, "mia_efficacy": 1.0}

  def run_trial(trial_cfg):
    alpha = methods.block(trial_cfg, method).alpha
    if alpha == 0.1:
      raise MemoryError("out of memory")  # not a ValueError: still one point's failure
    return methods.Result({"w": np.zeros(1)}, 0.0)

  search = tuning.search(cfg, method, {"alpha": (0.1, 0.2)}, run_trial=run_trial,
                         measure=lambda p: retrain, retrain=retrain)
  assert search["chosen"] == {"alpha": 0.2} and "MemoryError" in search["trials"][0]["error"]
  no_mia = {**retrain, "mia_efficacy": None}
  with pytest.raises(ValueError, match="Avg. Gap undefined: no mia_efficacy"):
    tuning.search(cfg, method, {"alpha": (0.2,)}, run_trial=run_trial,
                  measure=lambda p: no_mia, retrain=retrain)


def test_the_standing_line_says_untuned_and_names_undefined_gaps():
  from fastntk_jax.experiment import report  # pylint: disable=g-import-not-at-top
  stat = lambda v: {"mean": v, "std": 0.0, "per_seed": [v]}
  entry = lambda gap: {"avg_gap": stat(gap), "field_gaps": {k: stat(gap)
                                                             for k, _ in report.FIELD_METRICS}}
  results = {"methods": {"fastntk": entry(0.5), "iu": entry(1.0), "ssd": entry(None)}}
  line = report.standing_lines(results)[0]
  assert "best (untuned) competitor's is IU's, 1.00" in line
  assert "SSD: Avg. Gap undefined" in line
  results["methods"]["fastntk"] = entry(None)
  assert "no Avg. Gap to compare" in report.standing_lines(results)[0]


def test_the_objective_trainer_refuses_streams_it_cannot_run():
  setup, tuner, data, full, w0 = _setup_cached()
  frozen = run_lib.frozen_of(tuner, full)
  spec = train.TrainSpec(epochs=1, learning_rate=0.1, batch_size=8, loss="ce")
  streams = {"retain": (data.retain.x, data.retain.y)}
  fit = lambda **kw: objectives.fit_objective(tuner.net, full["trainable"], frozen, streams,
                                              obj.lead_loss, spec, seed=0, **kw)
  with pytest.raises(ValueError, match="batch_sizes names \\['forgt'\\]"):
    fit(batch_sizes={"forgt": 4})
  with pytest.raises(ValueError, match="must name one or more of the streams"):
    fit(passes=lambda epoch: ("forgt",))
  with pytest.raises(ValueError, match="must name one or more of the streams"):
    fit(passes=lambda epoch: ())


def test_ssd_and_iu_refuse_empty_sets():
  with pytest.raises(ValueError, match="no rows"):
    ssd.importances(np.zeros((0, 3)), 4, seed=0)
  with pytest.raises(ValueError, match="needs examples of D_f and D_r"):
    iu.woodfisher_direction(np.zeros((1, 3)), np.zeros((0, 3)), 10)
