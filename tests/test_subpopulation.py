"""forget_mode="subpopulation": a seeded anchor image of one class and its nearest neighbours
(anchor included) in the pre-trained network's feature space form D_f. The masks against an
independent brute force, the anchor's seeding, the refusals, the two-step re-split of D, the
features (the head's input) of every model family, and one whole run from the command line."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from fastntk_jax import data as D
from fastntk_jax.data import schema
from fastntk_jax.data import splits
from fastntk_jax.experiment import prepare as prepare_lib
from fastntk_jax.models import get_model
from fastntk_jax.models import trainable as tr


def _cfg(**kw):
  kw = {"num_classes": 3, "images_per_class": 8, "forget_mode": "subpopulation",
        "forget_fraction": 0.2, "forget_classes": [1], **kw}
  return schema.resolve_data_config(**kw)


def _labels(num_classes=3, per_class=8, seed=0):
  """D's labels in a shuffled order, as a loader may give them."""
  return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def _brute_force(features, labels, label, anchor, k):
  """The k rows of class `label` nearest to row `anchor` (itself first), plain Python."""
  def unit(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v] if n else list(v)
  ref = unit(features[anchor].tolist())
  scored = []
  for i, lab in enumerate(labels.tolist()):
    if lab == label:
      d = -1.0 if i == anchor else math.dist(unit(features[i].tolist()), ref)
      scored.append((d, i))
  chosen = {i for _, i in sorted(scored)[:k]}
  return np.array([i in chosen for i in range(len(labels))])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("fraction,k", [(0.2, 5), (0.01, 1), (1 / 3, 8)])
def test_masks_equal_brute_force_nearest_neighbours(seed, fraction, k):
  labels = _labels(seed=seed)
  rng = np.random.default_rng(100 + seed)
  # Rows of very different lengths: only their directions may matter (L2-normalised).
  features = rng.standard_normal((24, 5)) * rng.uniform(0.01, 100.0, (24, 1))
  cfg = _cfg(seed=seed, forget_fraction=fraction)
  mask = splits.subpopulation_masks(features, labels, cfg)
  anchor = splits.subpopulation_anchor(labels, cfg)
  assert mask.dtype == bool and mask.shape == (24,) and mask.sum() == k
  np.testing.assert_array_equal(mask, _brute_force(features, labels, 1, anchor, k))
  assert mask[anchor] and (labels[mask] == 1).all()  # anchor in, every image of the class
  # Rescaling any image's features changes nothing; the (n, ...) shape is flattened.
  scaled = features * rng.uniform(0.1, 10.0, (24, 1))
  np.testing.assert_array_equal(splits.subpopulation_masks(scaled, labels, cfg), mask)
  np.testing.assert_array_equal(
      splits.subpopulation_masks(features.reshape(24, 5, 1), labels, cfg), mask)


def test_masks_pick_the_hand_made_cluster():
  labels = _labels()
  cfg = _cfg(forget_fraction=4 / 24)  # k = 4
  anchor = splits.subpopulation_anchor(labels, cfg)
  members = np.flatnonzero(labels == 1)
  near = [m for m in members if m != anchor][:3]
  features = np.tile([0.0, 0.0, 1.0], (24, 1))  # every other image: far from the anchor
  features[anchor] = [1.0, 0.0, 0.0]
  for j, row in enumerate(near):  # three images in the anchor's direction, of other lengths
    features[row] = [5.0 * (j + 1), 0.1 * (j + 1), 0.0]
  # Images of other classes right at the anchor are never chosen: within the class only.
  features[labels != 1] = [1.0, 0.0, 0.0]
  mask = splits.subpopulation_masks(features, labels, cfg)
  assert set(np.flatnonzero(mask)) == {anchor, *near}


def test_anchor_is_seeded():
  labels = _labels()
  anchors = [splits.subpopulation_anchor(labels, _cfg(seed=s)) for s in range(10)]
  assert anchors == [splits.subpopulation_anchor(labels, _cfg(seed=s)) for s in range(10)]
  assert len(set(anchors)) > 1  # changes with the seed
  assert all(labels[a] == 1 for a in anchors)
  other = [splits.subpopulation_anchor(labels, _cfg(seed=s, forget_classes=[2]))
           for s in range(10)]
  assert all(labels[a] == 2 for a in other)


