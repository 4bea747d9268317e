"""chenyaofo's CIFAR MobileNetV2 state dicts (github.com/chenyaofo/pytorch-cifar-models,
`pytorch_cifar_models/mobilenetv2.py`) onto our `MobileNetV2`.

The state dicts here are built from a description of chenyaofo's network written from its
code (`_chenyaofo_modules`), not from our Flax model: names and shapes as `nn.Sequential`
numbers them, random values. Checked: the description against torchvision's published
parameter count; every leaf of our model set by the import; our logits against a NumPy
NCHW forward pass of the PyTorch network in eval mode; missing, unexpected, mis-shaped
tensors and the architectures a state dict cannot reveal refused by name."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax.models import checkpoints, get_model
from fastntk_jax.models import torch_import as ti

# chenyaofo's `inverted_residual_setting` (t, c, n, s), "change stride 2 -> 1 for CIFAR10/100"
# at the second row, and its stem at stride 1.
CHENYAOFO_SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                     (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _make_divisible(v, divisor=8):
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


def _chenyaofo_modules(width_mult=1.0, num_classes=100, setting=CHENYAOFO_SETTING):
  """chenyaofo's MobileNetV2 as (kind, state-dict prefix, options) in forward order.

  kinds: "cbr" (Conv2d no bias -> BatchNorm2d -> ReLU6, an nn.Sequential: .0 conv, .1 BN),
  "block" (InvertedResidual: `conv` is an nn.Sequential of [cbr expand (t != 1)], cbr
  depthwise, conv 1x1, BN; residual iff stride 1 and inp == oup), "linear" (classifier.1;
  classifier.0 is Dropout(0.2), the identity in eval mode).
  """
  inp = _make_divisible(32 * width_mult)
  last = _make_divisible(1280 * max(1.0, width_mult))
  modules = [("cbr", "features.0", dict(inp=3, out=inp, k=3, stride=1, groups=1))]
  for t, c, n, s in setting:
    out = _make_divisible(c * width_mult)
    for i in range(n):
      stride = s if i == 0 else 1
      hidden = int(round(inp * t))
      layers = []
      if t != 1:
        layers.append(("cbr", dict(inp=inp, out=hidden, k=1, stride=1, groups=1)))
      layers += [("cbr", dict(inp=hidden, out=hidden, k=3, stride=stride, groups=hidden)),
                 ("conv", dict(inp=hidden, out=out, k=1, stride=1, groups=1)),
                 ("bn", dict(out=out))]
      modules.append(("block", f"features.{len(modules)}",
                      dict(layers=layers, residual=stride == 1 and inp == out)))
      inp = out
  modules.append(("cbr", f"features.{len(modules)}", dict(inp=inp, out=last, k=1, stride=1,
                                                          groups=1)))
  modules.append(("linear", "classifier.1", dict(inp=last, out=num_classes)))
  return modules


def _state_dict(width_mult=1.0, num_classes=100, setting=CHENYAOFO_SETTING, seed=0,
                counters=True):
  """A state dict with chenyaofo's names and shapes and random values (BN statistics too)."""
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name, o):
    fan_in = o["inp"] // o["groups"] * o["k"] ** 2
    sd[name + ".weight"] = (rng.standard_normal((o["out"], o["inp"] // o["groups"], o["k"],
                                                 o["k"])) / np.sqrt(fan_in)).astype(np.float32)

  def bn(name, c):
    sd[name + ".weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[name + ".bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[name + ".running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[name + ".running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    if counters:
      sd[name + ".num_batches_tracked"] = np.array(7, np.int64)

  for kind, prefix, o in _chenyaofo_modules(width_mult, num_classes, setting):
    if kind == "cbr":
      conv(prefix + ".0", o)
      bn(prefix + ".1", o["out"])
    elif kind == "block":
      for j, (sub, so) in enumerate(o["layers"]):
        name = f"{prefix}.conv.{j}"
        if sub == "cbr":
          conv(name + ".0", so)
          bn(name + ".1", so["out"])
        elif sub == "conv":
          conv(name, so)
        else:
          bn(name, so["out"])
    else:
      sd[prefix + ".weight"] = (rng.standard_normal((o["out"], o["inp"])) / np.sqrt(o["inp"])
                                ).astype(np.float32)
      sd[prefix + ".bias"] = rng.normal(0, 0.1, o["out"]).astype(np.float32)
  return sd


# ---------------------------------------------------------------- NumPy NCHW reference


def _conv(x, w, stride, groups):
  """PyTorch's conv2d (no bias, padding (k-1)//2) in NumPy: x (N, C, H, W), w (O, C/g, k, k);
  groups 1 or depthwise (groups = C = O)."""
  k = w.shape[-1]
  pad = (k - 1) // 2
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  h_out = (x.shape[2] - k) // stride + 1
  w_out = (x.shape[3] - k) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], h_out, w_out), np.float64)
  for i in range(k):
    for j in range(k):
      patch = x[:, :, i:i + stride * h_out:stride, j:j + stride * w_out:stride]
      if groups == 1:
        out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
      else:
        assert groups == x.shape[1] == w.shape[0] and w.shape[1] == 1
        out += patch * w[None, :, 0, i, j, None, None]
  return out


