"""ImageNet-R as the paper samples it: seeded random class subsets among the classes that
have enough images, a random forgotten class per seed (fixed choices as options), a draw per
run seed in the pipeline, and per-class counts checked against #IPC and the hold-out with
one clear error naming every short class."""

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

import fake_tfds  # pylint: disable=wrong-import-position
from fastntk_jax import config as config_lib  # pylint: disable=wrong-import-position
from fastntk_jax import data as D  # pylint: disable=wrong-import-position
from fastntk_jax.experiment import run as run_lib  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = fake_tfds.IMAGENET_R_IDS  # 200 ImageNet-1k ids
# Every 4th class (0, 4, 8, ...) has 3 images, the others 6: with a hold-out of 2 and
# #IPC 3 (5 needed), 150 classes are eligible.
COUNTS = np.where(np.arange(200) % 4 == 0, 3, 6)


_uneven_imagenet_r = fake_tfds.imagenet_r(COUNTS, image_size=(4, 4))


@pytest.fixture
def imagenet_r():
  with tfds.testing.mock_data(as_dataset_fn=_uneven_imagenet_r):
    def load(**kw):
      kw = {"name": "imagenet_r", "holdout_per_class": 2, "images_per_class": 3,
            "image_size": 4, "num_classes": 20, "class_choice": "random",
            "forget_choice": "random", **kw}
      return D.load_unlearning_data(**kw)
    yield load


def test_random_classes_are_seeded_eligible_and_recorded(imagenet_r):
  a, b, c = imagenet_r(seed=0), imagenet_r(seed=0), imagenet_r(seed=1)
  assert a.dataset_classes == b.dataset_classes and a.forget_classes == b.forget_classes
  assert a.dataset_classes != c.dataset_classes
  for d in (a, c):
    classes = np.asarray(d.dataset_classes)
    assert len(classes) == 20 and np.all(np.diff(classes) > 0)  # sorted, distinct
    assert np.all(classes % 4 != 0), "a class without 5 images was drawn"
    assert tuple(d.config.classes) == d.dataset_classes  # the draw is in the resolved config
    np.testing.assert_array_equal(d.train.class_counts(20), np.full(20, 3))  # #IPC each
    # Re-resolving the recorded config keeps the draw (classes given win, forget redraws
    # the same labels from (seed, num_classes)).
    again = D.resolve_data_config(d.config)
    assert tuple(again.classes) == tuple(d.config.classes)
    assert tuple(again.forget_classes) == tuple(d.config.forget_classes)
  # Not the first 20 classes, and across seeds the forgotten label is not always 0.
  assert a.dataset_classes != tuple(range(20))
  forgotten = {imagenet_r(seed=s).forget_classes for s in range(6)}
  assert len(forgotten) > 1 and all(len(f) == 1 and 0 <= f[0] < 20 for f in forgotten)


def test_fixed_choices_remain_available(imagenet_r):
  d = imagenet_r(class_choice="first", forget_choice="fixed", forget_classes=[0],
                 holdout_per_class=1, images_per_class=2, seed=3)
  assert d.dataset_classes == tuple(range(20)) and d.forget_classes == (0,)
  d = imagenet_r(classes=[5, 1, 2], forget_choice="fixed", forget_classes=[2], num_classes=None)
  assert d.dataset_classes == (5, 1, 2) and d.forget_classes == (2,)


def test_too_few_eligible_classes_is_one_clear_error(imagenet_r):
  with pytest.raises(ValueError) as e:
    imagenet_r(num_classes=160)  # 150 classes have the 5 images needed
  msg = str(e.value)
  assert "class_choice='random' needs num_classes=160 classes with at least 5 images each" in msg
  assert "holdout_per_class 2 + images_per_class 3" in msg
  assert "only 150 of the 200 classes have that many (fewest: 3)" in msg


def test_every_short_class_is_named_in_one_error(imagenet_r):
  with pytest.raises(ValueError) as e:
    imagenet_r(class_choice="first", num_classes=13)  # classes 0, 4, 8, 12 are short
  msg = str(e.value)
  assert msg.startswith("data config: images_per_class=3 but class 0 (")
  assert "4 of the 13 chosen classes are short of the 5 images each needs in imagenet_r/test" in msg
  for cls in (0, 4, 8, 12):
    assert f"{cls} (n" in msg.split("short of")[1]


def test_pipeline_draws_per_seed(imagenet_r):
  cfg = config_lib.load_config_file(os.path.join(ROOT, "configs",
                                                 "vit_small_imagenet_r.py:tiny"))
  assert (cfg.data.class_choice, cfg.data.forget_choice, cfg.data.draw_per_seed) == (
      "random", "random", True)
  cfg.data.image_size = 4
  cfg.data.num_classes = 20
  cfg.data.holdout_per_class = 2
  cfg.data.images_per_class = 3
  base = D.load_unlearning_data(cfg.data)
  draws = [run_lib.data_draw(run_lib.data_for_seed(cfg, base, s)) for s in (0, 1, 2)]
  assert draws[0]["classes"] == list(base.dataset_classes)
  assert len({tuple(d["classes"]) for d in draws}) == 3
  assert [d["seed"] for d in draws] == [0, 1, 2]
  cfg.data.draw_per_seed = False
  assert run_lib.data_for_seed(cfg, base, 2) is base
  fixed = config_lib.load_config_file(os.path.join(ROOT, "configs",
                                                   "vit_small_imagenet_r.py:random=0"))
  assert (fixed.data.class_choice, fixed.data.forget_choice, fixed.data.draw_per_seed,
          list(fixed.data.forget_classes)) == ("first", "fixed", False, [0])


def test_draw_per_seed_refuses_an_own_split_pretraining():
  cfg = config_lib.load_config_file(os.path.join(ROOT, "configs", "default.py"))
  cfg.data.draw_per_seed = True
  with pytest.raises(ValueError, match="draw_per_seed=True draws other images per seed"):
    config_lib.validate(cfg)
