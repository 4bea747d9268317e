"""The population engine (experiment/population.py) against the report seeds' own path, the
head-factorised tables against the network's Jacobian, and the per-seed audits' inputs
(MIA-Efficacy's spread, the relearning attack)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax import linalg
from fastntk_jax import mia
from fastntk_jax import models
from fastntk_jax import ntk
from fastntk_jax.experiment import finetune
from fastntk_jax.experiment import population
from fastntk_jax.experiment import prepare as prepare_lib
from fastntk_jax.experiment import pretrain
from fastntk_jax.experiment import progress as progress_lib
from fastntk_jax.experiment import run as run_lib
from fastntk_jax.models import trainable as tr
from fastntk_jax.unlearn import linear
from conftest import tiny_config

SHAPE = (8, 8, 3)


@pytest.mark.parametrize("name,options", [
    ("resnet8", {"shortcut": "B", "widths": (4, 8, 8)}),
    pytest.param("vit_ti16", {"patch_size": 4, "hidden_size": 8, "num_layers": 1,
                              "num_heads": 2, "mlp_dim": 8, "prompt_length": 2},
                 marks=pytest.mark.slow),
])
def test_head_factors_equal_the_networks_table(name, options):
  try:
    model = models.get_model(name, 5, **options)
  except (ValueError, TypeError) as e:
    pytest.skip(f"{name}: {e}")
  w, frozen = tr.split(tr.init_variables(model, SHAPE, 0))
  x = np.random.default_rng(0).normal(size=(6,) + SHAPE).astype(np.float32)
  factors = linear.head_factors(model, frozen, w, x)
  assert factors is not None
  apply = lambda ww, xx: model.apply({**frozen, "trainable": ww}, xx, train=False)
  for seed in (3, 4):
    w0 = tr.fresh_head(w, model, SHAPE, seed)
    f0, jac = factors.tables(w0["head"])
    ref = ntk.jacobian_rows(apply, w0, jnp.asarray(x))
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(np.asarray(jac), np.asarray(ref), atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(np.asarray(f0), np.asarray(apply(w0, x)), atol=1e-5, rtol=0)


class _ScaledHead(nn.Module):
  """A user model whose logits are not the head's output (tanh after the head)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    h = jnp.mean(x, axis=(1, 2))
    w = self.variable(tr.TRAINABLE, "scale", lambda: jnp.ones((h.shape[-1],))).value
    return jnp.tanh(models.layers.TrainableDense(3, name="head")(h * w))


def test_a_head_that_is_not_the_last_affine_step_takes_the_per_seed_path():
  model = _ScaledHead()
  w, frozen = tr.split(tr.init_variables(model, SHAPE, 0))
  x = np.random.default_rng(1).normal(size=(4,) + SHAPE).astype(np.float32)
  assert linear.head_factors(model, frozen, w, x) is None


def test_fresh_heads_are_fresh_head_per_seed():
  model = models.get_model("resnet8", 4, shortcut="B", widths=(4, 8, 8))
  w, _ = tr.split(tr.init_variables(model, SHAPE, 0))
  heads = population.fresh_heads(model, SHAPE, [7, 100_003])
  for i, seed in enumerate((7, 100_003)):
    one = tr.fresh_head(w, model, SHAPE, seed)["head"]
    for key in ("kernel", "bias"):
      np.testing.assert_array_equal(heads[key][i], one[key])


@pytest.fixture(scope="module")
def tiny_population(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("population"))
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.eval.population_seeds = 3
    cfg.methods = ("full", "retrain", "fastntk", "ft")
  with linalg.enable_x64(True):
    p = prepare_lib.prepare(cfg)
    progress = progress_lib.Progress(tmp, False)
    pretrained = pretrain.pretrain_stage(p.cfg, p.model, p.data, tmp, progress)
    w_pre, frozen_pre = tr.split(pretrained)
    setup = run_lib.Setup(cfg=p.cfg, workdir=tmp, model=p.model, frozen_pre=frozen_pre,
                          w_pre=w_pre, forgetter=run_lib.make_forgetter(
                              p.cfg, p.model, frozen_pre, p.data.num_classes),
                          methods=p.plugins, progress=progress, mesh=None)
    harness = population.Harness(method_context=run_lib.method_context,
                                 frozen_of=run_lib.frozen_of, make_fit=run_lib.make_fit,
                                 fine_tuner=finetune.FineTuner,
                                 released_frozen=finetune.released_frozen)
    pop = population.build(setup, p.data, harness)
    reference = {side: population._per_seed(harness, setup, p.data, pop.seeds[side][0],
                                             with_methods=side == "a")
                 for side in ("a", "b")}
    audits = population.audits(pop, p.data.forget.y)
  return pop, reference, audits


