"""Train-mode BatchNorm takes its batch statistics over real rows only (no padded rows); a
released model's running statistics are recomputed from the data its method may see."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from fastntk_jax import batch_stats
from fastntk_jax import train as train_lib
from fastntk_jax.experiment import evaluate
from fastntk_jax.experiment import finetune
from fastntk_jax.experiment import methods as methods_lib
from fastntk_jax.experiment import prepare as prepare_lib
from fastntk_jax.experiment import progress as progress_lib
from fastntk_jax.experiment import run as run_lib
from fastntk_jax.experiment.methods import fastntk
from fastntk_jax.models import trainable as tr
from fastntk_jax.models.layers import BatchNorm, TrainableDense


class BNHead(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return TrainableDense(3, name="head")(BatchNorm(name="bn")(x, train))


def test_running_statistics_ignore_padding_of_the_last_batch():
  rng = np.random.default_rng(0)
  n, bs, seed = 10, 8, 3  # batches of 8 and 2 real rows
  x = rng.normal(loc=2.0, size=(n, 4)).astype(np.float32)
  y = rng.integers(0, 3, n)
  model = BNHead()
  w0, frozen = tr.split(model.init(jax.random.PRNGKey(0), x[:1]))
  spec = train_lib.TrainSpec(epochs=1, learning_rate=0.0, batch_size=bs, bn_mode="train")
  _, stats, _ = train_lib.fit(model, w0, frozen, (x, y), spec, 3, seed=seed)
  # The reference: the same batch order, each batch's mean over its real rows only.
  order = np.random.default_rng([seed, 0]).permutation(n)
  mean = np.zeros(4)
  var = np.ones(4)
  for rows in (order[:bs], order[bs:]):
    mean = 0.9 * mean + 0.1 * x[rows].mean(axis=0)
    var = 0.9 * var + 0.1 * x[rows].var(axis=0)
  np.testing.assert_allclose(np.asarray(stats["bn"]["mean"]), mean, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats["bn"]["var"]), var, rtol=1e-5)


def test_frozen_bn_still_pads_and_masks():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(10, 4)).astype(np.float32)
  y = rng.integers(0, 3, 10)
  model = BNHead()
  w0, frozen = tr.split(model.init(jax.random.PRNGKey(0), x[:1]))
  spec = train_lib.TrainSpec(epochs=1, learning_rate=0.1, batch_size=8, bn_mode="frozen")
  w, stats, hist = train_lib.fit(model, w0, frozen, (x, y), spec, 3, seed=0)
  assert np.all(np.asarray(stats["bn"]["mean"]) == 0) and np.isfinite(hist[0])


# ------------------------------------------------------------------------------------------
# The released model's running statistics (`batch_stats.recompute_batch_stats`, the harness's
# `finetune.release_bn_stats`): from the data its method may see, never Full's of D.
# ------------------------------------------------------------------------------------------


class ConvBN(nn.Module):
  """One conv, two BatchNorms (the second sees the first's train-mode output), a head."""
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train=False):
    z = nn.Conv(3, (3, 3), padding="VALID", use_bias=False, name="conv")(x)
    a = nn.relu(BatchNorm(self.momentum, name="bn1")(z, train))
    b = BatchNorm(self.momentum, name="bn2")(a, train)
    return TrainableDense(2, name="head")(b.mean(axis=(1, 2)))


def _numpy_bn_update(x, kernel, trainable, order, batch_size, eps=1e-5):
  """The reference, in float64 numpy: per batch, the conv, the moments of bn1's input, bn1
  normalising with them, the moments of bn2's input; averaged weighted by the batch's rows."""
  sums = {k: 0.0 for k in ("m1", "v1", "m2", "v2")}
  for start in range(0, len(order), batch_size):
    xb = x[order[start:start + batch_size]].astype(np.float64)
    h, w = xb.shape[1] - 2, xb.shape[2] - 2
    z = sum(np.einsum("nhwc,co->nhwo", xb[:, i:i + h, j:j + w], kernel[i, j])
            for i in range(3) for j in range(3))
    m1 = z.mean(axis=(0, 1, 2))
    v1 = ((z - m1) ** 2).mean(axis=(0, 1, 2))
    bn1 = trainable["bn1"]
    a = np.maximum((z - m1) / np.sqrt(v1 + eps) * bn1["scale"] + bn1["bias"], 0.0)
    m2 = a.mean(axis=(0, 1, 2))
    v2 = ((a - m2) ** 2).mean(axis=(0, 1, 2))
    for key, value in (("m1", m1), ("v1", v1), ("m2", m2), ("v2", v2)):
      sums[key] = sums[key] + len(xb) * value
  return {k: v / len(order) for k, v in sums.items()}


