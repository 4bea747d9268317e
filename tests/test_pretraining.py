"""CIFAR pre-training as users expect it: crop + flip augmentation, warm-up and step/cosine
schedules, weight decay, the backbone's test accuracy, and one pre-training shared by every
run that needs the same backbone (the content-addressed cache)."""

import json
import os
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax import config as config_lib
from fastntk_jax import data as data_lib
from fastntk_jax.experiment import pretrain as pretraining
from fastntk_jax.experiment import report
from fastntk_jax import train as train_lib
from fastntk_jax.models.layers import TrainableDense

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(name, arg=None):
  path = os.path.join(ROOT, "configs", name)
  return config_lib.load_config_file(path + (f":{arg}" if arg else ""))


# ------------------------------------------------------------------ augmentation


def test_random_crop_flip_is_a_padded_crop_or_its_mirror():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 6, 5, 3)).astype(np.float32)
  out = data_lib.random_crop_flip(x, np.random.default_rng(1), pad=2)
  assert out.shape == x.shape and out.dtype == x.dtype
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  flips = shifts = 0
  for i in range(len(x)):
    crops = {(dy, dx, f): (padded[i, dy:dy + 6, dx:dx + 5, :][:, ::-1] if f
                           else padded[i, dy:dy + 6, dx:dx + 5, :])
             for dy in range(5) for dx in range(5) for f in (False, True)}
    match = [k for k, c in crops.items() if np.array_equal(c, out[i])]
    assert match, f"image {i} is no crop of its padded self"
    flips += match[0][2]
    shifts += (match[0][0], match[0][1]) != (2, 2)
  assert 16 < flips < 48 and shifts > 40  # both happen, at about their rates
  # Same generator state, same result (a resumed fit sees the same batches); pad 0 without
  # flips is the identity.
  np.testing.assert_array_equal(out, data_lib.random_crop_flip(x, np.random.default_rng(1), pad=2))
  same = data_lib.random_crop_flip(x[:1], np.random.default_rng(3), pad=0)
  assert np.array_equal(same, x[:1]) or np.array_equal(same, x[:1, :, ::-1])
  with pytest.raises(ValueError, match="expects \\(n, H, W, C\\)"):
    data_lib.random_crop_flip(x[0], rng)


# ------------------------------------------------------------------ schedules


def _spec(**kw):
  base = dict(epochs=10, learning_rate=0.1, batch_size=8)
  return train_lib.TrainSpec(**{**base, **kw})


def test_learning_rate_schedules():
  steps = 4  # per epoch
  assert train_lib.learning_rate_schedule(_spec(), steps) == 0.1  # constant: a float
  step = train_lib.learning_rate_schedule(
      _spec(schedule="step", decay_epochs=(5, 8), decay_factor=0.1, warmup_epochs=1), steps)
  lr = lambda f, t: float(f(jnp.asarray(t)))
  # Warm-up: lr/4, 2lr/4, 3lr/4, then lr from step 4 (epoch 1) on; never 0.
  np.testing.assert_allclose([lr(step, t) for t in range(5)], [0.025, 0.05, 0.075, 0.1, 0.1],
                             rtol=1e-6)
  np.testing.assert_allclose([lr(step, t) for t in (19, 20, 31, 32, 39)],
                             [0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-5)
  cosine = train_lib.learning_rate_schedule(_spec(schedule="cosine", warmup_epochs=1), steps)
  assert lr(cosine, 0) == pytest.approx(0.025)
  assert lr(cosine, 4) == pytest.approx(0.1)
  assert lr(cosine, 22) == pytest.approx(0.05, rel=1e-5)  # half-way through the decay
  assert lr(cosine, 39) < 1e-3 and lr(cosine, 40) == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError, match="unknown schedule"):
    train_lib.learning_rate_schedule(_spec(schedule="linear"), steps)
  assert "step schedule (x0.1 at epochs 5, 8), 1 warm-up epoch(s), augment crop_flip" in _spec(
      schedule="step", decay_epochs=(5, 8), warmup_epochs=1, augment="crop_flip").describe()