@pytest.mark.slow
def test_batched_population_equals_the_report_seeds_path(tiny_population):
  pop, reference, _ = tiny_population
  assert pop.engine == "batched"
  assert set(pop.logits) == {"full", "retrain", "fastntk", "ft", "retrain_b"}
  for name, (logits, ra, ta) in reference["a"].items():
    np.testing.assert_allclose(pop.logits[name][0], logits, atol=1e-5, rtol=0)
    assert pop.ra[name][0] == pytest.approx(ra) and pop.ta[name][0] == pytest.approx(ta)
  np.testing.assert_allclose(pop.logits["retrain_b"][0], reference["b"]["retrain"][0],
                             atol=1e-5, rtol=0)
  assert {v.shape[0] for v in pop.logits.values()} == {3}


@pytest.mark.slow
def test_fastntk_sits_on_the_noise_floor_of_every_audit(tiny_population):
  _, _, audits = tiny_population
  k, per = audits["klom"]["per_method"], audits["per_method"]
  assert k["fastntk"]["p95"] == pytest.approx(k["retrain"]["p95"], abs=1e-6)
  for audit, key in (("epsilon", "score"), ("ulira", "auc")):
    assert per["fastntk"][audit][key] == pytest.approx(per["retrain"][audit][key], abs=1e-6)
  assert audits["num_seeds"] == 3 and audits["engine"] == "batched"


def test_population_stages_resume_from_disk(tmp_path):
  calls = []
  path = str(tmp_path / "a_0.npz")
  value = population._npz_stage(path, lambda: calls.append(1) or {"x/logits": np.ones(2)})
  again = population._npz_stage(path, lambda: calls.append(1) or {"x/logits": np.zeros(2)})
  assert calls == [1]
  np.testing.assert_array_equal(value["x/logits"], again["x/logits"])


def test_mia_spread_contains_the_headline_and_flags_chance():
  rng = np.random.default_rng(0)
  z = lambda n: rng.normal(size=(n, 3))
  y = lambda n: rng.integers(0, 3, n)
  retain, test, forget = (z(40), y(40)), (z(20), y(20)), (z(10), y(10))
  spread = mia.mia_efficacy_spread(*retain, *test, *forget, subsamples=5)
  assert spread["values"][0] == mia.mia_efficacy(*retain, *test, *forget, seed=0)
  assert spread["min"] <= spread["values"][0] <= spread["max"]
  assert len(spread["values"]) == 5 and isinstance(spread["at_chance"], bool)
  assert spread["at_chance"] == (spread["svc_lift"] < mia.SVC_CHANCE_MARGIN)
  # 2 members against 50 non-members: an SVC calling everything non-member is right 96% of
  # the time on its training data and knows nothing; it is at chance.
  few = mia.mia_efficacy_spread(z(2), y(2), z(50), y(50), *forget, subsamples=3)
  assert few["at_chance"] and few["svc_lift"] < mia.SVC_CHANCE_MARGIN
  for bad in (0, 2.7, True):
    with pytest.raises(ValueError, match="subsamples"):
      mia.mia_efficacy_spread(*retain, *test, *forget, subsamples=bad)


