"""Tests for fastntk_jax.data: splits, determinism, config validation, TFDS loaders (mocked).

The TFDS tests are skipped, not the whole module, where TensorFlow Datasets is not installed.
"""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fastntk_jax import data as D

DIGITS = load_digits()


def _all_indices(data):
  return np.concatenate([s.index for s in data.splits().values() if s is not None])


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_default():
  return D.load_unlearning_data()


def test_digits_default_shapes_dtypes_counts(digits_default):
  d = digits_default
  assert d.num_classes == 10 and d.class_names == tuple(str(i) for i in range(10))
  assert d.image_shape == (16, 16, 3)
  for name, s in d.splits().items():
    assert s.x.dtype == np.float32 and s.x.shape[1:] == (16, 16, 3), name
    assert s.y.dtype == np.int32 and s.y.shape == (s.size,), name
    assert np.isfinite(s.x).all()
    assert not s.x.flags.writeable  # frozen data
  # Default split sizes per class: hold-out 30, pre-training 80, D 60 (of 174..183 per class).
  assert d.counts() == {"pretrain": 800, "retain": 540, "forget": 60, "test_retain": 270,
                        "test_forget": 30}
  np.testing.assert_array_equal(d.pretrain.class_counts(10), np.full(10, 80))
  np.testing.assert_array_equal(d.train.class_counts(10), np.full(10, 60))
  np.testing.assert_array_equal(d.test.class_counts(10), np.full(10, 30))
  x_r, y_r = d.retain  # tuple-style unpacking
  assert x_r.shape[0] == y_r.shape[0] == 540
  assert "retain" in d.describe() and "540" in d.describe()


def test_digits_forget_set_is_exactly_the_forget_class(digits_default):
  d = digits_default
  assert d.forget_classes == (0,)
  assert set(d.forget.y.tolist()) == {0} and set(d.test_forget.y.tolist()) == {0}
  assert 0 not in d.retain.y and 0 not in d.test_retain.y
  # Independent check through the source labels of the chosen images.
  assert (DIGITS.target[d.forget.index] == 0).all()
  assert (DIGITS.target[d.retain.index] != 0).all()
  # Every image of class 0 in D is in the forget set.
  assert d.forget.size == (d.train.y == 0).sum() == 60


def test_digits_splits_are_disjoint(digits_default):
  idx = _all_indices(digits_default)
  assert np.unique(idx).size == idx.size  # no image used twice
  assert idx.size == 800 + 600 + 300 and idx.max() < len(DIGITS.target)


def test_digits_images_match_source():
  # image_size 8 + no normalisation: pixels must be the sklearn digits / 16, grey x 3.
  d = D.load_unlearning_data(image_size=8, normalization="none", seed=3)
  for s in d.splits().values():
    np.testing.assert_allclose(s.x[..., 0], DIGITS.images[s.index] / 16.0, atol=1e-6)
    np.testing.assert_array_equal(s.x[..., 0], s.x[..., 2])
    np.testing.assert_array_equal(s.y, DIGITS.target[s.index])  # identity remap


@pytest.mark.parametrize("norm,lo,hi",
                         [("none", 0.0, 1.0), ("vit", -1.0, 1.0), ("inception", -1.0, 1.0)])
def test_digits_resize_and_ranges(norm, lo, hi):
  d = D.load_unlearning_data(image_size=32, normalization=norm, images_per_class=5,
                             pretrain_per_class=0)
  x = d.train.x
  assert x.shape == (50, 32, 32, 3) and d.pretrain is None
  assert x.min() >= lo - 1e-6 and x.max() <= hi + 1e-6
  assert x.max() - x.min() > 0.9 * (hi - lo)  # the full range is actually used
  np.testing.assert_array_equal(x[..., 0], x[..., 1])


def test_cifar_normalization_is_per_channel_mean_std():
  x01 = np.random.default_rng(0).random((4, 2, 2, 3)).astype(np.float32)
  mean, std = D.NORMALIZATIONS["cifar"]
  np.testing.assert_allclose(D.normalize_images(x01, "cifar"), (x01 - mean) / np.asarray(std),
                             rtol=1e-6)


