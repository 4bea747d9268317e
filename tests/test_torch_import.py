"""PyTorch CIFAR ResNet state dicts onto our ResNet: names (module. prefix,
num_batches_tracked, linear/fc, shortcut/downsample), layouts (NCHW conv kernels), files
(.npz, .safetensors without torch; .pt with torch only if installed), readable diffs, and
the imported network's output against a NumPy NCHW reference of the PyTorch network."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax.models import checkpoints, get_model
from fastntk_jax.models import torch_import as ti

WIDTHS = (4, 8, 16)


def _torch_state_dict(depth=8, shortcut="A", head="linear", classes=5, seed=0, prefix="",
                      counters=True):
  """A PyTorch-layout CIFAR ResNet state dict (as akamaster's / chenyaofo's code saves it),
  with random weights and BN statistics, written out by hand."""
  rng = np.random.default_rng(seed)
  n = (depth - 2) // 6
  sd = {}

  def conv(name, out, inp, k):
    sd[name + ".weight"] = (rng.standard_normal((out, inp, k, k)) / np.sqrt(inp * k * k)
                            ).astype(np.float32)

  def bn(name, c):
    sd[name + ".weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[name + ".bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[name + ".running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[name + ".running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    if counters:
      sd[name + ".num_batches_tracked"] = np.array(1234, np.int64)

  conv("conv1", WIDTHS[0], 3, 3)
  bn("bn1", WIDTHS[0])
  c_in = WIDTHS[0]
  for s, c in enumerate(WIDTHS, start=1):
    for b in range(n):
      p = f"layer{s}.{b}"
      conv(p + ".conv1", c, c_in, 3)
      bn(p + ".bn1", c)
      conv(p + ".conv2", c, c, 3)
      bn(p + ".bn2", c)
      if shortcut == "B" and c_in != c:
        conv(p + ".downsample.0", c, c_in, 1)
        bn(p + ".downsample.1", c)
      c_in = c
  sd[f"{head}.weight"] = rng.standard_normal((classes, WIDTHS[-1])).astype(np.float32)
  sd[f"{head}.bias"] = rng.standard_normal(classes).astype(np.float32)
  return {prefix + k: v for k, v in sd.items()}


# ---------------------------------------------------------------- NumPy NCHW reference


def _conv_nchw(x, w, stride, pad):
  """PyTorch's conv2d (cross-correlation, no bias) in NumPy: x (N, C, H, W), w (O, C, k, k)."""
  k = w.shape[-1]
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  h_out = (x.shape[2] - k) // stride + 1
  w_out = (x.shape[3] - k) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], h_out, w_out), np.float64)
  for i in range(k):
    for j in range(k):
      patch = x[:, :, i:i + stride * h_out:stride, j:j + stride * w_out:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out


def _bn(x, sd, name, eps=1e-5):
  g = lambda k: sd[f"{name}.{k}"][None, :, None, None]
  return (x - g("running_mean")) / np.sqrt(g("running_var") + eps) * g("weight") + g("bias")


def _reference_forward(sd, x_nhwc, depth=8, shortcut="A", head="linear"):
  """The PyTorch CIFAR ResNet (eval mode) on NCHW inputs, from the state dict alone."""
  relu = lambda v: np.maximum(v, 0)
  x = np.transpose(x_nhwc, (0, 3, 1, 2)).astype(np.float64)
  x = relu(_bn(_conv_nchw(x, sd["conv1.weight"], 1, 1), sd, "bn1"))
  n = (depth - 2) // 6
  for s in range(1, 4):
    for b in range(n):
      p = f"layer{s}.{b}"
      stride = 2 if s > 1 and b == 0 else 1
      out = relu(_bn(_conv_nchw(x, sd[p + ".conv1.weight"], stride, 1), sd, p + ".bn1"))
      out = _bn(_conv_nchw(out, sd[p + ".conv2.weight"], 1, 1), sd, p + ".bn2")
      if stride != 1 or x.shape[1] != out.shape[1]:
        if shortcut == "A":  # akamaster's LambdaLayer: subsample, zero-pad planes//4 each side
          planes = out.shape[1]
          short = np.pad(x[:, :, ::2, ::2], ((0, 0), (planes // 4, planes // 4), (0, 0), (0, 0)))
        else:
          short = _bn(_conv_nchw(x, sd[p + ".downsample.0.weight"], stride, 0), sd,
                      p + ".downsample.1")
      else:
        short = x
      x = relu(out + short)
  feats = x.mean(axis=(2, 3))
  return feats @ sd[f"{head}.weight"].T.astype(np.float64) + sd[f"{head}.bias"]


def _model_and_init(depth=8, shortcut="A", classes=5):
  model = get_model(f"resnet{depth}", classes, widths=WIDTHS, shortcut=shortcut)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  return model, jax.tree_util.tree_map(np.asarray, dict(variables))


@pytest.mark.slow
@pytest.mark.parametrize("shortcut,head", [("A", "linear"), ("B", "fc")])
def test_imported_network_computes_what_the_pytorch_network_computes(shortcut, head):
  sd = _torch_state_dict(shortcut=shortcut, head=head)
  model, init = _model_and_init(shortcut=shortcut)
  variables = ti.load_cifar_resnet(sd, init, dont_load=())
  x = np.random.default_rng(1).standard_normal((3, 8, 8, 3)).astype(np.float32)
  ours = np.asarray(model.apply(variables, x, train=False))
  np.testing.assert_allclose(ours, _reference_forward(sd, x, shortcut=shortcut, head=head),
                             rtol=1e-4, atol=1e-4)
  # The first conv alone: PyTorch (O, I, kh, kw) becomes Flax (kh, kw, I, O).
  np.testing.assert_array_equal(variables["params"]["conv_init"]["kernel"],
                                np.transpose(sd["conv1.weight"], (2, 3, 1, 0)))
  # A transposed-but-not-permuted kernel would not match the reference: the layout matters.
  wrong = dict(sd)
  wrong["conv1.weight"] = np.transpose(sd["conv1.weight"], (0, 1, 3, 2)).copy()
  bad = np.asarray(model.apply(ti.load_cifar_resnet(wrong, init, dont_load=()), x, train=False))
  assert not np.allclose(bad, ours, atol=1e-3)


def test_module_prefix_counters_and_wrappers_and_the_fresh_head():
  sd = _torch_state_dict(prefix="module.", classes=100)  # a CIFAR-100 head: not loaded
  _, init = _model_and_init(classes=10)
  variables = ti.load_cifar_resnet({"state_dict": sd, "epoch": 160}, init)
  np.testing.assert_array_equal(variables["trainable"]["head"]["kernel"],
                                init["trainable"]["head"]["kernel"])
  np.testing.assert_array_equal(variables["batch_stats"]["stage3_block1"]["bn2"]["var"],
                                sd["module.layer3.0.bn2.running_var"])
  np.testing.assert_array_equal(variables["trainable"]["bn_init"]["scale"], sd["module.bn1.weight"])


def test_readable_diff_for_depth_and_shortcut_mismatches():
  _, init = _model_and_init(depth=8, shortcut="A")
  deeper = _torch_state_dict(depth=14)  # ResNet-14: two blocks per stage
  with pytest.raises(checkpoints.CheckpointError) as e:
    ti.load_cifar_resnet(deeper, init)
  msg = str(e.value)
  assert "2 blocks per stage (ResNet-14); the model has 1: set model.name=resnet14" in msg
  assert "layer1.1.conv1.weight  (would be stage1_block2/conv1/kernel)" in msg
  with pytest.raises(checkpoints.CheckpointError) as e:
    ti.load_cifar_resnet(_torch_state_dict(shortcut="B"), init)
  msg = str(e.value)
  assert "projection shortcuts (1x1 conv + BN): set model.options.shortcut='B'" in msg
  assert "layer2.0.downsample.0.weight  (would be stage2_block1/shortcut_conv/kernel)" in msg
  _, init_b = _model_and_init(shortcut="B")
  with pytest.raises(checkpoints.CheckpointError) as e:
    ti.load_cifar_resnet(_torch_state_dict(shortcut="A"), init_b)
  assert "layer2.0.shortcut.0.weight  (for params/stage2_block1/shortcut_conv/kernel)" in str(
      e.value)
  sd = _torch_state_dict()
  sd["layer1.0.bn1.weight"] = sd["layer1.0.bn1.weight"][:2]
  del sd["bn1.running_var"]
  with pytest.raises(checkpoints.CheckpointError) as e:
    ti.load_cifar_resnet(sd, init)
  msg = str(e.value)
  assert "bn1.running_var  (for batch_stats/bn_init/var)" in msg
  assert "layer1.0.bn1.weight (2,) -> stage1_block1/bn1/scale: (2,) vs model (4,)" in msg


def _write_safetensors(path, sd):
  header, offset, chunks = {}, 0, []
  codes = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
  for name, value in sd.items():
    raw = np.ascontiguousarray(value).tobytes()
    header[name] = {"dtype": codes[value.dtype], "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    offset += len(raw)
    chunks.append(raw)
  header["__metadata__"] = {"format": "pt"}
  text = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def test_files_npz_and_safetensors_without_torch(tmp_path):
  sd = _torch_state_dict(prefix="module.")
  _, init = _model_and_init()
  np.savez(tmp_path / "r8.npz", **sd)
  _write_safetensors(tmp_path / "r8.safetensors", sd)
  a = ti.load_cifar_resnet(str(tmp_path / "r8.npz"), init)
  b = ti.load_cifar_resnet(str(tmp_path / "r8.safetensors"), init)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert ti.read_safetensors(str(tmp_path / "r8.safetensors"))[
      "module.bn1.num_batches_tracked"] == 1234
  with pytest.raises(FileNotFoundError):
    ti.load_cifar_resnet(str(tmp_path / "none.npz"), init)
  (tmp_path / "cut.safetensors").write_bytes((tmp_path / "r8.safetensors").read_bytes()[:-100])
  with pytest.raises(checkpoints.CheckpointError, match="truncated"):
    ti.read_safetensors(str(tmp_path / "cut.safetensors"))


def test_malformed_safetensors_are_a_checkpoint_error_not_an_empty_state_dict(tmp_path):
  """A file cut inside its header read as an empty state dict (then blamed on 35 missing
  names); other malformed headers escaped as AttributeError/KeyError/ValueError."""
  def write(name, header, data=b"", size=None):
    text = json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(text) if size is None else size) + text + data)
    return str(path)

  x = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
  cases = {
      "header length beyond the file": (write("a.safetensors", {}, size=10**6), "truncated"),
      "header not a mapping": (write("b.safetensors", [1, 2]), "header"),
      "no data_offsets": (write("c.safetensors", {"x": {"dtype": "F32", "shape": [2]}},
                                b"\0" * 8), "'x'"),
      "bytes unlike the shape": (write("d.safetensors", {"x": {**x, "data_offsets": [0, 8]}},
                                       b"\0" * 16), "'x'"),
      "offsets reversed": (write("e.safetensors", {"x": {**x, "data_offsets": [16, 0]}},
                                 b"\0" * 16), "'x'"),
  }
  for what, (path, match) in cases.items():
    with pytest.raises(checkpoints.CheckpointError, match=match):
      ti.read_safetensors(path)
      pytest.fail(what)
  np.testing.assert_array_equal(
      ti.read_safetensors(write("ok.safetensors", {"x": x}, b"\0" * 16))["x"], np.zeros((2, 2)))


def test_pt_file_needs_torch_or_names_the_extra(tmp_path):
  _, init = _model_and_init()
  sd = _torch_state_dict(prefix="module.")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    (tmp_path / "r8.th").write_bytes(b"not read")
    with pytest.raises(ImportError, match=r"pip install -e '\.\[torch\]'"):
      ti.load_cifar_resnet(str(tmp_path / "r8.th"), init)
    pytest.skip("torch is not installed: the .pt round trip is not exercised")
  torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}},
             tmp_path / "r8.th")
  a = ti.load_cifar_resnet(str(tmp_path / "r8.th"), init)
  b = ti.load_cifar_resnet(sd, init)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