def _conv_bn_setup(n=10):
  rng = np.random.default_rng(5)
  x = rng.normal(loc=1.0, size=(n, 5, 5, 2)).astype(np.float32)
  w0, frozen = tr.split(ConvBN().init(jax.random.PRNGKey(0), x[:1]))
  # BN scale/bias away from 1/0 (they shape bn2's input) and running statistics that are
  # anything but the answer (the result must not depend on them).
  w0 = jax.tree_util.tree_map(
      lambda a: np.asarray(a) + rng.normal(scale=0.5, size=np.shape(a)).astype(np.float32), w0)
  frozen = {**frozen, "batch_stats": jax.tree_util.tree_map(
      lambda a: np.abs(rng.normal(size=np.shape(a))).astype(np.float32) + 3.0,
      frozen["batch_stats"])}
  return x, w0, frozen


def test_recomputed_statistics_equal_a_numpy_pass_with_a_last_partial_batch():
  x, w0, frozen = _conv_bn_setup(n=10)
  seed, bs = 4, 4  # batches of 4, 4 and 2 rows
  stats = batch_stats.recompute_batch_stats(ConvBN(), w0, frozen, x, batch_size=bs, seed=seed)
  order = np.random.default_rng([seed, 0]).permutation(len(x))  # `iterate_batches`' shuffle
  ref = _numpy_bn_update(x, np.asarray(frozen["params"]["conv"]["kernel"], np.float64),
                         jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), w0),
                         order, bs)
  got = {"m1": stats["bn1"]["mean"], "v1": stats["bn1"]["var"],
         "m2": stats["bn2"]["mean"], "v2": stats["bn2"]["var"]}
  for key in ref:
    assert got[key].dtype == np.float32
    np.testing.assert_allclose(got[key], ref[key], rtol=2e-5, atol=1e-6, err_msg=key)
  # The last batch weighs 2/4 of a full one: not the plain mean of the three batches' moments.
  plain = _numpy_bn_update(x, np.asarray(frozen["params"]["conv"]["kernel"], np.float64),
                           jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), w0),
                           order[:8], bs)
  assert not np.allclose(plain["m1"], ref["m1"], rtol=1e-3)


def test_recomputed_statistics_ignore_momentum_and_the_statistics_they_replace():
  x, w0, frozen = _conv_bn_setup(n=9)
  a = batch_stats.recompute_batch_stats(ConvBN(), w0, frozen, x, batch_size=4, seed=1)
  # Another momentum, other running statistics in: the same result up to float round-off.
  other = {**frozen, "batch_stats": jax.tree_util.tree_map(np.zeros_like, frozen["batch_stats"])}
  b = batch_stats.recompute_batch_stats(ConvBN(momentum=0.3), w0, other, x, batch_size=4, seed=1)
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7),
                         a, b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(frozen["batch_stats"])
  # One batch: the batch's own moments (what the EMA of training would only approach).
  one = batch_stats.recompute_batch_stats(ConvBN(), w0, frozen, x, batch_size=len(x))
  kernel = np.asarray(frozen["params"]["conv"]["kernel"], np.float64)
  ref = _numpy_bn_update(x, kernel, jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64),
                                                           w0), np.arange(len(x)), len(x))
  np.testing.assert_allclose(one["bn1"]["var"], ref["v1"], rtol=2e-5)