def test_digits_deterministic_per_seed_and_ipc_prefix():
  a = D.load_unlearning_data(seed=1, images_per_class=20)
  b = D.load_unlearning_data(seed=1, images_per_class=20)
  c = D.load_unlearning_data(seed=2, images_per_class=20)
  big = D.load_unlearning_data(seed=1, images_per_class=50)
  for key, s in a.splits().items():
    np.testing.assert_array_equal(s.x, b.splits()[key].x)
    np.testing.assert_array_equal(s.index, b.splits()[key].index)
  assert not np.array_equal(a.retain.index, c.retain.index)
  # The hold-out and pretrain sets do not depend on #IPC; D(20) is inside D(50).
  np.testing.assert_array_equal(a.test.index, big.test.index)
  np.testing.assert_array_equal(a.pretrain.index, big.pretrain.index)
  assert set(a.train.index.tolist()) < set(big.train.index.tolist())


def test_digits_class_subset_and_remap():
  d = D.load_unlearning_data(classes=[7, 3, 5], forget_classes=[1], images_per_class=10)
  assert d.num_classes == 3 and d.class_names == ("7", "3", "5")
  assert d.dataset_classes == d.source_labels == (7, 3, 5)
  remap = {7: 0, 3: 1, 5: 2}
  for s in d.splits().values():
    np.testing.assert_array_equal(s.y, [remap[t] for t in DIGITS.target[s.index]])
  assert (DIGITS.target[d.forget.index] == 3).all() and d.forget.size == 10
  # First-k subset and several forget classes.
  d = D.load_unlearning_data(num_classes=4, forget_classes=[0, 2], images_per_class=10)
  assert set(d.forget.y.tolist()) == {0, 2} and set(d.retain.y.tolist()) == {1, 3}
  assert set(d.test_forget.y.tolist()) == {0, 2} and d.test_retain.size == 60


def test_ipc_too_large_names_class_and_counts():
  # Class 8 has 174 images: 174 - 30 hold-out - 80 pre-training = 64 left for D.
  D.load_unlearning_data(images_per_class=64)
  with pytest.raises(ValueError,
                     match=r"images_per_class=65 but class 8 \(8\) has only 64 images"):
    D.load_unlearning_data(images_per_class=65)


def test_samples_mode():
  kw = dict(images_per_class=20, seed=4)
  cls_mode = D.load_unlearning_data(**kw)
  d = D.load_unlearning_data(forget_mode="samples", forget_fraction=0.25, **kw)
  assert d.forget.size == 50 and d.retain.size == 150 and d.forget_classes == ()
  assert len(set(d.forget.y.tolist())) > 1  # drawn across classes
  # Same D as class mode, only partitioned differently; the whole hold-out is in test_retain.
  assert set(d.train.index.tolist()) == set(cls_mode.train.index.tolist())
  assert not set(d.forget.index.tolist()) & set(d.retain.index.tolist())
  assert d.test_forget.size == 0 and d.test_forget.x.shape == (0, 16, 16, 3)
  np.testing.assert_array_equal(np.sort(d.test_retain.index), np.sort(cls_mode.test.index))


def test_config_dict_and_overrides():
  cfg = D.default_data_config()
  cfg.images_per_class = 7
  cfg.seed = 5
  d = D.load_unlearning_data(cfg, pretrain_per_class=0)
  assert d.train.size == 70 and d.pretrain is None and d.config.seed == 5
  assert d.config.holdout_per_class == 30 and d.config.image_size == 16  # dataset defaults filled