class _NoProgress:
  def epochs(self, tag, total):
    return None


def test_pipeline_pretrain_stage_loads_a_state_dict(tmp_path):
  import types  # pylint: disable=g-import-not-at-top
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from fastntk_jax.experiment import pretrain  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = config_lib.load_config_file(os.path.join(root, "configs", "resnet110_cifar10.py:tiny"))
  cfg.model.options = {"shortcut": "A", "widths": WIDTHS}
  cfg.pretrain.source = "state_dict"
  cfg.pretrain.path = str(tmp_path / "r8.npz")
  config_lib.validate(cfg)
  sd = _torch_state_dict(prefix="module.", classes=100)
  np.savez(cfg.pretrain.path, **sd)
  model, _ = _model_and_init(classes=4)
  data = types.SimpleNamespace(image_shape=(8, 8, 3))
  variables = pretrain.pretrain_stage(cfg, model, data, str(tmp_path / "wd"), _NoProgress())
  np.testing.assert_array_equal(variables["params"]["stage2_block1"]["conv2"]["kernel"],
                                np.transpose(sd["module.layer2.0.conv2.weight"], (2, 3, 1, 0)))
  assert variables["trainable"]["head"]["kernel"].shape == (16, 4)  # the task's fresh head
  assert pretrain.pretrain_info(str(tmp_path / "wd")) == {"source": "state_dict",
                                                          "path": cfg.pretrain.path}


