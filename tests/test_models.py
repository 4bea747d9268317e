"""Models: exact parameter counts, the trainable collection, apply_fn purity, BatchNorm, prompts.

Real-size models are only ever built with `jax.eval_shape`; everything that runs uses tiny
configurations (8x8 images, a few channels) so the file runs in seconds on a CPU.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax.models import (BATCH_STATS, FROZEN_PARAMS, MODEL_NAMES, TRAINABLE, count_params,
                                get_model, make_apply_fn, make_train_apply_fn, merge, split)
from fastntk_jax.models import report
from fastntk_jax.models.layers import BatchNorm
from fastntk_jax.models.vit import VisionTransformer


def _abstract(name, num_classes, image=32, **kwargs):
  model = get_model(name, num_classes, **kwargs)
  return model, report.abstract_variables(model, (image, image, 3))


def _fill(abstract, seed=0):
  """Random values for an abstract variables tree, drawn with numpy.

  Avoids `model.init`, whose first call compiles one random-number program per parameter
  shape (seconds on a loaded CPU); `test_init_*` covers init itself.
  """
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    name = path[-1].key
    if name == "var":
      x = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == "scale":
      x = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif len(leaf.shape) <= 1:
      x = 0.1 * rng.standard_normal(leaf.shape)
    else:
      x = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(one, abstract)


def _counts(variables):
  return {col: count_params(tree) for col, tree in variables.items()}


# ----------------------------------------------------------------------------- exact counts


def test_resnet110_matches_he_et_al():
  # He et al. 2016, Table 6: ResNet-110 on CIFAR-10 has 1.7M parameters. Derivation (option A,
  # no biases in convs): stem 3*3*3*16 = 432; stage 1: 36 convs 3*3*16*16 = 82,944; stage 2:
  # 3*3*16*32 + 35 * 3*3*32*32 = 327,168; stage 3: 3*3*32*64 + 35 * 3*3*64*64 = 1,308,672;
  # conv total 1,719,216 (frozen). BN: 109 layers, 2 * (16 + 36*16 + 36*32 + 36*64) = 8,096;
  # head 64*10 + 10 = 650. Total 1,727,962 = 1.73M.
  _, v = _abstract("resnet110", 10)
  counts = _counts(v)
  assert counts[FROZEN_PARAMS] == 1_719_216
  assert counts[TRAINABLE] == 8_096 + 650
  assert counts[FROZEN_PARAMS] + counts[TRAINABLE] == 1_727_962
  assert counts[BATCH_STATS] == 8_096  # mean/var: as many as scale/bias, not counted as params


def test_resnet110_option_b_adds_two_projections():
  # Option B adds 1x1 convs 16->32 and 32->64 (512 + 2,048) and their BNs (2*32 + 2*64):
  # 1,730,714 -- also "1.7M", which is why the text of He et al. (option A on CIFAR) decides.
  _, v = _abstract("resnet110", 10, shortcut="B")
  counts = _counts(v)
  assert counts[FROZEN_PARAMS] + counts[TRAINABLE] == 1_727_962 + 2_560 + 192
  assert counts[TRAINABLE] == 8_746 + 192


@pytest.mark.parametrize("name,total", [
    # He et al. 2016 Table 6: 0.27M, 0.46M, 0.66M, 0.85M (option A, 10 classes).
    ("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586),
    ("resnet56", 853_018)])
def test_cifar_resnet_family_counts(name, total):
  _, v = _abstract(name, 10)
  counts = _counts(v)
  assert counts[FROZEN_PARAMS] + counts[TRAINABLE] == total
  n = (int(name[len("resnet"):]) - 2) // 6
  assert counts[TRAINABLE] == 2 * (16 + 2 * n * (16 + 32 + 64)) + 650


def test_mobilenetv2_count_matches_torchvision():
  # torchvision.models.mobilenet_v2(num_classes=10) has 2,236,682 parameters; the CIFAR
  # variant changes only strides. Trainable: 52 conv+BN layers with 17,056 output channels
  # in total (2 * 17,056 = 34,112) + head 1280*10 + 10.
  _, v = _abstract("mobilenetv2", 10)
  counts = _counts(v)
  assert counts[FROZEN_PARAMS] + counts[TRAINABLE] == 2_236_682
  assert counts[TRAINABLE] == 34_112 + 12_810
  kernels = [x for x in jax.tree_util.tree_leaves(v[FROZEN_PARAMS]) if x.ndim == 4]
  assert len(kernels) == 52


@pytest.mark.parametrize("name,total,d", [
    # ViT at 224x224 with a 1000-class head, no prompts. Per block: 2 LayerNorms 4D, attention
    # 4(D^2 + D), MLP 8D^2 + 5D; plus patch embedding 768D + D, cls D, position embedding
    # 197D, encoder norm 2D, head 1000D + 1000.
    # B/16, D=768: 590,592 + 768 + 151,296 + 12*7,087,872 + 1,536 + 769,000 = 86,567,656.
    ("vit_b16", 86_567_656, 768),
    # S/16, D=384: 295,296 + 384 + 75,648 + 12*1,774,464 + 768 + 385,000 = 22,050,664.
    ("vit_s16", 22_050_664, 384),
    # Ti/16, D=192: 147,648 + 192 + 37,824 + 12*444,864 + 384 + 193,000 = 5,717,416.
    ("vit_ti16", 5_717_416, 192),
])
def test_vit_counts(name, total, d):
  _, v = _abstract(name, 1000, image=224, prompt_length=0)
  counts = _counts(v)
  assert counts[FROZEN_PARAMS] + counts[TRAINABLE] == total
  assert counts[TRAINABLE] == 1000 * d + 1000  # only the head without prompts
  assert BATCH_STATS not in v


@pytest.mark.parametrize("length,blocks,n_prompted", [(4, None, 12), (10, (0, 1, 2), 3),
                                                       (1, (11,), 1)])
def test_vit_prompt_count_is_2LD_per_block(length, blocks, n_prompted):
  # 32x32 images (2x2 patches): the prompt count does not depend on the resolution.
  _, plain = _abstract("vit_b16", 20, image=32, prompt_length=0)
  _, v = _abstract("vit_b16", 20, image=32, prompt_length=length, prompt_blocks=blocks)
  assert count_params(v[TRAINABLE]) == 2 * length * 768 * n_prompted + 768 * 20 + 20
  # Prompts are additions: the frozen tree is the same as the plain ViT's.
  assert jax.tree_util.tree_structure(v[FROZEN_PARAMS]) == \
      jax.tree_util.tree_structure(plain[FROZEN_PARAMS])
  prompts = [k for k in flax.traverse_util.flatten_dict(v[TRAINABLE], sep="/") if "prompt" in k]
  assert len(prompts) == 2 * n_prompted
  assert all(k.startswith("Transformer/encoderblock_") and
             "/MultiHeadDotProductAttention_1/prompt_" in k for k in prompts)


def test_report_matches_formulas_and_cli(capsys):
  rows = report.paper_reports()
  assert [r.name for r in rows] == ["ResNet-110", "MobileNetV2", "ViT-S/16", "ViT-B/16"]
  for r in rows:
    assert r.trainable == r.analytic_trainable
  assert rows[0].total == 1_727_962 and rows[0].trainable == 8_746
  assert rows[3].trainable == 2 * 4 * 768 * 12 + 768 * 20 + 20
  # The paper's bounds (Sec. IV): < 4.88% of parameters for the CNNs, < 0.4% for the ViTs.
  assert all(r.trainable_percent < 4.88 for r in rows[:2])
  assert all(r.trainable_percent < 0.4 for r in rows[2:])
  assert report.main([]) == 0
  out = capsys.readouterr().out
  assert "| ResNet-110 |" in out and "1,727,962" in out and "85,887,764" in out


# ----------------------------------------------------------------------------- construction


def test_get_model_errors():
  with pytest.raises(ValueError, match="valid names.*resnet110.*vit_b16"):
    get_model("resnet18", 10)
  with pytest.raises(ValueError, match="Unknown option.*prompt_length.*valid options"):
    get_model("resnet20", 10, prompt_length=3)
  with pytest.raises(ValueError, match="num_classes"):
    get_model("vit_s16", 0)
  with pytest.raises(ValueError, match="prompt_blocks \\[12\\] out of range"):
    _abstract("vit_s16", 10, prompt_blocks=(0, 12))
  assert set(MODEL_NAMES) >= {"resnet8", "resnet20", "resnet32", "resnet44", "resnet56",
                              "resnet110", "mobilenetv2", "vit_ti16", "vit_s16", "vit_b16"}


def test_collections_hold_the_right_leaves():
  _, v = _abstract("resnet8", 10)
  assert set(v) == {FROZEN_PARAMS, TRAINABLE, BATCH_STATS}
  frozen = flax.traverse_util.flatten_dict(v[FROZEN_PARAMS], sep="/")
  trainable = flax.traverse_util.flatten_dict(v[TRAINABLE], sep="/")
  assert all(k.endswith("/kernel") and x.ndim == 4 for k, x in frozen.items())  # convs only
  assert all(k.split("/")[-1] in ("scale", "bias", "kernel") for k in trainable)
  assert {k for k in trainable if k.startswith("head/")} == {"head/kernel", "head/bias"}
  assert all(k.startswith("head/") or k.split("/")[-2].startswith("bn") for k in trainable)


def test_split_merge_and_loud_failures():
  model = get_model("resnet8", 3, widths=(4, 8, 8))
  variables = report.abstract_variables(model, (8, 8, 3))
  trainable, frozen = split(variables)
  assert set(frozen) == {FROZEN_PARAMS, BATCH_STATS}
  back = merge(trainable, frozen)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(variables)
  with pytest.raises(ValueError, match="no 'trainable' collection"):
    split({"params": variables["params"]})
  with pytest.raises(ValueError, match="'trainable' collection is empty"):
    split({"params": variables["params"], "trainable": {}})
  with pytest.raises(ValueError, match="already contains"):
    merge(trainable, variables)
  with pytest.raises(ValueError, match="contains the 'trainable' collection"):
    make_apply_fn(model, variables)


# ----------------------------------------------------------------------------- apply_fn


_TINY = {
    "resnet8": dict(widths=(4, 8, 8)),
    "mobilenetv2": dict(width_mult=0.5, last_channel=16,
                        block_settings=((1, 8, 1, 1), (2, 12, 2, 2))),
    "vit": dict(patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                prompt_length=3),
}


def _tiny(name, num_classes=5):
  kwargs = _TINY["vit" if name.startswith("vit") else name]
  model = get_model(name, num_classes, **kwargs)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 8, 8, 3)), jnp.float32)
  return model, _fill(report.abstract_variables(model, (8, 8, 3))), x


def test_init_values_of_trainable_layers():
  # `model.init` structure is checked through jax.eval_shape (same tracing) in the count
  # tests; here the init *values* of the layers that own trainable variables. (A full eager
  # init compiles one random program per parameter shape: seconds, for nothing more.)
  from fastntk_jax.models.layers import TrainableDense
  from fastntk_jax.models.vit import PromptedAttention
  head = TrainableDense(5).init(jax.random.PRNGKey(0), jnp.zeros((1, 16)))
  assert set(head) == {TRAINABLE}
  # The head is not zero-initialised (a zero head would zero the prompt/BN Jacobian at w0).
  assert float(jnp.abs(head[TRAINABLE]["kernel"]).max()) > 0
  att = PromptedAttention(num_heads=2, prompt_length=3, patch_size=4).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 5, 16)))
  assert set(att) == {FROZEN_PARAMS, TRAINABLE}
  assert set(att[TRAINABLE]) == {"prompt_k", "prompt_v"}
  bound = np.sqrt(6 / (3 * 4**2 + 16))  # VPT's uniform prompt init
  for p in att[TRAINABLE].values():
    assert p.shape == (3, 16) and 0 < float(jnp.abs(p).max()) <= bound
  assert not np.allclose(att[TRAINABLE]["prompt_k"], att[TRAINABLE]["prompt_v"])
  bn = BatchNorm().init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 3)))
  np.testing.assert_array_equal(bn[TRAINABLE]["scale"], np.ones(3))
  np.testing.assert_array_equal(bn[TRAINABLE]["bias"], np.zeros(3))
  np.testing.assert_array_equal(bn[BATCH_STATS]["mean"], np.zeros(3))
  np.testing.assert_array_equal(bn[BATCH_STATS]["var"], np.ones(3))


@pytest.mark.parametrize("name", ["resnet8", "mobilenetv2", "vit_s16"])
def test_apply_fn_logits_and_gradients(name):
  model, variables, x = _tiny(name)
  trainable, frozen = split(variables)
  apply_fn = make_apply_fn(model, frozen)

  # Only the trainable leaves are inputs of the traced function; the frozen arrays are
  # closed-over constants, so nothing else can be differentiated.
  jaxpr = jax.make_jaxpr(apply_fn)(trainable, x)
  assert len(jaxpr.jaxpr.invars) == len(jax.tree_util.tree_leaves(trainable)) + 1

  def loss(t):
    logits = apply_fn(t, x)
    return jnp.sum(jnp.sin(logits)), (logits, apply_fn(t, x[1:2]))

  grads, (logits, single) = jax.jit(jax.grad(loss, has_aux=True))(trainable)
  assert logits.shape == (4, 5)
  # BatchNorm in inference mode (CNNs), nothing across samples (ViT): each sample's logits
  # depend on that sample alone, which the NTK's vmap_axes=0 relies on.
  np.testing.assert_allclose(logits[1:2], single, rtol=1e-5, atol=1e-6)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
  names = flax.traverse_util.flatten_dict(grads, sep="/")
  zero = [k for k, g in names.items() if not np.any(np.asarray(g) != 0)]
  assert not zero, f"zero gradient for {zero}"


@pytest.mark.slow
def test_train_apply_fn_updates_running_stats():
  model, variables, x = _tiny("resnet8")
  trainable, frozen = split(variables)
  train_fn = jax.jit(make_train_apply_fn(model, frozen))
  logits, stats = train_fn(trainable, x)
  assert logits.shape == (4, 5)
  assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(frozen[BATCH_STATS])
  moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), stats, frozen[BATCH_STATS])
  assert all(jax.tree_util.tree_leaves(moved))
  # Passing the stats back in continues the running average (no recompilation needed).
  _, stats2 = train_fn(trainable, x, stats)
  assert not np.allclose(stats2["bn_init"]["var"], stats["bn_init"]["var"])
  # Training mode uses batch statistics: outputs differ from inference mode.
  assert not np.allclose(logits, make_apply_fn(model, frozen)(trainable, x))
  vit, vit_vars, _ = _tiny("vit_b16")
  t, f = split(vit_vars)
  out, vit_stats = make_train_apply_fn(vit, f)(t, x)
  assert out.shape == (4, 5) and vit_stats == {}


def test_batchnorm_against_closed_form():
  x = jax.random.normal(jax.random.PRNGKey(2), (6, 3, 3, 4)) * 3.0 + 1.0
  bn = BatchNorm()
  v = jax.eval_shape(bn.init, jax.random.PRNGKey(0), x)
  assert set(v) == {TRAINABLE, BATCH_STATS}
  v = {TRAINABLE: {"scale": jnp.array([1., 2., 3., 4.]), "bias": jnp.array([0., 1., -1., .5])},
       BATCH_STATS: {"mean": jnp.zeros(4), "var": jnp.ones(4)}}
  y, upd = bn.apply(v, x, train=True, mutable=[BATCH_STATS])
  xn = np.asarray(x).reshape(-1, 4)
  mean, var = xn.mean(0), xn.var(0)
  expect = (np.asarray(x) - mean) / np.sqrt(var + 1e-5) * v[TRAINABLE]["scale"] + \
      v[TRAINABLE]["bias"]
  np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(upd[BATCH_STATS]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd[BATCH_STATS]["var"], 0.9 + 0.1 * var, rtol=1e-5)
  v2 = {**v, BATCH_STATS: upd[BATCH_STATS]}
  y_eval = bn.apply(v2, x, train=False)
  expect = (np.asarray(x) - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-5) * \
      v[TRAINABLE]["scale"] + v[TRAINABLE]["bias"]
  np.testing.assert_allclose(y_eval, expect, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- prompts


class _FlaxMlp(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, z):
    d = z.shape[-1]
    return nn.Dense(d, name="Dense_1")(nn.gelu(nn.Dense(self.mlp_dim, name="Dense_0")(z)))


class _FlaxEncoderBlock(nn.Module):
  """Independent plain ViT block built on flax's own MultiHeadDotProductAttention."""

  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads,
                                        name="MultiHeadDotProductAttention_1")(y, y)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_2")(x)
    return x + _FlaxMlp(self.mlp_dim, name="MlpBlock_3")(y)