def test_resolved_config_round_trips():
  cfg = D.resolve_data_config(name="digits", num_classes=4, forget_mode="samples",
                              forget_fraction=0.2)
  assert D.resolve_data_config(cfg) == cfg
  assert cfg.classes == (0, 1, 2, 3) and cfg.forget_classes is None
  assert D.resolve_data_config(name="cifar10").holdout_per_class is None  # whole test split


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(name="mnist"), "name"),
        (dict(image_size=0), "image_size"),
        (dict(image_size=16.0), "image_size"),
        (dict(normalization="zscore"), "normalization"),
        (dict(num_classes=1), "num_classes"),
        (dict(num_classes=11), "num_classes"),
        (dict(classes=[1, 1, 2]), "classes"),
        (dict(classes=[0, 10]), "classes"),
        (dict(classes=[0, 1], num_classes=3), "num_classes"),
        (dict(images_per_class=0), "images_per_class"),
        (dict(images_per_class=True), "images_per_class"),
        (dict(holdout_per_class=0), "holdout_per_class"),
        (dict(pretrain_per_class=-1), "pretrain_per_class"),
        (dict(forget_classes=[]), "forget_classes"),
        (dict(forget_classes=0), "forget_classes"),
        (dict(num_classes=3, forget_classes=[5]), "forget_classes"),  # not among the chosen classes
        (dict(num_classes=2, forget_classes=[0, 1]), "forget_classes"),  # nothing left to retain
        (dict(forget_mode="sample"), "forget_mode"),
        (dict(forget_mode="samples"), "forget_fraction"),
        (dict(forget_mode="samples", forget_fraction=1.0), "forget_fraction"),
        (dict(forget_fraction=0.1), "forget_fraction"),  # only valid in samples mode
        (dict(seed=-1), "seed"),
        (dict(data_dir=3), "data_dir"),
        (dict(batch_size=3), "batch_size"),  # unknown field
    ],
)
def test_bad_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    D.load_unlearning_data(**overrides)


def test_select_on_synthetic_pools():
  """The selection module alone, on labels only: 3 classes of 20 in one pool."""
  from fastntk_jax.data import schema, sources, splits

  labels = np.repeat(np.arange(3), 20)[np.random.default_rng(0).permutation(60)]
  pools = sources.Pools(labels, None, "fake", None, ("a", "b", "c"), (0, 1, 2))

  def select(**kw):
    kw = {"num_classes": 3, "holdout_per_class": 5, "pretrain_per_class": 4, **kw}
    return splits.select(pools, schema.resolve_data_config(**kw))

  sel = select(images_per_class=6)
  everything = np.concatenate([i for part in sel.values() for i in part])
  assert np.unique(everything).size == everything.size == 3 * (5 + 4 + 6)
  for cls in range(3):
    for part, n in (("holdout", 5), ("pretrain", 4), ("train", 6)):
      assert sel[part][cls].size == n and (labels[sel[part][cls]] == cls).all()
  rest = select(images_per_class=None)  # every image left: 20 - 5 - 4
  for cls in range(3):
    np.testing.assert_array_equal(rest["train"][cls][:6], sel["train"][cls])  # #IPC prefix
    np.testing.assert_array_equal(rest["holdout"][cls], sel["holdout"][cls])
    assert rest["train"][cls].size == 11
  with pytest.raises(ValueError, match=r"images_per_class=12 but class 0 \(a\) has only 11"):
    select(images_per_class=12)


@pytest.mark.parametrize("fraction,n_forget", [(0.25, 5), (0.01, 1), (0.99, 19)])
def test_forget_masks_samples_mode(fraction, n_forget):
  from fastntk_jax.data import schema, splits

  d = D.Split(np.zeros((20, 1, 1, 3)), np.arange(20) % 4, np.arange(20), "fake")
  holdout = D.Split(np.zeros((8, 1, 1, 3)), np.arange(8) % 4, np.arange(8), "fake")
  cfg = schema.resolve_data_config(num_classes=4, forget_mode="samples",
                                   forget_fraction=fraction, seed=3)
  classes, in_forget, test_in_forget = splits.forget_masks(d, holdout, cfg)
  assert classes == () and in_forget.sum() == n_forget and not test_in_forget.any()
  again = splits.forget_masks(d, holdout, cfg)[1]
  np.testing.assert_array_equal(in_forget, again)  # seeded
  cfg = schema.resolve_data_config(num_classes=4, forget_classes=[1, 3])
  classes, in_forget, test_in_forget = splits.forget_masks(d, holdout, cfg)
  assert classes == (1, 3)
  np.testing.assert_array_equal(in_forget, np.isin(d.y, [1, 3]))
  np.testing.assert_array_equal(test_in_forget, np.isin(holdout.y, [1, 3]))