class _UserBN(nn.Module):
  """A user's model: Flax's own BatchNorm (momentum 0.99), not the package's."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Conv(3, (3, 3), name="conv")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.99, name="bn")(h)
    return TrainableDense(2, name="head")(jnp.mean(h, axis=(1, 2)))


def test_recompute_takes_any_flax_batchnorm_and_refuses_one_that_never_updates():
  model = _UserBN()
  x = np.random.default_rng(3).normal(size=(7, 5, 5, 2)).astype(np.float32)
  w, frozen = tr.split(model.init(jax.random.PRNGKey(0), x[:1]))
  stats = batch_stats.recompute_batch_stats(model, w, frozen, x, batch_size=len(x))
  conv = frozen["params"]["conv"]
  h = np.asarray(nn.Conv(3, (3, 3)).apply({"params": conv}, x), np.float64)
  np.testing.assert_allclose(stats["bn"]["mean"], h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["bn"]["var"], h.var(axis=(0, 1, 2)), rtol=1e-4)

  class Still(nn.Module):  # momentum 1: the running statistics never move
    @nn.compact
    def __call__(self, x, train: bool = False):
      h = nn.BatchNorm(use_running_average=not train, momentum=1.0, name="bn")(x)
      return TrainableDense(2, name="head")(jnp.mean(h, axis=(1, 2)))

  still = Still()
  w, frozen = tr.split(still.init(jax.random.PRNGKey(0), x[:1]))
  with pytest.raises(ValueError, match="never moved"):
    batch_stats.recompute_batch_stats(still, w, frozen, x, batch_size=4)


def test_recompute_refuses_a_model_without_statistics_and_an_empty_pass():
  x, w0, frozen = _conv_bn_setup(n=4)
  with pytest.raises(ValueError, match="no BatchNorm running statistics"):
    batch_stats.recompute_batch_stats(ConvBN(), w0, {"params": frozen["params"]}, x, batch_size=2)
  with pytest.raises(ValueError, match="no rows"):
    batch_stats.recompute_batch_stats(ConvBN(), w0, frozen, x[:0], batch_size=2)


def _tiny_standard(tmp_path):
  """The `:tiny,standard` run's pieces (the Forgetter, the harness's Setup) and its data, on
  a backbone at its initialisation (pre-training does not matter here)."""
  cfg = tiny_config("tiny,standard")
  with cfg.unlocked():
    cfg.methods = ("full", "retrain", "fastntk")
  p = prepare_lib.prepare(cfg)
  progress = progress_lib.Progress(str(tmp_path), False)
  w_pre, frozen_pre = tr.split(tr.init_variables(p.model, p.data.image_shape, seed=0))
  setup = run_lib.Setup(cfg=p.cfg, workdir=str(tmp_path), model=p.model, frozen_pre=frozen_pre,
                        w_pre=w_pre, forgetter=run_lib.make_forgetter(
                            p.cfg, p.model, frozen_pre, p.data.num_classes),
                        methods=p.plugins, progress=progress, mesh=None)
  return setup, p.data


def _full_and_fastntk(setup, data, with_fastntk=True):
  """(tuner, Full, Fast-NTK's params or None) of seed 0 on `data`, as `run.run_seed` makes
  them."""
  w0 = tr.fresh_head(setup.w_pre, setup.model, data.image_shape, 0)
  tuner = finetune.FineTuner(setup.cfg, setup.model, setup.frozen_pre, w0, data, 0,
                             forgetter=setup.forgetter,
                             fit=run_lib.make_fit(setup, data.num_classes), mesh=None)
  full, _ = tuner.fit(data.train, "full")
  if not with_fastntk:
    return tuner, full, None
  ctx = run_lib.method_context(setup, tuner, data, 0, fastntk.METHOD, full, w0)
  params = fastntk.METHOD.run(ctx, methods_lib.block(setup.cfg, fastntk.METHOD)).params
  return tuner, full, params


def test_fastntk_released_bn_statistics_are_independent_of_the_forget_set(tmp_path):
  """The acceptance test (issue 25): in standard fine-tuning with train-mode BN, D_f replaced
  by other images (D_r the same) changes Full's running statistics, but not those of
  Fast-NTK's released model at the same parameters: the harness recomputes them on D_r.
  (Without the recomputation Fast-NTK kept Full's statistics of D, and this test fails.)"""
  setup, data_a = _tiny_standard(tmp_path)
  forget = data_a.forget
  data_b = dataclasses.replace(data_a, forget=dataclasses.replace(
      forget, x=np.ascontiguousarray(forget.x[:, :, ::-1] * 0.5 + 0.25)))  # other images
  tuner_a, full_a, fast_a = _full_and_fastntk(setup, data_a)
  tuner_b, full_b, _ = _full_and_fastntk(setup, data_b, with_fastntk=False)
  leaves = lambda tree: [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]
  # Full's statistics of D hold D_f: other forget images, other statistics.
  assert any(not np.allclose(a, b) for a, b in zip(leaves(full_a["batch_stats"]),
                                                   leaves(full_b["batch_stats"])))
  released, notes = {}, {}
  for tag, tuner, data, full in (("a", tuner_a, data_a, full_a), ("b", tuner_b, data_b, full_b)):
    frozen_full = run_lib.frozen_of(tuner, full)
    # Fast-NTK at the same parameters, started from this data's Full (as `run_seed` has it),
    # and Full's parameters of data A: the harness forms their released models.
    models_of = {"full": (full_a["trainable"], frozen_full), "fastntk": (fast_a, frozen_full)}
    notes[tag] = finetune.release_bn_stats(
        tuner, data, 0, str(tmp_path / tag), models_of,
        measure=lambda p, fr: evaluate.accuracies(tuner.net, p, fr, data, batch_size=32))
    released[tag] = {name: frozen["batch_stats"] for name, (_, frozen) in models_of.items()}
  jax.tree_util.tree_map(np.testing.assert_array_equal, released["a"]["fastntk"],
                         released["b"]["fastntk"])
  # Full's (the same parameters, recomputed on D) still differ: D is its data.
  assert any(not np.allclose(a, b) for a, b in zip(leaves(released["a"]["full"]),
                                                   leaves(released["b"]["full"])))
  for tag, data in (("a", data_a), ("b", data_b)):
    assert notes[tag]["fastntk"]["data"] == "D_r" and notes[tag]["full"]["data"] == "D"
    assert notes[tag]["fastntk"]["rows"] == data.retain.size
    assert set(notes[tag]["fastntk"]["before"]) == {"ua", "ra", "ta"}
    # The stage on disk is what the released model carries.
    restored = run_lib.stages.array_stage(str(tmp_path / tag / "fastntk_bn_stats"),
                                          full_a["batch_stats"], lambda: 1 / 0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, released[tag]["fastntk"])


def test_linearized_and_frozen_bn_keep_the_pretrained_statistics():
  """Linearised fine-tuning (f_lin at w0 with the pre-trained statistics) and frozen BN leave
  every model's statistics as pre-trained, so nothing is recomputed."""
  for arg, bn_mode in (("tiny", "frozen"), ("tiny,standard", "frozen"),
                       ("tiny,standard", "train")):
    cfg = tiny_config(arg)
    with cfg.unlocked():
      cfg.finetune.bn_mode = bn_mode
    stats = {"bn": {"mean": np.zeros(2, np.float32), "var": np.ones(2, np.float32)}}
    tuner = finetune.FineTuner(cfg, BNHead(), {"params": {}, "batch_stats": stats},
                               {"head": {}}, None, 0, forgetter=None, fit=None)
    frozen = {"batch_stats": stats}
    expected = cfg.finetune.mode == "standard" and bn_mode == "train"
    assert finetune.recomputes_bn(tuner) is expected, (arg, bn_mode)
    if not expected:
      assert finetune.released_frozen(tuner, None, "fastntk", None, frozen, 0) is frozen


def test_recompute_takes_batches_of_one_row_of_a_layer_without_spatial_axes():
  """A BatchNorm over features only (an MLP's): a batch of one row has variance 0 in every
  channel (the last partial batch of 5 rows in batches of 4, or a single row); its running
  statistics still moved (to m·r), so they are recomputed, not refused as never moved."""
  rng = np.random.default_rng(2)
  x = rng.normal(loc=1.0, size=(5, 4)).astype(np.float32)
  model = BNHead()
  w, frozen = tr.split(model.init(jax.random.PRNGKey(0), x[:1]))
  seed, bs = 1, 4
  stats = batch_stats.recompute_batch_stats(model, w, frozen, x, batch_size=bs, seed=seed)
  order = np.random.default_rng([seed, 0]).permutation(len(x))
  batches = [x[order[:bs]].astype(np.float64), x[order[bs:]].astype(np.float64)]
  mean = sum(len(b) * b.mean(axis=0) for b in batches) / len(x)
  var = sum(len(b) * b.var(axis=0) for b in batches) / len(x)
  np.testing.assert_allclose(stats["bn"]["mean"], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["bn"]["var"], var, rtol=1e-5, atol=1e-6)
  one = batch_stats.recompute_batch_stats(model, w, frozen, x[:1], batch_size=bs)
  np.testing.assert_allclose(one["bn"]["mean"], x[0], rtol=1e-5)
  np.testing.assert_array_equal(one["bn"]["var"], np.zeros(4, np.float32))


class _SharedBN(nn.Module):
  """One BatchNorm called twice in a forward pass (on x and on 2x + 1)."""
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train=False):
    bn = BatchNorm(self.momentum, name="bn")
    return TrainableDense(2, name="head")(bn(x, train) + bn(2.0 * x + 1.0, train))


def test_a_layer_called_twice_gets_the_mean_of_its_calls_moments_whatever_its_momentum():
  """The running statistics of a layer called twice per pass are the mean of the two calls'
  moments (as training's EMA would settle to with both calls weighing alike), not a mix
  weighted by the momentum: the result does not depend on the momentum."""
  x = np.random.default_rng(4).normal(size=(6, 3)).astype(np.float32)
  calls = [x.astype(np.float64), 2.0 * x.astype(np.float64) + 1.0]
  for momentum in (0.9, 0.3):
    model = _SharedBN(momentum)
    w, frozen = tr.split(model.init(jax.random.PRNGKey(0), x[:1]))
    stats = batch_stats.recompute_batch_stats(model, w, frozen, x, batch_size=len(x))
    np.testing.assert_allclose(stats["bn"]["mean"], np.mean([c.mean(0) for c in calls], 0),
                               rtol=1e-5, err_msg=str(momentum))
    np.testing.assert_allclose(stats["bn"]["var"], np.mean([c.var(0) for c in calls], 0),
                               rtol=1e-5, err_msg=str(momentum))


def test_a_diverged_model_is_named_not_blamed_on_its_batchnorm():
  """A method whose parameters diverged (NaN) gives non-finite batch moments: the error says
  so and names the method, instead of calling its BatchNorm one that is not updated as
  m·r + (1 - m)·batch."""
  import types  # pylint: disable=g-import-not-at-top
  x, w0, frozen = _conv_bn_setup(n=6)
  bad = jax.tree_util.tree_map(lambda a: np.full_like(a, np.nan), w0)
  with pytest.raises(ValueError, match="non-finite"):
    batch_stats.recompute_batch_stats(ConvBN(), bad, frozen, x, batch_size=4)
  cfg = types.SimpleNamespace(finetune=types.SimpleNamespace(bn_mode="train", batch_size=4))
  tuner = types.SimpleNamespace(net=ConvBN(), cfg=cfg, linearized=False, frozen_net=frozen)
  data = types.SimpleNamespace(retain=types.SimpleNamespace(x=x), train=types.SimpleNamespace(x=x))
  with pytest.raises(ValueError, match="max_loss.*non-finite"):
    finetune.released_frozen(tuner, data, "max_loss", bad, frozen, 0)


def test_recompute_takes_frozen_dicts():
  """Variables as Flax's FrozenDicts (what `flax.core.freeze`, and older Flax's `init`, give)
  recompute to the statistics of plain dicts (the two passes' trees were matched against
  the FrozenDict and failed: 'Custom node type mismatch')."""
  import flax  # pylint: disable=g-import-not-at-top
  x, w0, frozen = _conv_bn_setup(n=6)
  plain = batch_stats.recompute_batch_stats(ConvBN(), w0, frozen, x, batch_size=4)
  frozen_dicts = batch_stats.recompute_batch_stats(ConvBN(), flax.core.freeze(w0),
                                                 flax.core.freeze(frozen), x, batch_size=4)
  jax.tree_util.tree_map(np.testing.assert_array_equal, flax.core.unfreeze(frozen_dicts),
                         plain)