def test_refusals_name_the_fields():
  # Larger than its class (every class has images_per_class = 8 images of D's 24): at once.
  with pytest.raises(ValueError, match=r"forget_fraction=0\.5.*forget_classes=\[1\] has only 8"):
    _cfg(forget_fraction=0.5)
  # images_per_class=None: the class sizes are known once loaded (still before any work).
  with pytest.raises(ValueError, match=r"forget_fraction=0\.6.*forget_classes=\[1\] has only"):
    D.load_unlearning_data(num_classes=3, images_per_class=None, forget_mode="subpopulation",
                           forget_fraction=0.6, forget_classes=[1])
  labels = np.array([0] * 20 + [1] * 4)  # and by the masks, on D's actual labels
  with pytest.raises(ValueError, match="forget_fraction.*forget_classes"):
    splits.subpopulation_masks(np.ones((24, 2)), labels, _cfg(forget_fraction=0.25))
  with pytest.raises(ValueError, match=r"exactly one class in forget_classes.*\[0, 1\]"):
    _cfg(forget_classes=[0, 1])
  with pytest.raises(ValueError, match="forget_fraction must be a float"):
    _cfg(forget_fraction=None)
  with pytest.raises(ValueError, match="forget_classes"):
    _cfg(forget_classes=[3])  # not among the chosen classes
  with pytest.raises(ValueError, match="forget_fraction is only used"):
    schema.resolve_data_config(forget_fraction=0.1)  # class mode still refuses it
  with pytest.raises(ValueError, match="not all finite"):
    splits.subpopulation_masks(np.full((24, 2), np.nan), _labels(), _cfg())


def test_config_round_trips_and_random_forget_class():
  cfg = _cfg(forget_choice="random", seed=7)
  assert schema.resolve_data_config(cfg) == cfg
  assert len(cfg.forget_classes) == 1 and cfg.forget_fraction == 0.2


def test_resplit_keeps_d_and_is_disjoint():
  kw = dict(num_classes=4, images_per_class=10, seed=3)
  cls_mode = D.load_unlearning_data(**kw)
  data = D.load_unlearning_data(forget_mode="subpopulation", forget_fraction=0.1,
                                forget_classes=[2], **kw)
  # Pending: D_f empty, D_r = D (the same D as class mode), no hold-out forget side.
  assert data.forget_pending and data.subpopulation == schema.Subpopulation(label=2, size=4)
  assert data.forget.size == 0 and data.forget_classes == () and data.test_forget.size == 0
  np.testing.assert_array_equal(np.sort(data.retain.index), np.sort(cls_mode.train.index))
  np.testing.assert_array_equal(np.sort(data.test_retain.index), np.sort(cls_mode.test.index))
  d = data.train
  mask = splits.subpopulation_masks(np.random.default_rng(0).standard_normal((d.size, 6)),
                                    d.y, data.config)
  sub = schema.Subpopulation(label=2, size=4, anchor=int(d.index[0]), features="head_input")
  out = data.with_forget(mask, subpopulation=sub)
  assert not out.forget_pending and out.subpopulation == sub
  r, f = set(out.retain.index.tolist()), set(out.forget.index.tolist())
  assert r | f == set(d.index.tolist()) and not r & f
  assert out.retain.size + out.forget.size == d.size == len(r) + len(f)
  np.testing.assert_array_equal(out.forget.index, d.index[mask])  # D's order kept
  np.testing.assert_array_equal(out.retain.index, d.index[~mask])
  np.testing.assert_array_equal(out.forget.x, d.x[mask])
  assert (out.forget.y == 2).all() and out.forget.size == 4
  assert out.test_retain is data.test_retain and out.pretrain is data.pretrain
  for bad in (mask[:-1], mask.astype(int), np.zeros_like(mask), np.ones_like(mask)):
    with pytest.raises(ValueError, match="with_forget"):
      data.with_forget(bad)


_TINY = {
    "resnet8": dict(shortcut="B", widths=(4, 8, 8)),
    "mobilenetv2": dict(width_mult=0.5, last_channel=16,
                        block_settings=((1, 8, 1, 1), (2, 12, 2, 2))),
    "vit_s16": dict(patch_size=4, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16,
                    prompt_length=2),
}