class _Linear(nn.Module):
  """The smallest model with the trainable collection: one trainable dense layer."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return TrainableDense(3, name="head")(x.reshape(x.shape[0], -1))


def _fit(spec, seed=0):
  model = _Linear()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((40, 4, 4, 1)).astype(np.float32)
  y = rng.integers(0, 3, size=40)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))
  return train_lib.fit(model, variables["trainable"], {}, (x, y), spec, 3, seed=seed)


def test_fit_with_schedule_and_augmentation_is_reproducible_and_differs():
  plain = _fit(_spec(epochs=3, loss="ce"))
  warm = _fit(_spec(epochs=3, loss="ce", schedule="cosine", warmup_epochs=1))
  aug = _fit(_spec(epochs=3, loss="ce", augment="crop_flip"))
  again = _fit(_spec(epochs=3, loss="ce", augment="crop_flip"))
  leaves = lambda r: np.concatenate([np.ravel(l) for l in jax.tree_util.tree_leaves(r[0])])
  assert not np.allclose(leaves(plain), leaves(warm))
  assert not np.allclose(leaves(plain), leaves(aug))
  np.testing.assert_array_equal(leaves(aug), leaves(again))  # augmentation is seeded
  with pytest.raises(ValueError, match="unknown augment"):
    _fit(_spec(epochs=1, augment="mixup"))


# ------------------------------------------------------------------ configs


def test_cnn_configs_pretrain_with_the_cifar_recipe_and_finetune_without_augmentation():
  for name in ("resnet110_cifar10.py", "mobilenetv2_cifar10.py"):
    c = _cfg(name)
    t = c.pretrain.train
    assert (c.pretrain.source, c.pretrain.dataset) == ("train", "cifar100")
    assert (t.augment, t.schedule, tuple(t.decay_epochs), t.warmup_epochs) == (
        "crop_flip", "step", (80, 120), 1.0)
    assert t.weight_decay == 5e-4 and t.epochs == 160 and t.learning_rate == 0.1
    for group in (c.finetune, c.baselines.max_loss, c.baselines.random_label, c.eval.relearn,
                  c.eval.probe):
      assert group.augment == "none" and group.schedule == "constant"


def test_schedule_fields_are_validated():
  c = _cfg("default.py")
  c.pretrain.train.schedule = "step"
  with pytest.raises(ValueError, match="needs pretrain.train.decay_epochs"):
    config_lib.validate(c)
  c = _cfg("default.py")
  c.finetune.augment = "cutout"
  with pytest.raises(ValueError, match="finetune.augment"):
    config_lib.validate(c)
  c = _cfg("default.py")
  c.pretrain.train.warmup_epochs = 100.0
  with pytest.raises(ValueError, match="warmup_epochs=100.0 exceeds"):
    config_lib.validate(c)


# ------------------------------------------------------------------ the shared cache


def test_cache_key_is_shared_by_seeds_and_ipc_and_changes_with_the_recipe():
  key = lambda c: pretraining.cache_key(c, 32, "cifar")[1]
  a = _cfg("resnet110_cifar10.py", "ipc=100")
  b = _cfg("resnet110_cifar10.py", "ipc=500")
  b.seeds = (2,)
  b.data.data_dir = "/elsewhere/tfds"
  assert key(a) == key(b)
  c = _cfg("resnet110_cifar10.py", "ipc=100")
  c.pretrain.train.decay_epochs = (60, 120)
  assert key(c) != key(a)
  assert key(_cfg("mobilenetv2_cifar10.py", "ipc=100")) != key(a)
  assert pretraining.cache_key(a, 32, "cifar100")[1] != key(a)  # how the images look


def test_cache_key_resolves_default_model_options():
  """The same backbone, its default options spelled out or not, has one key (it had two and
  was pre-trained twice); a non-default option still changes it."""
  key = lambda c: pretraining.cache_key(c, 32, "cifar")[1]
  a = _cfg("resnet110_cifar10.py", "ipc=100")
  spelled = _cfg("resnet110_cifar10.py", "ipc=100")
  spelled.model.options = {**dict(a.model.options), "widths": [16, 32, 64], "shortcut": "A"}
  assert key(spelled) == key(a)
  spelled.model.options = {**dict(a.model.options), "shortcut": "B"}
  assert key(spelled) != key(a)


def _tiny_cfg():
  c = _cfg("resnet110_cifar10.py", "tiny")
  c.model.options = {"shortcut": "A", "widths": (2, 2, 2)}
  return c


def test_load_or_train_trains_once_under_a_lock_then_hits(tmp_path, monkeypatch):
  cfg = _tiny_cfg()
  model = pretraining.pretrain_model(cfg)
  fresh = jax.tree_util.tree_map(np.asarray, dict(model.init(jax.random.PRNGKey(0),
                                                             jnp.zeros((1, 8, 8, 3)))))
  calls = []

  def fake_train(cfg_, spec, image_size, normalization, **kwargs):
    calls.append(kwargs["checkpoint_path"])
    time.sleep(0.3)  # the other thread must wait on the lock, not train too
    return fresh, {"source": "train", "test_accuracy": 12.5, "test_split": "cifar100/test",
                   "test_images": 8, "seconds": 0.3}

  monkeypatch.setattr(pretraining, "train_backbone", fake_train)
  spec = train_lib.TrainSpec(epochs=1, learning_rate=0.1, batch_size=4)
  out = []
  threads = [threading.Thread(target=lambda: out.append(pretraining.load_or_train(
      cfg, spec, 8, "cifar", str(tmp_path)))) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(calls) == 1 and calls[0].endswith("train.partial")
  assert sorted(o[2]["cache_hit"] for o in out) == [False, True]
  for variables, info, cache in out:
    assert info["test_accuracy"] == 12.5
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(fresh)):
      np.testing.assert_array_equal(np.asarray(a), b)
  entry = out[0][2]["cache_entry"]
  assert os.path.basename(entry).startswith("resnet8_cifar100_")
  assert sorted(os.listdir(entry)) == ["info.json", "key.json", "lock", "variables"]
  # A cache entry that holds another key is refused, not silently used.
  with open(os.path.join(entry, "key.json"), "w") as f:
    json.dump({"model": "other"}, f)
  with pytest.raises(ValueError, match="holds another config's backbone"):
    pretraining.load_or_train(cfg, spec, 8, "cifar", str(tmp_path))


def test_load_or_train_on_a_filesystem_without_flock_warns_and_runs(tmp_path, monkeypatch,
                                                                  caplog):
  """Lustre without `-o flock` (or some NFS mounts) answers flock with ENOSYS/ENOLCK: that is
  no other run holding the lock; the run must not wait for one and then die on it."""
  import errno  # pylint: disable=g-import-not-at-top
  import fcntl  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  cfg = _tiny_cfg()
  model = pretraining.pretrain_model(cfg)
  fresh = jax.tree_util.tree_map(np.asarray, dict(model.init(jax.random.PRNGKey(0),
                                                             jnp.zeros((1, 8, 8, 3)))))

  def no_flock(*args):
    raise OSError(errno.ENOSYS, "Function not implemented")

  monkeypatch.setattr(fcntl, "flock", no_flock)
  monkeypatch.setattr(pretraining, "train_backbone", lambda *a, **k: (
      fresh, {"source": "train", "test_accuracy": 50.0, "test_split": "cifar100/test"}))
  spec = train_lib.TrainSpec(epochs=1, learning_rate=0.1, batch_size=4)
  with caplog.at_level(logging.WARNING, logger="fastntk_jax.experiment.pretrain"):
    _, info, cache = pretraining.load_or_train(cfg, spec, 8, "cifar", str(tmp_path))
  assert info["test_accuracy"] == 50.0 and not cache["cache_hit"]
  assert "Function not implemented" in caplog.text and "without the lock" in caplog.text
  _, _, cache = pretraining.load_or_train(cfg, spec, 8, "cifar", str(tmp_path))
  assert cache["cache_hit"]


def test_transfer_keeps_the_backbone_and_the_tasks_fresh_head():
  pre = {"params": {"w": 1}, "trainable": {"bn": 2, "head": "100 classes"}, "batch_stats": 3}
  init = {"params": {"w": 0}, "trainable": {"bn": 0, "head": "10 classes"}, "batch_stats": 0}
  assert pretraining.transfer(pre, init) == {
      "params": {"w": 1}, "trainable": {"bn": 2, "head": "10 classes"}, "batch_stats": 3}


def test_report_records_the_backbone():
  results = {"timing": {}}
  report.add_pretrain(results, {"source": "train", "dataset": "cifar100", "train_images": 50000,
                                "epochs": 160, "recipe": "sgd(...)", "test_accuracy": 71.5,
                                "test_split": "cifar100/test", "test_images": 10000,
                                "seconds": 7.0, "cache_hit": True, "cache_entry": "/c/e",
                                "cache_key": "ab"})
  assert results["pretrain"]["test_accuracy"] == 71.5 and "seconds" not in results["pretrain"]
  assert results["timing"]["pretrain"] == {"seconds": 7.0, "cache_entry": "/c/e",
                                           "cache_hit": True}
  text = " ".join(report.pretrain_lines(results))
  assert "test accuracy 71.50%** on cifar100/test (10,000 images)" in text


# ------------------------------------------------------------------ BatchNorm statistics


def test_pretrain_batch_stats_is_validated():
  c = _cfg("default.py")
  c.pretrain.batch_stats = "foo"
  with pytest.raises(ValueError, match=r"config\.pretrain\.batch_stats='foo' is not valid; "
                     r"allowed: \['running', 'recompute'\]"):
    config_lib.validate(c)
  c.pretrain.batch_stats = "recompute"
  config_lib.validate(c)


def test_cache_key_names_batch_stats_only_when_recomputed():
  """"running" (the default) keys a backbone as before the knob (existing cache entries are
  still hit); "recompute" is another backbone, with another key."""
  import hashlib  # pylint: disable=g-import-not-at-top
  a = _cfg("resnet110_cifar10.py", "ipc=100")
  assert a.pretrain.batch_stats == "running"
  key, digest = pretraining.cache_key(a, 32, "cifar")
  assert "batch_stats" not in key
  assert digest == hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
  # The key this config had before the knob existed (cache entries on disk carry it).
  assert digest == "befcef47340fc9215e11d0760f1fb27941a1b1c512cbf53bdb9ad030f999f030"
  a.pretrain.batch_stats = "recompute"
  other, other_digest = pretraining.cache_key(a, 32, "cifar")
  assert other["batch_stats"] == "recompute" and other_digest != digest
  assert {k: v for k, v in other.items() if k != "batch_stats"} == key


def test_settle_batch_stats_keeps_the_chosen_statistics_and_warns_when_stale(monkeypatch,
                                                                             caplog):
  import logging  # pylint: disable=g-import-not-at-top
  scores = {"ema": 10.0, "recomputed": 90.0}
  monkeypatch.setattr(pretraining.bn_stats, "recompute_batch_stats",
                      lambda model, trainable, frozen, x, batch_size, seed: "recomputed")
  monkeypatch.setattr(pretraining, "accuracy",
                      lambda model, variables, split, batch_size: scores[variables["batch_stats"]])
  cfg = _cfg("default.py")
  variables = {"trainable": {}, "params": {}, "batch_stats": "ema"}
  x = np.zeros((7, 2, 2, 3), np.float32)
  with caplog.at_level(logging.WARNING, logger="fastntk_jax.experiment.pretrain"):
    kept, info = pretraining.settle_batch_stats(cfg, None, variables, x, None, 4, 8)
  assert kept["batch_stats"] == "ema"
  assert info == {"batch_stats": "running", "test_accuracy": 10.0,
                  "test_accuracy_running_stats": 10.0, "test_accuracy_recomputed_stats": 90.0}
  assert "pretrain.batch_stats='recompute'" in caplog.text and "90.00%" in caplog.text
  caplog.clear()
  cfg.pretrain.batch_stats = "recompute"
  with caplog.at_level(logging.WARNING, logger="fastntk_jax.experiment.pretrain"):
    kept, info = pretraining.settle_batch_stats(cfg, None, variables, x, None, 4, 8)
  assert kept["batch_stats"] == "recomputed" and info["test_accuracy"] == 90.0
  assert info["batch_stats"] == "recompute" and not caplog.text
  # Less than 5 points apart: no warning.
  scores["recomputed"] = 14.0
  cfg.pretrain.batch_stats = "running"
  with caplog.at_level(logging.WARNING, logger="fastntk_jax.experiment.pretrain"):
    pretraining.settle_batch_stats(cfg, None, variables, x, None, 4, 8)
  assert not caplog.text
  # Statistics that cannot be recomputed (no train-mode pass moves them): "running" keeps
  # its own and says so; "recompute" is refused, naming the knob.
  def cannot(*args, **kwargs):
    raise ValueError("the running statistics never moved")
  monkeypatch.setattr(pretraining.bn_stats, "recompute_batch_stats", cannot)
  scores["recomputed"] = 90.0
  with caplog.at_level(logging.WARNING, logger="fastntk_jax.experiment.pretrain"):
    kept, info = pretraining.settle_batch_stats(cfg, None, variables, x, None, 4, 8)
  assert kept is variables and info["test_accuracy_recomputed_stats"] is None
  assert info["test_accuracy"] == 10.0 and "cannot be recomputed" in caplog.text
  cfg.pretrain.batch_stats = "recompute"
  with pytest.raises(ValueError, match="pretrain.batch_stats='recompute': .*never moved"):
    pretraining.settle_batch_stats(cfg, None, variables, x, None, 4, 8)
  cfg.pretrain.batch_stats = "running"
  # No BatchNorm: the model as it is, its accuracy alone.
  monkeypatch.setattr(pretraining, "accuracy", lambda *a: 50.0)
  plain = {"trainable": {}, "params": {}}
  assert pretraining.settle_batch_stats(cfg, None, plain, x, None, 4, 8) == (
      plain, {"test_accuracy": 50.0})


class _NoProgress:
  def epochs(self, tag, total):
    del tag, total
    return None


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("mode", ["running", "recompute"])
@pytest.mark.parametrize("where", ["pretrain_split", "cache"])
def test_pretrain_keeps_the_batch_stats_the_config_asks_for(tmp_path, monkeypatch, mode, where):
  """A real (tiny) pre-training, on the data's own pre-train split (`pretrain_stage`) or on
  another dataset into the shared cache (`train_backbone`): "running" saves the statistics
  training left, "recompute" those `recompute_batch_stats` gives for the trained weights on
  the pre-training images; both record the test accuracy with either."""
  from fastntk_jax import batch_stats as bn_stats  # pylint: disable=g-import-not-at-top
  from fastntk_jax.data import splits  # pylint: disable=g-import-not-at-top
  from fastntk_jax.models import get_model  # pylint: disable=g-import-not-at-top
  cfg = _cfg("resnet110_cifar10.py", "tiny,digits")
  cfg.model.options = {"shortcut": "A", "widths": (2, 2, 2)}
  cfg.pretrain.batch_stats = mode
  if where == "cache":
    cfg.pretrain.dataset = "digits"
    cfg.pretrain.images_per_class = 5
    cfg.pretrain.cache_dir = str(tmp_path / "cache")
  config_lib.validate(cfg)
  data = data_lib.load_unlearning_data(cfg.data)
  model = get_model(cfg.model.name, data.num_classes, **dict(cfg.model.options))
  fitted = []  # what training returned: (trained collections, running statistics)
  fit = train_lib.fit_collections

  def recording_fit(*args, **kwargs):
    out = fit(*args, **kwargs)
    fitted.append(out)
    return out

  monkeypatch.setattr(train_lib, "fit_collections", recording_fit)
  workdir = str(tmp_path / "wd")
  variables = pretraining.pretrain_stage(cfg, model, data, workdir, _NoProgress())
  assert len(fitted) == 1
  trained, running, _ = fitted[0]
  info = pretraining.pretrain_info(workdir)
  if where == "cache":  # the pre-trained model itself (its own head), from the cache entry
    pre_model = pretraining.pretrain_model(cfg)
    pre_vars, cached_info, cache = pretraining.load_or_train(
        cfg, None, 8, data.config.normalization, cfg.pretrain.cache_dir)
    assert cache["cache_hit"] and cached_info == {k: v for k, v in info.items()
                                                 if k not in ("cache_entry", "cache_hit",
                                                              "cache_key")}
    pre_x = splits.load_unlearning_data(pretraining.pretrain_data_config(
        cfg, 8, data.config.normalization)).train.x
    _assert_trees_equal(pre_vars["batch_stats"], variables["batch_stats"])
  else:
    pre_model, pre_vars, pre_x = model, variables, data.pretrain.x
  _assert_trees_equal({k: pre_vars[k] for k in trained}, trained)
  frozen = {k: v for k, v in pre_vars.items() if k != "trainable"}
  recomputed = bn_stats.recompute_batch_stats(
      pre_model, pre_vars["trainable"], frozen, pre_x,
      batch_size=cfg.pretrain.train.batch_size, seed=pretraining.RECOMPUTE_SEED)
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(recomputed),
                                                   jax.tree_util.tree_leaves(running)))
  _assert_trees_equal(variables["batch_stats"], recomputed if mode == "recompute" else running)
  # A resumed run restores the same statistics from the workdir's checkpoint.
  again = pretraining.pretrain_stage(cfg, model, data, workdir, _NoProgress())
  _assert_trees_equal(again["batch_stats"], variables["batch_stats"])
  assert info["batch_stats"] == mode
  kept = "recomputed" if mode == "recompute" else "running"
  assert info["test_accuracy"] == info[f"test_accuracy_{kept}_stats"]
  test = (splits.load_unlearning_data(pretraining.pretrain_data_config(
      cfg, 8, data.config.normalization)).test if where == "cache" else data.test)
  for stats, name in ((running, "running"), (recomputed, "recomputed")):
    assert info[f"test_accuracy_{name}_stats"] == pretraining.accuracy(
        pre_model, {**pre_vars, "batch_stats": stats}, test, 64)


def test_recompute_is_refused_for_a_backbone_pre_trained_with_frozen_batchnorm():
  """Frozen BN trains the weights against the statistics they have: 'recompute' would replace
  them by others (a tiny ResNet dropped from 75% to chance); refused by the config's
  validation, before the workdir is touched."""
  cfg = _cfg("resnet110_cifar10.py", "tiny,digits")
  cfg.pretrain.batch_stats = "recompute"
  cfg.pretrain.train.bn_mode = "frozen"
  with pytest.raises(ValueError, match="batch_stats='recompute' needs pretrain.train.bn_mode='train'"):
    config_lib.validate(cfg)
  cfg.pretrain.train.bn_mode = "train"
  config_lib.validate(cfg)