# --------------------------------------------------------------------------------------------------
# minibatches
# --------------------------------------------------------------------------------------------------


def test_iterate_batches_pad_and_drop():
  x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
  y = np.arange(10)
  batches = list(D.iterate_batches((x, y), 4, seed=0))
  assert len(batches) == D.num_batches(10, 4) == 3
  for b in batches:
    assert b.x.shape == (4, 1, 1, 1) and b.y.shape == (4,) and b.y.dtype == np.int32
    real = b.mask > 0
    np.testing.assert_array_equal(b.x[real, 0, 0, 0], b.y[real])  # x and y stay paired
  seen = np.concatenate([b.y[b.mask > 0] for b in batches])
  np.testing.assert_array_equal(np.sort(seen), y)  # every example exactly once
  assert batches[-1].mask.tolist() == [1, 1, 0, 0] and (batches[-1].x[2:] == 0).all()
  again = list(D.iterate_batches((x, y), 4, seed=0))
  other_epoch = list(D.iterate_batches((x, y), 4, seed=0, epoch=1))
  assert all(np.array_equal(a.y, b.y) for a, b in zip(batches, again))
  assert not all(np.array_equal(a.y, b.y) for a, b in zip(batches, other_epoch))
  dropped = list(D.iterate_batches((x, y), 4, remainder="drop"))
  assert len(dropped) == D.num_batches(10, 4, "drop") == 2 and all(b.mask.all() for b in dropped)
  ordered = list(D.iterate_batches((x, y), 4, shuffle=False))
  np.testing.assert_array_equal(ordered[0].y, [0, 1, 2, 3])
  with pytest.raises(ValueError, match="remainder"):
    list(D.iterate_batches((x, y), 4, remainder="wrap"))
  with pytest.raises(ValueError, match="batch_size"):
    list(D.iterate_batches((x, y), 0))


def test_iterate_batches_on_split(digits_default):
  batches = list(D.iterate_batches(digits_default.forget, 32, seed=1))
  assert [b.mask.sum() for b in batches] == [32, 28]


# --------------------------------------------------------------------------------------------------
# TFDS (mocked: no download, no prepared data)
# --------------------------------------------------------------------------------------------------

try:
  import tensorflow as tf
  import tensorflow_datasets as tfds
  import fake_tfds
except ImportError:  # the lean install without the `tfds` extra: only these tests are skipped
  tf = tfds = fake_tfds = None
needs_tfds = pytest.mark.skipif(tfds is None,
                                reason="needs TensorFlow Datasets: pip install -e '.[tfds]'")


@needs_tfds
def test_cifar10_mock():
  with tfds.testing.mock_data(num_examples=200):
    d = D.load_unlearning_data(name="cifar10", images_per_class=5, holdout_per_class=3,
                               pretrain_per_class=4, image_size=16, forget_classes=[2])
  assert d.num_classes == 10 and d.image_shape == (16, 16, 3)
  assert d.counts() == {"pretrain": 40, "retain": 45, "forget": 5, "test_retain": 27,
                        "test_forget": 3}
  assert set(d.forget.y.tolist()) == {2} and 2 not in d.retain.y
  assert d.retain.source == "cifar10/train" and d.test_retain.source == "cifar10/test"
  train_pool = np.concatenate([d.pretrain.index, d.train.index])
  assert np.unique(train_pool).size == train_pool.size
  assert np.unique(d.test.index).size == d.test.index.size
  for s in d.splits().values():
    assert s.x.dtype == np.float32 and np.isfinite(s.x).all()
  # Pre-training split defaults to none for TFDS datasets (backbone from a checkpoint).
  with tfds.testing.mock_data(num_examples=200):
    d = D.load_unlearning_data(name="cifar10", images_per_class=2, holdout_per_class=1)
  assert d.pretrain is None and d.image_shape == (32, 32, 3)
  assert d.config.normalization == "cifar"
  with tfds.testing.mock_data(num_examples=30), \
          pytest.raises(ValueError, match=r"images_per_class=40 but class 0 \(0\) has only"):
    D.load_unlearning_data(name="cifar10", images_per_class=40, holdout_per_class=1)


