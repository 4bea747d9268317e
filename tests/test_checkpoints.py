"""Checkpoints: ViT .npz import (names, errors, fresh head/prompts, pos-emb resampling); orbax."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax.models import FROZEN_PARAMS, TRAINABLE, get_model
from fastntk_jax.models import checkpoints as ck
from fastntk_jax.models.report import abstract_variables

# Tiny ViT: patch 4, D = 16, 2 blocks, 2 heads (head_dim 8), MLP 32.
_VIT = dict(patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)


def _npz_layout(num_layers=2, d=16, heads=2, mlp=32, patch=4, grid=2, classes=1000):
  """The public vision_transformer/AugReg key names and shapes, written out by hand."""
  hd = d // heads
  shapes = {
      "embedding/kernel": (patch, patch, 3, d), "embedding/bias": (d,),
      "cls": (1, 1, d),
      "Transformer/posembed_input/pos_embedding": (1, grid * grid + 1, d),
      "Transformer/encoder_norm/scale": (d,), "Transformer/encoder_norm/bias": (d,),
      "head/kernel": (d, classes), "head/bias": (classes,),
  }
  for i in range(num_layers):
    b = f"Transformer/encoderblock_{i}"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      shapes[f"{b}/{ln}/scale"] = (d,)
      shapes[f"{b}/{ln}/bias"] = (d,)
    for name in ("query", "key", "value"):
      shapes[f"{b}/MultiHeadDotProductAttention_1/{name}/kernel"] = (d, heads, hd)
      shapes[f"{b}/MultiHeadDotProductAttention_1/{name}/bias"] = (heads, hd)
    shapes[f"{b}/MultiHeadDotProductAttention_1/out/kernel"] = (heads, hd, d)
    shapes[f"{b}/MultiHeadDotProductAttention_1/out/bias"] = (d,)
    shapes[f"{b}/MlpBlock_3/Dense_0/kernel"] = (d, mlp)
    shapes[f"{b}/MlpBlock_3/Dense_0/bias"] = (mlp,)
    shapes[f"{b}/MlpBlock_3/Dense_1/kernel"] = (mlp, d)
    shapes[f"{b}/MlpBlock_3/Dense_1/bias"] = (d,)
  return shapes


def _write_npz(path, shapes, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
  np.savez(path, **arrays)
  return arrays


def _fresh(image=8, **kwargs):
  """Stand-in for `model.init` values: distinctive constants per leaf (no RNG compiles)."""
  model = get_model("vit_s16", 7, **{**_VIT, **kwargs})
  abstract = abstract_variables(model, (image, image, 3))
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  return model, jax.tree_util.tree_unflatten(
      treedef, [jnp.full(l.shape, 1000.0 + i, l.dtype) for i, l in enumerate(leaves)])


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def test_public_layout_loads_with_fresh_head_and_prompts(tmp_path):
  path = str(tmp_path / "vit.npz")
  arrays = _write_npz(path, _npz_layout())
  model, init = _fresh(prompt_length=3)
  loaded = ck.load_vit_npz(path, init)
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(init)
  for name, value in _flat(loaded[FROZEN_PARAMS]).items():
    np.testing.assert_array_equal(value, arrays[name], err_msg=name)  # every frozen leaf loaded
  # Head (1000-class in the checkpoint, 7 here) and prompts keep their init values.
  for name, value in _flat(loaded[TRAINABLE]).items():
    np.testing.assert_array_equal(value, _flat(init[TRAINABLE])[name], err_msg=name)
  assert any("prompt_k" in n for n in _flat(loaded[TRAINABLE]))
  assert model.apply(loaded, jnp.zeros((2, 8, 8, 3))).shape == (2, 7)


def test_head_loads_when_not_excluded(tmp_path):
  path = str(tmp_path / "vit.npz")
  arrays = _write_npz(path, _npz_layout(classes=7))
  _, init = _fresh(prompt_length=3)
  loaded = ck.load_vit_npz(path, init, dont_load=())
  np.testing.assert_array_equal(loaded[TRAINABLE]["head"]["kernel"], arrays["head/kernel"])
  name = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/prompt_v"
  np.testing.assert_array_equal(_flat(loaded[TRAINABLE])[name], _flat(init[TRAINABLE])[name])


def test_missing_unexpected_and_shape_errors_name_the_keys(tmp_path):
  shapes = _npz_layout()
  del shapes["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"]
  shapes["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/qkv/kernel"] = (16, 48)
  shapes["pre_logits/kernel"] = (16, 16)
  shapes["Transformer/encoderblock_0/LayerNorm_0/scale"] = (15,)
  path = str(tmp_path / "bad.npz")
  _write_npz(path, shapes)
  _, init = _fresh()
  with pytest.raises(ck.CheckpointError) as err:
    ck.load_vit_npz(path, init)
  msg = str(err.value)
  assert "1 model parameter(s) missing" in msg
  assert "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias" in msg
  # pre_logits (an ImageNet-21k checkpoint's representation layer) is dropped on purpose, with
  # a log line (tests/test_vit_weights.py); every other unknown name is refused.
  assert "1 unexpected checkpoint name(s)" in msg
  assert "MultiHeadDotProductAttention_1/qkv/kernel" in msg and "pre_logits" not in msg
  assert "Transformer/encoderblock_0/LayerNorm_0/scale: checkpoint (15,) vs model (16,)" in msg
  # dont_load silences exactly the names it matches.
  shapes = _npz_layout()
  shapes["Transformer/extra/kernel"] = (16, 16)
  _write_npz(path, shapes)
  with pytest.raises(ck.CheckpointError, match="Transformer/extra/kernel"):
    ck.load_vit_npz(path, init)
  ck.load_vit_npz(path, init, dont_load=("head/.*", "Transformer/extra/.*"))


def test_unreadable_npz_is_a_clear_error(tmp_path):
  path = str(tmp_path / "vit.npz")
  _write_npz(path, _npz_layout())
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  _, init = _fresh()
  with pytest.raises(ck.CheckpointError, match="truncated or not an .npz"):
    ck.load_vit_npz(path, init)
  with pytest.raises(FileNotFoundError, match="No ViT checkpoint"):
    ck.load_vit_npz(str(tmp_path / "nope.npz"), init)


def test_posemb_is_resampled_keeping_cls(tmp_path):
  # Checkpoint at a 2x2 patch grid (8x8 images), model at 4x4 (16x16 images).
  path = str(tmp_path / "vit.npz")
  shapes = _npz_layout(grid=2)
  arrays = _write_npz(path, shapes)
  # A linear ramp over the grid: bilinear zoom must keep it a ramp with the same end points.
  ramp = np.linspace(0.0, 1.0, 2, dtype=np.float32)
  grid = (ramp[:, None, None] + 2 * ramp[None, :, None]) * np.ones((1, 1, 16), np.float32)
  cls_tok = np.full((1, 1, 16), 5.0, np.float32)
  arrays["Transformer/posembed_input/pos_embedding"] = np.concatenate(
      [cls_tok, grid.reshape(1, 4, 16)], axis=1)
  np.savez(path, **arrays)
  _, init = _fresh(image=16)
  loaded = ck.load_vit_npz(path, init)
  pe = np.asarray(loaded[FROZEN_PARAMS]["Transformer"]["posembed_input"]["pos_embedding"])
  assert pe.shape == (1, 17, 16)
  np.testing.assert_array_equal(pe[:, :1], cls_tok)
  new = pe[0, 1:].reshape(4, 4, 16)[..., 0]
  r = np.linspace(0.0, 1.0, 4)
  np.testing.assert_allclose(new, r[:, None] + 2 * r[None, :], atol=1e-6)
  with pytest.raises(ck.CheckpointError, match="square"):
    ck.resample_posemb(np.zeros((1, 6, 16)), 17)


def test_real_size_npz_layout_matches_vit_b16():
  # The hand-written public layout at real size equals our ViT-B/16's names and shapes.
  model = get_model("vit_b16", 1000, prompt_length=0)
  v = abstract_variables(model, (224, 224, 3))
  ours = {**{k: tuple(x.shape) for k, x in _flat(v[FROZEN_PARAMS]).items()},
          **{k: tuple(x.shape) for k, x in _flat(v[TRAINABLE]).items()}}
  assert ours == _npz_layout(num_layers=12, d=768, heads=12, mlp=3072, patch=16, grid=14)


# ----------------------------------------------------------------------------- orbax


def _variables():
  model = get_model("resnet8", 3, widths=(4, 8, 8))
  abstract = abstract_variables(model, (8, 8, 3))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(
      lambda l: jnp.asarray(rng.standard_normal(l.shape), l.dtype), abstract), abstract


def test_orbax_round_trip(tmp_path):
  variables, abstract = _variables()
  path = str(tmp_path / "ckpt" / "step_1")
  ck.save_checkpoint(path, variables)
  restored = ck.restore_checkpoint(path, abstract)  # abstract target (eval_shape) works
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(variables)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, variables)
  assert isinstance(jax.tree_util.tree_leaves(restored)[0], jax.Array)
  # Only complete checkpoints appear at `path`; no temporary directories are left behind.
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_1"]

  with pytest.raises(FileExistsError, match="overwrite=True"):
    ck.save_checkpoint(path, variables)
  doubled = jax.tree_util.tree_map(lambda a: 2 * a, variables)
  ck.save_checkpoint(path, doubled, overwrite=True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ck.restore_checkpoint(path, variables),
                         doubled)
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_1"]


def test_orbax_bad_checkpoints_give_clear_errors(tmp_path):
  variables, abstract = _variables()
  path = str(tmp_path / "ck")
  ck.save_checkpoint(path, variables)
  # Truncate every data file: what a copy interrupted half-way leaves.
  data = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
          if os.path.basename(d) == "d"]
  assert data
  for f in data:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)
  with pytest.raises(ck.CheckpointError, match="corrupt or truncated"):
    ck.restore_checkpoint(path, abstract)

  path2 = str(tmp_path / "ck2")
  ck.save_checkpoint(path2, variables)
  os.remove(os.path.join(path2, "_METADATA"))
  try:  # older orbax needs the metadata; orbax >= 0.12 restores from the data files alone
    restored = ck.restore_checkpoint(path2, abstract)
  except ck.CheckpointError as e:
    assert "corrupt or truncated" in str(e)
  else:  # then it must be the saved values, not garbage
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(variables)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # A save killed mid-write leaves only orbax's temporary directory.
  os.makedirs(str(tmp_path / "ck3.orbax-checkpoint-tmp-123"))
  with pytest.raises(FileNotFoundError, match="unfinished save"):
    ck.restore_checkpoint(str(tmp_path / "ck3"), abstract)

  # Restoring into a different model names the differences.
  path4 = str(tmp_path / "ck4")
  ck.save_checkpoint(path4, variables)
  other = abstract_variables(get_model("resnet8", 5, widths=(4, 8, 8)), (8, 8, 3))
  with pytest.raises(ck.CheckpointError,
                     match=r"head/kernel: checkpoint \(8, 3\) vs target \(8, 5\)"):
    ck.restore_checkpoint(path4, other)


def test_orbax_folder_without_metadata_is_refused_before_restoring(tmp_path, caplog):
  # Orbax >= 0.12 answers metadata() on a stray folder with an empty StepMetadata; restoring it
  # anyway failed inside orbax's event loop, which logged a traceback per leaf (CI, lean stack).
  _, abstract = _variables()
  bad = tmp_path / "ckpt"
  bad.mkdir()
  (bad / "garbage").write_bytes(b"not a checkpoint")
  with caplog.at_level("ERROR"):
    with pytest.raises(ck.CheckpointError, match="_METADATA"):  # orbax < 0.12 says it too
      ck.restore_checkpoint(str(bad), abstract)
  assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