def test_docs_name_the_input_normalisation_of_the_public_checkpoints():
  """Nothing in a state dict records how its inputs were normalised, and the configs' CIFAR
  default (`cifar`) is not what akamaster's models were trained with (ImageNet's mean/std):
  the import's docs and the README must say which `data.normalization` to set."""
  from fastntk_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "README.md")) as f:
    readme = f.read()
  with open(os.path.join(root, "configs", "resnet110_cifar10.py")) as f:
    config = f.read()
  for text in (ti.__doc__, readme, config):
    assert "--config.data.normalization=imagenet" in text
  assert "cifar100" in ti.__doc__ and "imagenet" in data_lib.NORMALIZATIONS


def test_non_finite_weights_or_negative_running_variances_are_refused():
  """A corrupt checkpoint (NaN/Inf, a negative BN running variance: rsqrt gives NaN) loaded
  silently and turned every downstream number into NaN; it is refused, naming the tensors."""
  _, init = _model_and_init()
  sd = _torch_state_dict()
  sd["layer2.0.conv1.weight"][0, 0, 0, 0] = np.nan
  sd["bn1.bias"][1] = np.inf
  sd["layer1.0.bn2.running_var"][2] = -0.5
  with pytest.raises(checkpoints.CheckpointError) as e:
    ti.load_cifar_resnet(sd, init)
  msg = str(e.value)
  assert "3 tensor(s) with non-finite values or negative variances" in msg
  for name in ("layer2.0.conv1.weight", "bn1.bias", "layer1.0.bn2.running_var"):
    assert name in msg