def _bn(x, sd, name, eps=1e-5):
  g = lambda k: sd[f"{name}.{k}"][None, :, None, None].astype(np.float64)
  return (x - g("running_mean")) / np.sqrt(g("running_var") + eps) * g("weight") + g("bias")


def _reference_forward(sd, x_nhwc, width_mult, num_classes, setting=CHENYAOFO_SETTING):
  """chenyaofo's MobileNetV2 in eval mode on NCHW inputs, from the state dict alone."""
  relu6 = lambda v: np.clip(v, 0, 6)
  x = np.transpose(x_nhwc, (0, 3, 1, 2)).astype(np.float64)
  for kind, prefix, o in _chenyaofo_modules(width_mult, num_classes, setting):
    if kind == "cbr":
      x = relu6(_bn(_conv(x, sd[prefix + ".0.weight"], o["stride"], o["groups"]), sd,
                    prefix + ".1"))
    elif kind == "block":
      y = x
      for j, (sub, so) in enumerate(o["layers"]):
        name = f"{prefix}.conv.{j}"
        if sub == "cbr":
          y = relu6(_bn(_conv(y, sd[name + ".0.weight"], so["stride"], so["groups"]), sd,
                        name + ".1"))
        elif sub == "conv":
          y = _conv(y, sd[name + ".weight"], 1, 1)
        else:
          y = _bn(y, sd, name)
      x = x + y if o["residual"] else y
    else:
      feats = x.mean(axis=(2, 3))  # adaptive_avg_pool2d((1, 1)) + flatten
      return feats @ sd[prefix + ".weight"].T.astype(np.float64) + sd[prefix + ".bias"]
  raise AssertionError("no classifier")