class _Tempered(nn.Module):
  """A learnable temperature after the head: f = φW + b at its initial value 1 only."""
  clip: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    h = jnp.mean(x, axis=(1, 2)) * 10.0
    z = models.layers.TrainableDense(3, name="head")(h)
    if self.clip:
      return jnp.clip(z, -self.clip, self.clip)
    return z * self.variable(tr.TRAINABLE, "temperature", lambda: jnp.ones(())).value


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_head_factors_refuse_what_acts_after_the_head(clip):
  # A temperature after the head (f = φW + b at w0, J not), or a clip that only some rows
  # reach: the factorised tables would be wrong, so none are returned.
  model = _Tempered(clip=clip)
  w, frozen = tr.split(tr.init_variables(model, SHAPE, 0))
  x = np.random.default_rng(2).normal(size=(9,) + SHAPE).astype(np.float32)
  x[:2] *= 0.0  # the first rows alone would not reveal the clip
  assert linear.head_factors(model, frozen, w, x) is None


def test_audits_refuse_a_diverged_model_instead_of_reporting_nan():
  rng = np.random.default_rng(4)
  logits = {n: rng.normal(size=(4, 3, 2)).astype(np.float32)
            for n in ("fastntk", "retrain", "retrain_b")}
  logits["fastntk"][2, 1, 0] = np.nan
  acc = {n: np.full(4, 90.0) for n in logits}
  pop = population.Population(logits=logits, ra=acc, ta=acc, seeds={}, engine="batched",
                              seconds=0.0)
  with pytest.raises(FloatingPointError, match=r"fastntk's models of seeds \[2\]"):
    population.audits(pop, np.array([0, 1, 0]))
  logits["fastntk"][2, 1, 0] = 0.0
  assert set(population.audits(pop, np.array([0, 1, 0]))["per_method"]) == {"fastntk",
                                                                            "retrain"}


@pytest.mark.parametrize("bn_mode,augment,schedule", [("train", "crop_flip", "cosine"),
                                                      ("frozen", "none", "constant")])
def test_fit_seeds_equals_one_fit_per_seed(bn_mode, augment, schedule):
  from fastntk_jax import train as train_lib
  model = models.get_model("resnet8", 3, shortcut="B", widths=(4, 8, 8))
  w, frozen = tr.split(tr.init_variables(model, SHAPE, 0))
  rng = np.random.default_rng(2)
  split = (rng.normal(size=(11,) + SHAPE).astype(np.float32), rng.integers(0, 3, 11))
  spec = train_lib.TrainSpec(epochs=2, learning_rate=0.05, batch_size=4, bn_mode=bn_mode,
                             augment=augment, schedule=schedule, warmup_epochs=0.5,
                             weight_decay=1e-3)
  seeds = [5, 17]
  w0s = [tr.fresh_head(w, model, SHAPE, s) for s in seeds]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *w0s)
  params, stats, history = train_lib.fit_seeds(model, stacked, frozen, split, spec, 3,
                                               seeds=seeds)
  assert history.shape == (2, 2)
  for i, seed in enumerate(seeds):
    one, one_stats, one_history = train_lib.fit(model, w0s[i], frozen, split, spec, 3,
                                                seed=seed)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(one)):
      np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(one_stats)):
      np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(history[i], one_history, rtol=1e-5)
  # The seeds' batch orders differ: so do their models.
  assert not np.allclose(np.asarray(params["head"]["kernel"][0]),
                         np.asarray(params["head"]["kernel"][1]))


def test_fit_seeds_refuses_a_stack_of_other_size():
  from fastntk_jax import train as train_lib
  model = models.get_model("resnet8", 3, shortcut="B", widths=(4, 8, 8))
  w, frozen = tr.split(tr.init_variables(model, SHAPE, 0))
  stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), w)
  spec = train_lib.TrainSpec(epochs=1, learning_rate=0.1, batch_size=4)
  with pytest.raises(ValueError, match="stacked over"):
    train_lib.fit_seeds(model, stacked, frozen, (np.zeros((4,) + SHAPE, np.float32),
                                                 np.zeros(4, np.int32)), spec, 3, seeds=[1, 2, 3])