class _FlaxPos(nn.Module):

  @nn.compact
  def __call__(self, h):
    return h + self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + h.shape[1:])


class _FlaxTransformer(nn.Module):
  layers: int
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, z):
    z = _FlaxPos(name="posembed_input")(z)
    for i in range(self.layers):
      z = _FlaxEncoderBlock(self.heads, self.mlp, name=f"encoderblock_{i}")(z)
    return nn.LayerNorm(epsilon=1e-6, name="encoder_norm")(z)


class _FlaxViT(nn.Module):
  """Reference plain ViT (all weights in `params`), written independently of models/vit.py."""

  num_classes: int
  patch: int
  d: int
  layers: int
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.d, (self.patch, self.patch), strides=self.patch, padding="VALID",
                name="embedding")(x)
    n = x.shape[0]
    x = x.reshape(n, -1, self.d)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.d))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = _FlaxTransformer(self.layers, self.heads, self.mlp, name="Transformer")(x)
    return nn.Dense(self.num_classes, name="head")(x[:, 0])


@pytest.mark.slow
def test_prompt_length_zero_equals_plain_flax_vit():
  ref = _FlaxViT(num_classes=5, patch=4, d=16, layers=2, heads=2, mlp=32)
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 8, 8, 3))
  # Non-zero values everywhere (zero-init cls/biases would hide a swapped name).
  ref_params = _fill(jax.eval_shape(ref.init, jax.random.PRNGKey(7), x)["params"], seed=8)
  expected = jax.jit(ref.apply)({"params": ref_params}, x)

  flat = flax.traverse_util.flatten_dict(ref_params, sep="/")
  for length, blocks in [(0, None), (3, ())]:  # no prompts at all / prompts in no block
    model = get_model("vit_s16", 5, **{**_TINY["vit"], "prompt_length": length,
                                       "prompt_blocks": blocks})
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    params = flax.traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if not k.startswith("head/")}, sep="/")
    head = flax.traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if k.startswith("head/")}, sep="/")
    # The plain model's names are exactly ours: same tree, head moved to `trainable`.
    assert jax.tree_util.tree_structure(params) == \
        jax.tree_util.tree_structure(variables[FROZEN_PARAMS])
    assert jax.tree_util.tree_structure(head) == jax.tree_util.tree_structure(variables[TRAINABLE])
    out = model.apply({FROZEN_PARAMS: params, TRAINABLE: head}, x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

  # With prompts the output changes, and prompts are prepended to keys/values only.
  model = get_model("vit_s16", 5, **_TINY["vit"])
  variables = _fill(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  prompted = model.apply({FROZEN_PARAMS: params, TRAINABLE: {**variables[TRAINABLE], **head}}, x)
  assert prompted.shape == expected.shape
  assert not np.allclose(prompted, expected, atol=1e-4)


def test_prompts_are_prepended_to_keys_and_values():
  # One block by hand: softmax(q [p_k; k]^T / sqrt(hd)) [p_v; v], then `out`.
  from fastntk_jax.models.vit import PromptedAttention
  att = PromptedAttention(num_heads=2, prompt_length=3)
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 8))
  v = _fill(jax.eval_shape(att.init, jax.random.PRNGKey(0), x))
  assert v[TRAINABLE]["prompt_k"].shape == (3, 8)
  p = v[FROZEN_PARAMS]
  dense = lambda name, z: jnp.einsum("ntd,dhk->nthk", z, p[name]["kernel"]) + p[name]["bias"]
  q, k, val = dense("query", x), dense("key", x), dense("value", x)
  pk = v[TRAINABLE]["prompt_k"].reshape(1, 3, 2, 4).repeat(2, 0)
  pv = v[TRAINABLE]["prompt_v"].reshape(1, 3, 2, 4).repeat(2, 0)
  k, val = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, val], 1)
  w = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k) / 2.0, axis=-1)
  o = jnp.einsum("nhqk,nkhd->nqhd", w, val)
  expect = jnp.einsum("nqhd,hde->nqe", o, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(jax.jit(att.apply)(v, x), expect, rtol=1e-5, atol=1e-5)


def test_vit_rejects_bad_image_size():
  model = get_model("vit_s16", 5, **_TINY["vit"])
  with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 10, 10, 3)))