# Fake ImageNet-R: 200 classes with ImageNet-1k ids 1, 6, 11, ... (not 0..199), in shuffled order,
# 3 images of random sizes each, so the 0..199 mapping and the per-class split are checkable.
_FAKE_IDS = np.arange(200) * 5 + 1  # as fake_tfds.IMAGENET_R_IDS


_fake_imagenet_r = fake_tfds.imagenet_r(3, image_size=None) if fake_tfds else None


@pytest.fixture
def fake_imagenet_r():  # function scope: the mock must not leak into other tests
  with tfds.testing.mock_data(as_dataset_fn=_fake_imagenet_r):
    def load(**kw):
      kw = {"holdout_per_class": 1, "images_per_class": 1, "image_size": 24, **kw}
      return D.load_unlearning_data(name="imagenet_r", **kw)
    yield load


@needs_tfds
def test_imagenet_r_mock_label_mapping(fake_imagenet_r):
  d = fake_imagenet_r(num_classes=20, seed=0)
  assert d.num_classes == 20 and d.image_shape == (24, 24, 3)
  # Mapped classes 0..19 are the 20 smallest ImageNet-1k ids, in increasing order.
  assert d.source_labels == tuple(int(i) for i in _FAKE_IDS[:20])
  names = tfds.builder("imagenet_r").info.features["label"].names
  assert d.class_names == tuple(names[i] for i in _FAKE_IDS[:20])
  assert d.counts() == {"pretrain": 0, "retain": 19, "forget": 1, "test_retain": 19,
                        "test_forget": 1}
  for s in (d.train, d.test):
    np.testing.assert_array_equal(np.sort(s.y), np.arange(20))
    assert s.x.min() >= -1 and s.x.max() <= 1  # default ViT normalisation
  # Train and hold-out come from the one TFDS split and never share an image.
  assert not set(d.train.index.tolist()) & set(d.test.index.tolist())
  # All 200 classes and an explicit list in the mapped space.
  d = fake_imagenet_r(seed=0)
  assert d.num_classes == 200 and d.source_labels == tuple(int(i) for i in _FAKE_IDS)
  d = fake_imagenet_r(classes=[199, 0], seed=0)
  assert d.source_labels == (int(_FAKE_IDS[199]), int(_FAKE_IDS[0]))


@needs_tfds
def test_imagenet_r_mock_seeded_split(fake_imagenet_r):
  a = fake_imagenet_r(num_classes=50, seed=0)
  b = fake_imagenet_r(num_classes=50, seed=0)
  c = fake_imagenet_r(num_classes=50, seed=1)
  np.testing.assert_array_equal(a.test.index, b.test.index)
  np.testing.assert_array_equal(a.train.x, b.train.x)
  assert not np.array_equal(a.test.index, c.test.index)
  with pytest.raises(ValueError,
                     match=r"images_per_class=3 but class 0 \(n\d+\) has only 2 images"):
    fake_imagenet_r(num_classes=20, images_per_class=3)