@pytest.mark.slow
def test_sgd_population_equals_the_report_seeds_path(tmp_path, monkeypatch):
  monkeypatch.setattr(population, "SGD_VMAP_ON_CPU", True)
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.eval.population_seeds = 3
    cfg.methods = ("full", "retrain", "fastntk", "ft")
    cfg.finetune.mode = "standard"
    cfg.finetune.bn_mode = "train"
  with linalg.enable_x64(True):
    p = prepare_lib.prepare(cfg)
    progress = progress_lib.Progress(str(tmp_path), False)
    pretrained = pretrain.pretrain_stage(p.cfg, p.model, p.data, str(tmp_path), progress)
    w_pre, frozen_pre = tr.split(pretrained)
    setup = run_lib.Setup(cfg=p.cfg, workdir=str(tmp_path), model=p.model,
                          frozen_pre=frozen_pre, w_pre=w_pre, forgetter=run_lib.make_forgetter(
                              p.cfg, p.model, frozen_pre, p.data.num_classes),
                          methods=p.plugins, progress=progress, mesh=None)
    released = []

    def released_frozen(tuner, data, name, params, frozen, seed):
      released.append((seed, name))
      return finetune.released_frozen(tuner, data, name, params, frozen, seed)

    harness = population.Harness(method_context=run_lib.method_context,
                                 frozen_of=run_lib.frozen_of, make_fit=run_lib.make_fit,
                                 fine_tuner=finetune.FineTuner, released_frozen=released_frozen)
    pop = population.build(setup, p.data, harness)
    assert pop.engine == "batched_sgd"
    # Every model is evaluated as released: its BN statistics from the data it may see.
    assert sorted(released) == sorted(
        [(s, n) for s in pop.seeds["a"] for n in ("full", "retrain", "fastntk", "ft")]
        + [(s, "retrain") for s in pop.seeds["b"]])
    for side, name_b in (("a", None), ("b", "retrain_b")):
      seed = pop.seeds[side][2]  # the last seed of the chunk: its own batch order
      reference = population._per_seed(harness, setup, p.data, seed, with_methods=side == "a")
      for name, (logits, ra, ta) in reference.items():
        key = name_b or name
        np.testing.assert_allclose(pop.logits[key][2], logits, atol=1e-4, rtol=0)
        assert pop.ra[key][2] == pytest.approx(ra) and pop.ta[key][2] == pytest.approx(ta)


def _fake_population_chunk(harness, setup, data, chunk_seeds, with_methods):
  """`_sgd_chunk`'s records, each model's logits its seed (which seed a row holds)."""
  del harness, setup, data
  names = ("full", "retrain", "fastntk") if with_methods else ("retrain",)
  return [{name: (np.full((2, 4), float(seed), np.float32), 50.0, 50.0) for name in names}
          for seed in chunk_seeds]


def test_a_resumed_population_reads_no_chunk_of_other_seeds(tmp_path, monkeypatch):
  # A run resumed with another chunking (the per-seed engine of a run on several devices,
  # or the SGD engine's chunk from another backend's count of a step's memory) must not
  # read `population/<side>_<k>.npz` as the chunk of other seeds: every row is its seed's.
  import types
  monkeypatch.setattr(population, "SGD_VMAP_ON_CPU", True)
  cfg = tiny_config("tiny,standard")
  with cfg.unlocked():
    cfg.eval.population_seeds = 3
    cfg.methods = ("full", "retrain", "fastntk")
  monkeypatch.setattr(population, "_sgd_chunk", _fake_population_chunk)
  monkeypatch.setattr(population, "_per_seed", lambda h, s, d, seed, with_methods:
                      _fake_population_chunk(h, s, d, [seed], with_methods)[0])
  for size, devices in ((3, 1), (2, 1), (1, 2), (3, 1)):
    monkeypatch.setattr(population, "sgd_chunk_size", lambda setup, data, n, size=size: size)
    setup = types.SimpleNamespace(cfg=cfg, workdir=str(tmp_path), methods=[],
                                  mesh=None if devices == 1 else types.SimpleNamespace(size=2))
    pop = population.build(setup, None, None)
    assert pop.engine == ("batched_sgd" if devices == 1 else "per_seed")
    for name, side in (("full", "a"), ("retrain", "a"), ("fastntk", "a"), ("retrain_b", "b")):
      np.testing.assert_array_equal(pop.logits[name][:, 0, 0], pop.seeds[side])
      assert pop.ra[name].shape == (3,)