def _nan_init(model, size=8):
  """Our variables' shapes (no init compiled), every value NaN: a leaf the import does not
  set stays NaN."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, size, size, 3))))
  return jax.tree_util.tree_map(lambda s: np.full(s.shape, np.nan, s.dtype), dict(shapes))


def _n_params(sd):
  return sum(v.size for k, v in sd.items()
             if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


# ---------------------------------------------------------------- tests


def test_the_description_is_torchvisions_network_and_ours_has_its_settings():
  """The description counts torchvision's published 3,504,872 parameters at 1000 classes
  (strides do not change the count), 2,351,972 at 100 (chenyaofo's README: 2.35M); our
  CIFAR settings and channel rounding are chenyaofo's."""
  from fastntk_jax.models import mobilenetv2  # pylint: disable=g-import-not-at-top
  assert _n_params(_state_dict(1.0, 1000, counters=False)) == 3_504_872
  assert _n_params(_state_dict(1.0, 100, counters=False)) == 2_351_972
  assert tuple(map(tuple, mobilenetv2.CIFAR_SETTINGS)) == CHENYAOFO_SETTING
  for v in [32 * w for w in (0.25, 0.5, 0.75, 1.0, 1.4)] + [1280 * 1.4, 24 * 0.35, 7.0]:
    assert mobilenetv2.make_divisible(v) == _make_divisible(v), v


def test_full_size_cifar100_state_dict_sets_every_leaf():
  """The x1_0 CIFAR-100 file's names and shapes (features.0-18, classifier.1, with the BN
  counters): every one of our 262 leaves is set (NaN before), none is left over."""
  sd = _state_dict(1.0, 100)
  model = get_model("mobilenetv2", 100)
  variables = ti.load_cifar_mobilenetv2(sd, _nan_init(model), dont_load=(), model=model)
  leaves = jax.tree_util.tree_leaves(variables)
  assert all(np.all(np.isfinite(v)) for v in leaves)
  loaded = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  assert len(leaves) == len(loaded) == 262
  assert sum(np.size(v) for v in jax.tree_util.tree_leaves(
      {k: variables[k] for k in ("params", "trainable")})) == 2_351_972
  np.testing.assert_array_equal(  # a depthwise kernel: (C, 1, 3, 3) -> (3, 3, 1, C)
      variables["params"]["stage3_block2"]["depthwise"]["conv"]["kernel"],
      np.transpose(sd["features.5.conv.1.0.weight"], (2, 3, 1, 0)))
  np.testing.assert_array_equal(  # stage 1 (t = 1): no expansion, the projection at conv.1/2
      variables["params"]["stage1_block1"]["project"]["conv"]["kernel"],
      np.transpose(sd["features.1.conv.1.weight"], (2, 3, 1, 0)))
  np.testing.assert_array_equal(variables["batch_stats"]["stage1_block1"]["project"]["bn"]["var"],
                                sd["features.1.conv.2.running_var"])
  np.testing.assert_array_equal(variables["trainable"]["last"]["bn"]["scale"],
                                sd["features.18.1.weight"])
  np.testing.assert_array_equal(variables["trainable"]["head"]["kernel"],
                                sd["classifier.1.weight"].T)
  # The default keeps the head at init (a 10-class task from the CIFAR-100 backbone).
  model10 = get_model("mobilenetv2", 10)
  init10 = _nan_init(model10)
  out = ti.load_state_dict("mobilenetv2", sd, init10, model=model10)
  assert np.all(np.isnan(out["trainable"]["head"]["kernel"]))
  assert np.all(np.isfinite(out["params"]["last"]["conv"]["kernel"]))


def test_imported_network_computes_what_chenyaofos_computes():
  """x0_5 (a published width), all 17 blocks, 16x16 inputs (2x2 before the pool): our
  logits equal the NumPy forward pass of the PyTorch network in eval mode."""
  sd = _state_dict(0.5, 7, seed=3)
  model = get_model("mobilenetv2", 7, width_mult=0.5)
  variables = ti.load_cifar_mobilenetv2(sd, _nan_init(model, 16), dont_load=(), model=model)
  x = np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  ours = np.asarray(apply(variables, x))
  ref = _reference_forward(sd, x, 0.5, 7)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
  assert np.std(ref) > 0.1  # not a degenerate network that any import would match
  # The check sees a layout error: kh and kw of the stem swapped give other logits.
  wrong = dict(sd)
  wrong["features.0.0.weight"] = np.transpose(sd["features.0.0.weight"], (0, 1, 3, 2)).copy()
  bad = np.asarray(apply(ti.load_cifar_mobilenetv2(wrong, variables, dont_load=()), x))
  assert not np.allclose(bad, ref, atol=1e-3)
  # ... and strides, which no state dict records: ImageNet's (stem and stage 2 at 2) differ.
  imagenet = ((1, 16, 1, 1), (6, 24, 2, 2), *CHENYAOFO_SETTING[2:])
  assert not np.allclose(_reference_forward(sd, x, 0.5, 7, imagenet), ref, atol=1e-3)


def _refusal(sd, variables, **kw):
  with pytest.raises(checkpoints.CheckpointError) as e:
    ti.load_cifar_mobilenetv2(sd, variables, **kw)
  return str(e.value)


def test_missing_unexpected_and_mis_shaped_tensors_are_refused_by_name():
  model = get_model("mobilenetv2", 10, width_mult=0.5)
  init = _nan_init(model)
  sd = _state_dict(0.5, 100)
  missing = dict(sd)
  del missing["features.5.conv.1.1.running_var"]
  msg = _refusal(missing, init)
  assert "1 model parameter(s) missing" in msg
  assert ("features.5.conv.1.1.running_var  (for batch_stats/stage3_block2/depthwise/bn/var)"
          in msg)
  extra = {**sd, "features.19.0.weight": np.zeros((8, 8, 1, 1), np.float32)}
  msg = _refusal(extra, init)
  assert "1 unexpected state-dict name(s):\n    features.19.0.weight" in msg
  shaped = dict(sd)
  shaped["features.3.conv.0.1.weight"] = sd["features.3.conv.0.1.weight"][:5]
  msg = _refusal(shaped, init)
  assert "features.3.conv.0.1.weight (5,) -> stage2_block2/expand/bn/scale: (5,) vs model (96,)" \
      in msg
  # Not loaded, so not checked: the CIFAR-100 head; loaded, its class count is.
  msg = _refusal(sd, init, dont_load=())
  assert "classifier.1.weight (100, 1280) -> head/kernel: (1280, 100) vs model (1280, 10)" in msg


def test_other_architectures_are_refused_with_what_to_change():
  model = get_model("mobilenetv2", 10)  # width 1.0
  init = _nan_init(model)
  msg = _refusal(_state_dict(0.75, 100), init)
  assert "stem has 24 channels, the model's 32: set model.options.width_mult=0.75" in msg
  fewer = _state_dict(1.0, 100, setting=CHENYAOFO_SETTING[:-1])
  assert "16 inverted-residual blocks (features.1-16), the model 17" in _refusal(fewer, init)
  # torchvision's ImageNet MobileNetV2: the same names and shapes, other strides.
  msg = _refusal(_state_dict(1.0, 1000), init)
  assert "1000-class classifier: torchvision's ImageNet MobileNetV2" in msg
  assert "missing" not in msg and "unexpected" not in msg
  # Our model with chenyaofo's channels but ImageNet's strides: the names all match.
  strided = get_model("mobilenetv2", 10, block_settings=((1, 16, 1, 1), (6, 24, 2, 2),
                                                         *CHENYAOFO_SETTING[2:]))
  msg = _refusal(_state_dict(1.0, 100), init, model=strided)
  assert "strides [1, 2, 2, 2, 1, 2, 1] differ from chenyaofo's CIFAR network's" in msg
  # A CIFAR ResNet state dict.
  msg = _refusal({"conv1.weight": np.zeros((16, 3, 3, 3), np.float32)}, init)
  assert "no features.* names: not a torchvision/chenyaofo MobileNetV2" in msg
  with pytest.raises(ValueError, match="No PyTorch state-dict importer for model 'vit_s16'"):
    ti.load_state_dict("vit_s16", {}, {})


class _NoProgress:
  def epochs(self, tag, total):
    return None


def test_pipeline_pretrain_stage_picks_the_mobilenetv2_importer(tmp_path):
  """`pretrain.source=state_dict` with `model.name=mobilenetv2` loads an .npz of chenyaofo's
  names (the tiny config's three blocks at width 0.25, chenyaofo's last conv of 1280)."""
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from fastntk_jax.experiment import pretrain  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = config_lib.load_config_file(os.path.join(root, "configs", "mobilenetv2_cifar10.py:tiny"))
  setting = ((1, 16, 1, 1), (6, 24, 1, 2), (6, 32, 1, 1))
  cfg.model.options = {"width_mult": 0.25, "block_settings": setting}
  cfg.pretrain.source = "state_dict"
  cfg.pretrain.path = str(tmp_path / "mbv2.npz")
  config_lib.validate(cfg)
  sd = _state_dict(0.25, 100, setting=setting)
  np.savez(cfg.pretrain.path, **sd)
  model = get_model("mobilenetv2", 4, **cfg.model.options)
  data = types.SimpleNamespace(image_shape=(8, 8, 3))
  variables = pretrain.pretrain_stage(cfg, model, data, str(tmp_path / "wd"), _NoProgress())
  np.testing.assert_array_equal(variables["params"]["stage2_block1"]["depthwise"]["conv"]["kernel"],
                                np.transpose(sd["features.2.conv.1.0.weight"], (2, 3, 1, 0)))
  assert variables["trainable"]["head"]["kernel"].shape == (1280, 4)  # the task's fresh head
  assert pretrain.pretrain_info(str(tmp_path / "wd")) == {"source": "state_dict",
                                                          "path": cfg.pretrain.path}


def test_docs_name_chenyaofos_input_normalisation():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "configs", "mobilenetv2_cifar10.py")) as f:
    config = f.read()
  for text in (ti.load_cifar_mobilenetv2.__doc__, config):
    assert "--config.data.normalization=cifar100" in text


def test_config_refuses_a_state_dict_for_a_vit_before_any_work():
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = config_lib.load_config_file(os.path.join(root, "configs", "vit_small_imagenet_r.py:tiny"))
  cfg.pretrain.source = "state_dict"
  cfg.pretrain.path = "vit.pt"
  with pytest.raises(ValueError, match="imports PyTorch CIFAR ResNets and MobileNetV2s, not "
                                       "model.name='vit_s16'"):
    config_lib.validate(cfg)


def test_a_refusal_of_a_state_dict_in_memory_reads_as_a_sentence():
  """The refusal's first line names where the state dict came from: a file by its path, a
  mapping passed in as 'in memory' (it read 'PyTorch state dict the given state dict does
  not match the model')."""
  model = get_model("mobilenetv2", 10, width_mult=0.5)
  sd = _state_dict(0.5, 100)
  del sd["features.0.1.running_var"]
  msg = _refusal(sd, _nan_init(model))
  assert msg.startswith("PyTorch state dict (in memory) does not match the model (MobileNetV2")