@needs_tfds
def test_not_prepared_error_names_the_command(tmp_path, monkeypatch):
  def no_download(*args, **kwargs):
    raise AssertionError("must not download unless manual_dir is given")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
  with pytest.raises(D.DatasetNotPreparedError) as e:
    D.load_unlearning_data(name="cifar10", data_dir=str(tmp_path))
  msg = str(e.value)
  assert isinstance(e.value, ValueError) and "\n" not in msg
  assert f"download_and_prepare --datasets=cifar10 --data_dir={tmp_path}" in msg
  assert "cifar-10-binary.tar.gz" in msg and "manual_dir" in msg
  with pytest.raises(D.DatasetNotPreparedError, match="--datasets=imagenet_r"):
    D.load_unlearning_data(name="imagenet_r", data_dir=str(tmp_path))


@needs_tfds
def test_manual_dir(tmp_path, monkeypatch):
  calls = []

  def fake_prepare(self, *args, download_config=None, **kwargs):
    calls.append(download_config)

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fake_prepare)
  manual, data_dir = tmp_path / "manual", tmp_path / "data"
  manual.mkdir()
  # Archive missing: the error names the exact file to put there; nothing is attempted.
  with pytest.raises(D.DatasetNotPreparedError, match=f"{manual}/cifar-10-binary.tar.gz"):
    D.load_unlearning_data(name="cifar10", data_dir=str(data_dir), manual_dir=str(manual))
  assert not calls
  # Archive present: TFDS is asked to prepare from manual_dir (a no-op here: still not prepared).
  (manual / "cifar-10-binary.tar.gz").write_bytes(b"")
  with pytest.raises(D.DatasetNotPreparedError):
    D.load_unlearning_data(name="cifar10", data_dir=str(data_dir), manual_dir=str(manual))
  assert len(calls) == 1 and str(calls[0].manual_dir) == str(manual)
  assert calls[0].try_download_gcs is False

  def missing_module(self, *args, **kwargs):
    raise ModuleNotFoundError("No module named 'importlib_resources'",
                              name="importlib_resources")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", missing_module)
  with pytest.raises(D.DatasetNotPreparedError, match="pip install importlib_resources"):
    D.load_unlearning_data(name="cifar10", data_dir=str(data_dir), manual_dir=str(manual))


@needs_tfds
def test_cifar10_prepared_on_disk(tmp_path, monkeypatch):
  """The real read path (TFRecords on disk, PNG decoding, two reads) on a tiny fake CIFAR-10."""
  rng = np.random.default_rng(0)
  images = {"train": rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8),
            "test": rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)}

  def fake_split_generators(self, dl_manager):
    def gen(split):
      for i, img in enumerate(images[split]):
        yield i, {"id": f"{split}_{i:05d}", "image": img, "label": i % 10}
    return {"train": gen("train"), "test": gen("test")}

  builder_cls = tfds.builder_cls("cifar10")
  monkeypatch.setattr(builder_cls, "_split_generators", fake_split_generators)
  # Preparing needs no checksums here, and reading them imports importlib_resources (see
  # data/sources.py). Set on the subclass by hand: monkeypatch would read the base-class
  # property first.
  assert "url_infos" not in vars(builder_cls)
  builder_cls.url_infos = {}
  try:
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  finally:
    del builder_cls.url_infos

  d = D.load_unlearning_data(name="cifar10", data_dir=str(tmp_path), images_per_class=4,
                             holdout_per_class=2, normalization="none", forget_classes=[3])
  assert d.counts() == {"pretrain": 0, "retain": 36, "forget": 4, "test_retain": 18,
                        "test_forget": 2}
  # Independent full read of each split (TFDS reorders examples when writing; indices are
  # positions in the read order): every selected image and label is the one at its index.
  for s, split in ((d.retain, "train"), (d.forget, "train"), (d.test, "test")):
    examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
    x = np.stack([ex["image"] for ex in examples]) / 255.0
    y = np.array([ex["label"] for ex in examples])
    np.testing.assert_allclose(s.x, x[s.index], atol=1e-6)
    np.testing.assert_array_equal(s.y, y[s.index])
  assert (d.forget.y == 3).all() and (d.test_forget.y == 3).all()