@pytest.mark.parametrize("name", sorted(_TINY))
def test_features_are_what_the_head_reads(name):
  model = get_model(name, 3, **_TINY[name])
  variables = tr.init_variables(model, (8, 8, 3), seed=0)
  x = np.random.default_rng(0).standard_normal((7, 8, 8, 3)).astype(np.float32)
  feats, kind = prepare_lib.pretrained_features(model, variables, x, batch_size=4)  # padded
  assert kind == "head_input" and feats.shape[0] == 7 and feats.ndim == 2
  head = variables["trainable"]["head"]
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  np.testing.assert_allclose(feats @ head["kernel"] + head["bias"], logits, rtol=1e-4,
                             atol=1e-5)


def test_features_fall_back_to_logits_without_a_head():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class NoHead(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(3, name="out")(x.reshape(x.shape[0], -1))

  model = NoHead()
  x = np.random.default_rng(0).standard_normal((5, 2, 2, 3)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x))
  feats, kind = prepare_lib.pretrained_features(model, variables, x, batch_size=8)
  assert kind == "logits"
  np.testing.assert_allclose(feats, model.apply(variables, x), rtol=1e-5, atol=1e-6)


def _run_cfg(**data):
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.data.forget_mode = "subpopulation"
    cfg.data.forget_fraction = 0.1
    for key, value in data.items():
      setattr(cfg.data, key, value)
  return cfg


def test_resolve_forget_set_and_data_for_seed():
  cfg = _run_cfg(draw_per_seed=True, forget_classes=(2,))
  model = get_model(cfg.model.name, 4, **dict(cfg.model.options))
  data = D.load_unlearning_data(cfg.data)
  variables = tr.init_variables(model, data.image_shape, seed=0)
  resolved = prepare_lib.resolve_forget_set(cfg, data, model, variables)
  k = 2  # round(0.1 * 24)
  assert not resolved.forget_pending and resolved.forget.size == k
  assert (resolved.forget.y == 2).all() and resolved.test_forget.size == 0
  feats, _ = prepare_lib.pretrained_features(model, variables, data.train.x, batch_size=32)
  expected = splits.subpopulation_masks(feats, data.train.y, data.config)
  np.testing.assert_array_equal(resolved.forget.index, data.train.index[expected])
  assert resolved.subpopulation.anchor in resolved.forget.index.tolist()
  assert resolved.subpopulation.features == "head_input"
  assert prepare_lib.resolve_forget_set(cfg, resolved, model, variables) is resolved
  cls_data = D.load_unlearning_data(tiny_config().data)
  assert prepare_lib.resolve_forget_set(cfg, cls_data, model, variables) is cls_data
  # Seed 0 keeps the run's (resolved) data; another seed draws and resolves its own.
  assert prepare_lib.data_for_seed(cfg, resolved, 0, model, variables) is resolved
  seed1 = prepare_lib.data_for_seed(cfg, resolved, 1, model, variables)
  assert seed1.config.seed == 1 and seed1.forget.size == k and (seed1.forget.y == 2).all()
  draw = prepare_lib.data_draw(seed1)
  assert draw["subpopulation"]["size"] == k
  assert draw["subpopulation"]["forget_index"] == sorted(seed1.forget.index.tolist())
  with pytest.raises(ValueError, match="pre-trained"):
    prepare_lib.data_for_seed(cfg, resolved, 1)


@pytest.mark.slow
def test_cli_run_forgets_a_subpopulation(tmp_path):
  from test_cli import cli_run  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  proc = cli_run("--config=configs/default.py:tiny", "--config.data.forget_mode=subpopulation",
                 "--config.data.forget_fraction=0.1", "--config.methods=('full','retrain',"
                 "'fastntk')", f"--workdir={workdir}", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  info = results["data"]
  k = 2  # round(0.1 * |D|), |D| = 4 classes x 6 images
  assert info["forget_mode"] == "subpopulation" and info["forget_classes"] == []
  assert info["counts"]["forget"] == k and info["counts"]["retain"] == 24 - k
  assert info["counts"]["test_forget"] == 0
  sub = info["per_seed"]["0"]["subpopulation"]
  assert sub["label"] == 0 and sub["size"] == k and sub["features"] == "head_input"
  assert len(sub["forget_index"]) == k and sub["anchor"] in sub["forget_index"]
  # Those images are D's images of that one class (the loader's D, pool indices).
  data = D.load_unlearning_data(tiny_config().data)
  label_of = dict(zip(data.train.index.tolist(), data.train.y.tolist()))
  assert {label_of[i] for i in sub["forget_index"]} == {0}