@pytest.mark.parametrize("options", [{"head_only": True}, {"optimizer": "adam"}])
def test_step_memory_bytes_counts_the_step_it_is_asked_about(options):
  # The step's own optimiser (head_only: its frozen leaves' masked state), not another one
  # whose state the step cannot take: XLA's count, not "not reported".
  from fastntk_jax import train as train_lib
  model = models.get_model("resnet8", 3, shortcut="B", widths=(4, 8, 8))
  w, frozen = tr.split(tr.init_variables(model, SHAPE, 0))
  plain = train_lib.TrainSpec(epochs=1, learning_rate=0.1, batch_size=4)
  spec = train_lib.TrainSpec(epochs=1, learning_rate=0.1, batch_size=4, **options)
  reference = train_lib.step_memory_bytes(model, plain, 3, w, frozen, (4,) + SHAPE)
  if reference is None:
    pytest.skip("this backend does not report a compiled program's memory")
  assert train_lib.step_memory_bytes(model, spec, 3, w, frozen, (4,) + SHAPE) > 0



_MESH_RESUME_CHILD = """
import os, tempfile, types
import jax, numpy as np
from fastntk_jax import batch_stats, models, sharding, train
from fastntk_jax.experiment import pretrain, stages
from fastntk_jax.models import checkpoints
from fastntk_jax.models import trainable as tr
shape = (8, 8, 3)
model = models.get_model("resnet8", 3, shortcut="B", widths=(4, 8, 8))
work = tempfile.mkdtemp()
checkpoints.save_checkpoint(os.path.join(work, "pretrain"),
                            tr.init_variables(model, shape, 10_000))
# A resumed run: the backbone and a report seed's Full read back from disk.
pre = pretrain.pretrain_stage(None, model, types.SimpleNamespace(image_shape=shape), work,
                              None)
w, frozen = tr.split(pre)
path = os.path.join(work, "full")
stages.array_stage(path, {"trainable": w}, lambda: {"trainable": w})
full = stages.array_stage(path, {"trainable": w}, None)["trainable"]
for leaf in jax.tree_util.tree_leaves((pre, full)):  # host arrays, as a fresh run's
  assert isinstance(leaf, np.ndarray), type(leaf)
rng = np.random.default_rng(0)
x, y = rng.normal(size=(6,) + shape).astype(np.float32), rng.integers(0, 3, 6)
spec = train.TrainSpec(epochs=1, learning_rate=0.05, batch_size=4, bn_mode="train")
params, stats, _ = train.fit(model, full, frozen, (x, y), spec, 3, seed=1,
                             mesh=sharding.make_data_mesh())
# Evaluated as released (its statistics recomputed), as the population's per-seed path does.
released = {**frozen, "batch_stats": batch_stats.recompute_batch_stats(
    model, params, {**frozen, "batch_stats": stats}, x, batch_size=4)}
assert np.all(np.isfinite(train.predict(model, params, released, x, batch_size=4)))
print("OK")
"""


@pytest.mark.slow
def test_a_run_resumed_on_a_mesh_takes_its_restored_weights_with_the_mesh_fits():
  # A run on several devices resumed after its pre-training stage (the per-seed population
  # on a mesh, or a report seed): the backbone and stages read back from disk are host
  # arrays, as in a fresh run, not arrays committed to one device that no jitted call can
  # take together with a mesh fit's replicated params and statistics.
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip())
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", _MESH_RESUME_CHILD], env=env, cwd=repo,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_the_cpu_takes_the_per_seed_sgd_engine_unless_asked():
  import types
  cfg = tiny_config("tiny,standard")
  assert population.sgd_engine_applies(cfg) == (population.jax.default_backend() != "cpu")
  assert not population.sgd_engine_applies(cfg, types.SimpleNamespace(size=2))
