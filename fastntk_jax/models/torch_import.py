"""Public PyTorch CIFAR weights onto our CNNs: CIFAR ResNets onto `CifarResNet`
(`load_cifar_resnet`: ResNet-20/32/44/56/110, any 6n+2) and chenyaofo's CIFAR MobileNetV2
onto `MobileNetV2` (`load_cifar_mobilenetv2`, whose docstring has its layout);
`load_state_dict` picks one by model name (config `pretrain.source="state_dict"`). Both read,
normalise and transpose alike and refuse alike, listing every missing, unexpected,
mis-shaped or corrupt tensor in one message.

CIFAR ResNets

Accepted layouts (the common public CIFAR ResNet code), after dropping any number of leading
`module.` (DataParallel) and every `num_batches_tracked`:

  conv1.weight                                   -> params/conv_init/kernel
  bn1.{weight,bias}                              -> trainable/bn_init/{scale,bias}
  bn1.{running_mean,running_var}                 -> batch_stats/bn_init/{mean,var}
  layer{s}.{b}.conv{1,2}.weight                  -> params/stage{s}_block{b+1}/conv{1,2}/kernel
  layer{s}.{b}.bn{1,2}.*                         -> stage{s}_block{b+1}/bn{1,2}/* (as bn1)
  layer{s}.{b}.{shortcut,downsample}.0.weight    -> params/stage{s}_block{b+1}/shortcut_conv/kernel
  layer{s}.{b}.{shortcut,downsample}.1.*         -> stage{s}_block{b+1}/shortcut_bn/*
  {linear,fc}.{weight,bias}                      -> trainable/head/{kernel,bias}

e.g. akamaster/pytorch_resnet_cifar10 (`resnet110-1d1ed7c2.th`: option-A shortcuts, no
shortcut weights, `linear`, saved as {'state_dict': ...} with `module.`) and
chenyaofo/pytorch-cifar-models (`cifar100_resnet56-*.pt`: `downsample` 1x1 conv + BN, i.e.
our `shortcut="B"`, `fc`). Conv kernels are transposed from PyTorch's (out, in, kh, kw) to
Flax's (kh, kw, in, out); the linear layer from (classes, features) to (features, classes).
Both networks use 3x3 convs with padding 1, BN epsilon 1e-5 and, for option A, the same
zero-padded subsampling (`resnet.BasicBlock`), so the imported network computes what the
PyTorch one does (tests/test_torch_import.py checks the whole forward pass against a NumPy
NCHW reference).

Inputs: nothing in a state dict records how its inputs were normalised, and BN's running
statistics hold the network to it: set `data.normalization` to what the checkpoint was
trained with. akamaster's models: ImageNet's mean/std (`--config.data.normalization=imagenet`;
the configs' CIFAR-10 default `cifar` is not it); chenyaofo's CIFAR-100 models (ResNets and
MobileNetV2s): `cifar100` (`--config.data.normalization=cifar100`);
chenyaofo's CIFAR-10 models used std (0.2023, 0.1994, 0.2010), which no `data.NORMALIZATIONS`
entry has (`cifar`: the same mean, a ~20% larger std).

Files: `.pt`/`.pth`/`.th`/`.tar` need PyTorch (`pip install -e '.[torch]'`, imported only
here); `.npz` and `.safetensors` are read with NumPy alone (no torch, no safetensors
package). A dict holding the weights under 'state_dict', 'model', 'model_state_dict' or
'net' is unwrapped. To convert once on a machine with torch:
    python -c "import torch, numpy as np; sd = torch.load('resnet110.th', map_location='cpu')
    sd = sd.get('state_dict', sd); np.savez('resnet110.npz', **{k: v.numpy() for k, v in sd.items()})"
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from fastntk_jax import pretrained_files

log = logging.getLogger(__name__)

__all__ = ["TORCH_INSTALL", "read_state_dict", "normalize_names", "load_cifar_resnet",
           "load_cifar_mobilenetv2", "load_state_dict"]

TORCH_INSTALL = "pip install -e '.[torch]'"
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net")
_TORCH_SUFFIXES = pretrained_files.TORCH_SUFFIXES
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_}
_MAX_LISTED = 30


def _checkpoint_error(message: str):
  from fastntk_jax.models.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top
  return CheckpointError(message)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` file with NumPy only (the format: an 8-byte little-endian header
  length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw tensor bytes).

  Raises:
    CheckpointError: a truncated or malformed file (naming the tensor where there is one).
  """
  with open(path, "rb") as f:
    blob = f.read()
  try:
    (size,) = struct.unpack("<Q", blob[:8])
    if 8 + size > len(blob):
      raise ValueError(f"truncated: its header is {size} bytes, the file {len(blob)}")
    header = json.loads(blob[8:8 + size])
    if not isinstance(header, dict):
      raise ValueError(f"its header is a JSON {type(header).__name__}, not a mapping")
  except (struct.error, ValueError, UnicodeDecodeError) as e:
    raise _checkpoint_error(f"Could not read {path!r} as a .safetensors file: {e}") from e
  data = memoryview(blob)[8 + size:]
  out = {}
  for name, spec in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
    except (TypeError, KeyError, ValueError) as e:
      raise _checkpoint_error(f"{path!r}: tensor {name!r} has a malformed header entry "
                              f"{spec!r} ({type(e).__name__}: {e})") from e
    if dtype == "BF16":
      import ml_dtypes  # pylint: disable=g-import-not-at-top  (a JAX dependency)
      np_dtype = ml_dtypes.bfloat16
    elif dtype in _SAFETENSORS_DTYPES:
      np_dtype = _SAFETENSORS_DTYPES[dtype]
    else:
      raise _checkpoint_error(f"{path!r}: tensor {name!r} has unsupported dtype {dtype}")
    if end > len(data):
      raise _checkpoint_error(f"{path!r} is truncated: tensor {name!r} ends at byte {end} of "
                              f"{len(data)}")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
    if not 0 <= begin <= end or end - begin != expected:
      raise _checkpoint_error(f"{path!r}: tensor {name!r} has data_offsets [{begin}, {end}] "
                              f"but {dtype} {list(shape)} needs {expected} bytes")
    array = np.frombuffer(data[begin:end], dtype=np_dtype).reshape(shape)
    out[name] = np.array(array, dtype=np.float32 if dtype in ("BF16", "F16") else np_dtype)
  return out


def _read_torch(path: str) -> Mapping[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f"reading the PyTorch checkpoint {path!r} needs torch: {TORCH_INSTALL} (or convert it "
        "once to .npz on a machine with torch; see fastntk_jax/models/torch_import.py)"
    ) from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except TypeError:  # torch < 1.13: no weights_only
    obj = torch.load(path, map_location="cpu")
  except Exception as e:  # pylint: disable=broad-except  (a pickle that needs classes, a bad file)
    raise _checkpoint_error(f"torch could not read {path!r} as a state dict: "
                            f"{type(e).__name__}: {e}") from e
  return obj


def _as_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def read_state_dict(path_or_dict) -> dict[str, np.ndarray]:
  """{name: numpy array} from a `.pt/.pth/.th/.tar` (torch), `.npz` or `.safetensors` file,
  or from a mapping already in memory; a checkpoint dict holding the weights under one of
  'state_dict', 'model_state_dict', 'model', 'net' is unwrapped.

  Raises:
    FileNotFoundError: no such file.
    ImportError: a PyTorch file without torch installed (names the extra).
    CheckpointError: an unreadable file.
  """
  if isinstance(path_or_dict, Mapping):
    obj = path_or_dict
  else:
    path = os.fspath(path_or_dict)
    if not os.path.exists(path):
      raise FileNotFoundError(f"No PyTorch state dict at {path!r}.")
    lower = path.lower()
    if lower.endswith(".npz"):
      try:
        with np.load(path, allow_pickle=False) as data:
          obj = {k: np.asarray(data[k]) for k in data.files}
      except (ValueError, OSError, EOFError) as e:
        raise _checkpoint_error(f"Could not read {path!r} as an .npz file: {e}") from e
    elif lower.endswith(".safetensors"):
      obj = read_safetensors(path)
    elif lower.endswith(_TORCH_SUFFIXES):
      obj = _read_torch(path)
    else:
      raise _checkpoint_error(f"{path!r}: unknown state-dict format; expected one of "
                              f"{list(_TORCH_SUFFIXES) + ['.npz', '.safetensors']}")
  for key in _WRAPPERS:
    inner = obj.get(key) if isinstance(obj, Mapping) else None
    if isinstance(inner, Mapping) and inner and all(
        hasattr(v, "shape") for v in inner.values()):
      obj = inner
      break
  if not isinstance(obj, Mapping):
    raise _checkpoint_error(f"not a state dict: {type(obj).__name__}")
  return {str(k): _as_numpy(v) for k, v in obj.items() if hasattr(v, "shape")}


def normalize_names(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops leading `module.` prefixes (DataParallel, possibly nested) and every
  `num_batches_tracked` (a counter PyTorch's BN keeps; not a weight)."""
  out = {}
  for name, value in state.items():
    while name.startswith("module."):
      name = name[len("module."):]
    if name.endswith("num_batches_tracked"):
      continue
    out[name] = value
  return out


# ours: (collection-free '/'-joined name) <-> PyTorch's '.'-joined name
_BN_TO_TORCH = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_BN_FROM_TORCH = {v: k for k, v in _BN_TO_TORCH.items()}
_OURS = re.compile(r"(?:stage(\d+)_block(\d+)/)?(conv_init|bn_init|conv1|conv2|bn1|bn2|"
                   r"shortcut_conv|shortcut_bn|head)/(kernel|scale|bias|mean|var)")
_TORCH = re.compile(r"(?:layer(\d+)\.(\d+)\.)?(conv1|conv2|bn1|bn2|shortcut\.0|shortcut\.1|"
                    r"downsample\.0|downsample\.1|linear|fc)\.(weight|bias|running_mean|"
                    r"running_var)")


def _to_torch(ours: str, head: str, shortcut: str) -> str | None:
  m = _OURS.fullmatch(ours)
  if not m:
    return None
  stage, block, layer, leaf = m.groups()
  if layer == "head":
    return f"{head}.{'weight' if leaf == 'kernel' else 'bias'}"
  torch_layer = {"conv_init": "conv1", "bn_init": "bn1", "shortcut_conv": f"{shortcut}.0",
                 "shortcut_bn": f"{shortcut}.1"}.get(layer, layer)
  torch_leaf = "weight" if leaf == "kernel" else _BN_TO_TORCH[leaf]
  prefix = f"layer{stage}.{int(block) - 1}." if stage else ""
  return f"{prefix}{torch_layer}.{torch_leaf}"


def _from_torch(name: str) -> str | None:
  m = _TORCH.fullmatch(name)
  if not m:
    return None
  stage, block, layer, leaf = m.groups()
  if layer in ("linear", "fc"):
    return f"head/{'kernel' if leaf == 'weight' else 'bias'}"
  is_conv = layer.startswith("conv") or layer.endswith(".0")
  ours_layer = {"shortcut.0": "shortcut_conv", "downsample.0": "shortcut_conv",
                "shortcut.1": "shortcut_bn", "downsample.1": "shortcut_bn"}.get(layer, layer)
  if not stage:
    ours_layer = {"conv1": "conv_init", "bn1": "bn_init"}.get(ours_layer, ours_layer)
  if is_conv:
    if leaf != "weight":
      return None  # our convs have no bias
    ours_leaf = "kernel"
  else:
    ours_leaf = _BN_FROM_TORCH[leaf]
  prefix = f"stage{stage}_block{int(block) + 1}/" if stage else ""
  return f"{prefix}{ours_layer}/{ours_leaf}"


def _convert(ours: str, value: np.ndarray) -> np.ndarray:
  """PyTorch layout -> Flax layout for one tensor."""
  if ours.endswith("/kernel") and value.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
    return np.transpose(value, (2, 3, 1, 0))
  if ours == "head/kernel" and value.ndim == 2:  # linear (C, D) -> (D, C)
    return value.T
  return value


def _blocks_per_stage(names) -> int:
  blocks = [int(m.group(1)) for n in names if (m := re.match(r"layer1\.(\d+)\.", n))]
  return max(blocks) + 1 if blocks else 0


def _list(names: Sequence[str]) -> str:
  shown = [f"    {n}" for n in names[:_MAX_LISTED]]
  if len(names) > _MAX_LISTED:
    shown.append(f"    ... and {len(names) - _MAX_LISTED} more")
  return "\n".join(shown)


class _Tree:
  """Our variables flattened per collection: `owner[name]` is the collection holding the
  '/'-joined `name` (without the collection), `flat[c][name]` its value."""

  def __init__(self, variables: Mapping[str, Any]):
    import flax  # pylint: disable=g-import-not-at-top
    self.variables = flax.core.unfreeze(variables) if isinstance(
        variables, flax.core.FrozenDict) else {k: v for k, v in variables.items()}
    self.collections = [c for c in ("params", "trainable", "batch_stats")
                        if c in self.variables]
    self.flat = {c: flax.traverse_util.flatten_dict(flax.core.unfreeze(self.variables[c]),
                                                    sep="/") for c in self.collections}
    self.owner = {name: c for c, leaves in self.flat.items() for name in leaves}


def _where(path_or_dict) -> str:
  return "(in memory)" if isinstance(path_or_dict, Mapping) else repr(
      os.fspath(path_or_dict))


def _merge(state: Mapping[str, np.ndarray], tree: _Tree, names: Mapping[str, str], *,
           dont_load: Sequence[str], where: str, header: str,
           hints: Sequence[str] = (), refusals: Sequence[str] = (),
           parse: Optional[Callable[[str], Optional[str]]] = None) -> dict:
  """Merges a normalised PyTorch state dict into `tree`: the one loop both importers share.

  Args:
    state: {PyTorch name: array} after `normalize_names`.
    tree: our freshly initialised variables.
    names: {our '/'-joined name: its PyTorch name}, one per leaf of `tree`.
    dont_load: regular expressions (full match) of our names kept at init; their PyTorch
      counterparts are not reported as unexpected.
    where: the state dict's origin, for messages.
    header: the first line of the error message (what the model is).
    hints: lines shown after the header when the state dict does not match (what to change).
    refusals: lines that refuse the import even when every name and shape matches (e.g. an
      architecture the state dict cannot reveal).
    parse: our name for a PyTorch name the model lacks (for "would be ..." in the message),
      or None; names of the model are looked up in `names`.

  Returns:
    A new variables dict: the state dict's values, our init for the `dont_load` names.

  Raises:
    CheckpointError: missing, unexpected, mis-shaped or corrupt tensors (NaN/Inf, negative
      BN variances), or any `refusals`, all listed in one message.
  """
  import flax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  skip = [re.compile(p) for p in dont_load]
  skipped = lambda name: any(r.fullmatch(name) for r in skip)
  from_torch = {theirs: ours for ours, theirs in names.items()}
  missing, mismatched, corrupt, values, used = [], [], [], {}, set()
  for ours in sorted(tree.owner):
    torch_name = names[ours]
    if skipped(ours):
      continue
    if torch_name not in state:
      missing.append(f"{torch_name}  (for {tree.owner[ours]}/{ours})")
      continue
    used.add(torch_name)
    target = tree.flat[tree.owner[ours]][ours]
    value = _convert(ours, state[torch_name])
    if value.shape != tuple(np.shape(target)):
      mismatched.append(f"{torch_name} {state[torch_name].shape} -> {ours}: "
                        f"{value.shape} vs model {tuple(np.shape(target))}")
      continue
    if np.issubdtype(value.dtype, np.floating) and (
        not np.all(np.isfinite(value)) or (ours.endswith("/var") and np.any(value < 0))):
      corrupt.append(f"{torch_name} (for {tree.owner[ours]}/{ours})")
      continue
    values[ours] = jnp.asarray(value, dtype=jnp.result_type(target))
  unexpected = []
  for name in sorted(set(state) - used):
    ours = from_torch.get(name)
    if ours is None and parse is not None:
      ours = parse(name)
    if ours is not None and skipped(ours):
      continue
    unexpected.append(name + (f"  (would be {ours})" if ours else ""))
  if missing or unexpected or mismatched or corrupt or refusals:
    parts = [f"PyTorch state dict {where} does not match the model ({header}):", *hints,
             *refusals]
    if missing:
      parts.append(f"  {len(missing)} model parameter(s) missing from the state dict (add a "
                   f"dont_load pattern to keep them at init):\n{_list(missing)}")
    if unexpected:
      parts.append(f"  {len(unexpected)} unexpected state-dict name(s):\n{_list(unexpected)}")
    if mismatched:
      parts.append(f"  {len(mismatched)} shape mismatch(es):\n{_list(mismatched)}")
    if corrupt:
      parts.append(f"  {len(corrupt)} tensor(s) with non-finite values or negative variances "
                   f"(a corrupt file?):\n{_list(corrupt)}")
    raise _checkpoint_error("\n".join(parts))
  for ours, value in values.items():
    tree.flat[tree.owner[ours]][ours] = value
  out = dict(tree.variables)
  for c in tree.collections:
    out[c] = flax.traverse_util.unflatten_dict(tree.flat[c], sep="/")
  log.info("loaded %d tensors from %s (kept at init: %s)", len(values), where,
           ", ".join(dont_load) or "nothing")
  return out


def load_cifar_resnet(path_or_dict, variables: Mapping[str, Any], *,
                      dont_load: Sequence[str] = ("head/.*",)) -> dict:
  """Loads a PyTorch CIFAR ResNet state dict into `CifarResNet` variables.

  Args:
    path_or_dict: a file (see `read_state_dict`) or a {name: array/tensor} mapping.
    variables: `model.init(...)` of a `CifarResNet` (collections `params`, `trainable`,
      `batch_stats`); its values are kept for whatever is not loaded.
    dont_load: regular expressions (full match) of our '/'-joined names (without the
      collection, e.g. `head/kernel`, `stage3_block18/bn2/scale`) kept at their init; the
      matching PyTorch names are ignored. Default: the head (trained for another label set).

  Returns:
    A new variables dict with the state dict's values.

  Raises:
    CheckpointError: names missing from the state dict, unexpected names, shape
      mismatches, or NaN/Inf values and negative BN running variances -- listed in one
      message, each missing name with its PyTorch counterpart, plus a hint when the depth
      or the shortcut type differs.
  """
  where = _where(path_or_dict)
  state = normalize_names(read_state_dict(path_or_dict))
  tree = _Tree(variables)
  head = "fc" if any(n.startswith("fc.") for n in state) else "linear"
  shortcut = "downsample" if any(".downsample." in n for n in state) else "shortcut"
  names = {}
  for ours in tree.owner:
    names[ours] = _to_torch(ours, head, shortcut)
    if names[ours] is None:
      raise _checkpoint_error(f"load_cifar_resnet: {ours!r} is no CIFAR ResNet parameter; "
                              "pass the variables of get_model('resnet<6n+2>', ...)")
  theirs = _blocks_per_stage(state)
  mine = _blocks_per_stage(names.values())
  model_proj = any("shortcut_conv" in n for n in tree.owner)
  hints = []
  if theirs and theirs != mine:
    hints.append(f"  the state dict has {theirs} blocks per stage (ResNet-{6 * theirs + 2}); "
                 f"the model has {mine}: set model.name=resnet{6 * theirs + 2}")
  has_proj = any(re.search(r"\.(shortcut|downsample)\.0\.weight$", n) for n in state)
  if has_proj and not model_proj:
    hints.append("  the state dict has projection shortcuts (1x1 conv + BN): set "
                 "model.options.shortcut='B'")
  elif model_proj and not has_proj:
    hints.append("  the state dict has parameter-free (option-A) shortcuts: set "
                 "model.options.shortcut='A'")
  return _merge(state, tree, names, dont_load=dont_load, where=where, hints=hints,
                parse=_from_torch, header=f"ResNet-{6 * mine + 2}, "
                f"{'projection' if model_proj else 'option-A'} shortcuts")


# chenyaofo's widths (`cifar100_mobilenetv2_x{0_5,0_75,1_0,1_4}`) by their stem's channels.
_CHENYAOFO_WIDTHS = (0.5, 0.75, 1.0, 1.4)
_BLOCK = re.compile(r"stage(\d+)_block(\d+)/(expand|depthwise|project)/(conv|bn)/(\w+)")
_END = re.compile(r"(stem|last)/(conv|bn)/(\w+)")


def _torch_leaf(layer: str, leaf: str) -> str:
  return "weight" if layer == "conv" else _BN_TO_TORCH[leaf]


def _mobilenetv2_names(ours: Sequence[str]) -> dict[str, Optional[str]]:
  """{our name: chenyaofo's (= torchvision's) PyTorch name} for a `MobileNetV2`'s leaves.

  PyTorch's `features` is one `nn.Sequential`: [0] the stem `ConvBNReLU` (.0 conv, .1 BN),
  [1..N] the inverted-residual blocks in order, [N+1] the last 1x1 `ConvBNReLU`. A block's
  `conv` Sequential holds [expand ConvBNReLU (t != 1 only)], depthwise ConvBNReLU, the
  projection conv, its BN: expand -> conv.0.{0,1}, depthwise -> conv.1.{0,1}, projection
  conv.2 and BN conv.3; without expansion everything moves down by one. The classifier is
  `Sequential(Dropout(0.2), Linear)`: the head is `classifier.1`.
  """
  blocks = sorted({(int(m.group(1)), int(m.group(2)))
                   for n in ours if (m := _BLOCK.fullmatch(n))})
  index = {sb: i + 1 for i, sb in enumerate(blocks)}
  expands = {(int(m.group(1)), int(m.group(2)))
             for n in ours if (m := _BLOCK.fullmatch(n)) and m.group(3) == "expand"}
  out: dict[str, Optional[str]] = {}
  for name in ours:
    if name in ("head/kernel", "head/bias"):
      out[name] = f"classifier.1.{'weight' if name == 'head/kernel' else 'bias'}"
    elif m := _END.fullmatch(name):
      where, layer, leaf = m.groups()
      k = 0 if where == "stem" else len(blocks) + 1
      out[name] = f"features.{k}.{0 if layer == 'conv' else 1}.{_torch_leaf(layer, leaf)}"
    elif m := _BLOCK.fullmatch(name):
      s, b, part, layer, leaf = m.groups()
      sb = (int(s), int(b))
      first = 0 if sb in expands else -1  # position of `expand` (or where it would be)
      if part == "project":
        pos = str(first + 2 + (layer == "bn"))
      else:
        pos = f"{first + (part == 'depthwise')}.{0 if layer == 'conv' else 1}"
      out[name] = f"features.{index[sb]}.conv.{pos}.{_torch_leaf(layer, leaf)}"
    else:
      out[name] = None
  return out


def _features(names) -> int:
  """How many `features.*` entries a (state dict's) name list has (0 if none)."""
  ks = [int(m.group(1)) for n in names if (m := re.match(r"features\.(\d+)\.", n))]
  return max(ks) + 1 if ks else 0


def _mobilenetv2_checks(state, tree: _Tree, names, model) -> tuple[list[str], list[str]]:
  """(hints, refusals) for a chenyaofo MobileNetV2 state dict against our model."""
  from fastntk_jax.models import mobilenetv2  # pylint: disable=g-import-not-at-top
  hints, refusals = [], []
  if not any(n.startswith("features.") for n in state):
    hints.append("  the state dict has no features.* names: not a torchvision/chenyaofo "
                 "MobileNetV2 (a CIFAR ResNet is model.name=resnet<6n+2>)")
  stem = state.get("features.0.0.weight")
  ours_stem = tree.flat.get("params", {}).get("stem/conv/kernel")
  if stem is not None and ours_stem is not None and stem.shape[0] != np.shape(ours_stem)[-1]:
    fits = [w for w in _CHENYAOFO_WIDTHS if mobilenetv2.make_divisible(32 * w) == stem.shape[0]]
    hints.append(f"  the state dict's stem has {stem.shape[0]} channels, the model's "
                 f"{np.shape(ours_stem)[-1]}" + (
                     f": set model.options.width_mult={fits[0]} (chenyaofo's "
                     f"mobilenetv2_x{str(fits[0]).replace('.', '_')})" if fits else ""))
  theirs, mine = _features(state), _features(names.values())
  if theirs and theirs != mine:
    hints.append(f"  the state dict has {theirs - 2} inverted-residual blocks (features.1-"
                 f"{theirs - 2}), the model {mine - 2}: chenyaofo's CIFAR network has 17 "
                 "(model.options.block_settings at its default)")
  head = state.get("classifier.1.weight")
  if head is not None and head.shape[0] == 1000:
    refusals.append(
        "  a 1000-class classifier: torchvision's ImageNet MobileNetV2 (same names and "
        "shapes), whose stem and second stage have stride 2 where chenyaofo's CIFAR network "
        "and ours have stride 1 (strides are not in a state dict): refused, it would import "
        "into a network it was not trained as")
  if model is not None:
    if not isinstance(model, mobilenetv2.MobileNetV2):
      refusals.append(f"  the model is a {type(model).__name__}, not a MobileNetV2")
    else:
      settings = tuple(tuple(s) for s in model.block_settings)
      reference = mobilenetv2.CIFAR_SETTINGS
      if ([s[:3] for s in settings] == [s[:3] for s in reference]
          and [s[3] for s in settings] != [s[3] for s in reference]):
        refusals.append(
            f"  the model's strides {[s[3] for s in settings]} differ from chenyaofo's CIFAR "
            f"network's {[s[3] for s in reference]} (strides are not in a state dict, so the "
            "import would succeed and compute something else): use the default "
            "block_settings")
  return hints, refusals


def load_cifar_mobilenetv2(path_or_dict, variables: Mapping[str, Any], *,
                           dont_load: Sequence[str] = ("head/.*",), model=None) -> dict:
  """Loads chenyaofo's CIFAR MobileNetV2 state dict into our `MobileNetV2` variables.

  chenyaofo/pytorch-cifar-models (`pytorch_cifar_models/mobilenetv2.py`, torchvision 0.9.1's
  MobileNetV2 with the stem and the second stage at stride 1), e.g.
  `cifar100_mobilenetv2_x1_0-1311f9ff.pt` (CIFAR-100, 74.20% top-1 by its README, 2.35M
  parameters) is the network of `models.MobileNetV2` at its defaults, layer for layer: the
  same (t, c, n, s) table (`mobilenetv2.CIFAR_SETTINGS`), stem 32 x width, `_make_divisible`
  rounding, hidden = round(C_in x t), the residual only at stride 1 with equal channels,
  ReLU6 after the stem, expansion, depthwise and last convs and none after the projection,
  3x3 padding 1, BN epsilon 1e-5, a last 1x1 conv to 1280 x max(1, width) channels, global
  average pooling, a linear head. The one difference, its `Dropout(0.2)` before the head, is
  the identity in eval mode (our model omits it: the NTK needs a deterministic network), so
  the imported network computes what chenyaofo's computes in eval mode (checked against a
  NumPy NCHW forward pass in tests/test_mobilenetv2_import.py). Widths: `width_mult` 0.5,
  0.75, 1.0, 1.4 for the `_x0_5` ... `_x1_4` files.

  Names: `features.0.{0,1}` -> stem/{conv,bn}; `features.k.conv.*` (k = 1..17) ->
  stage{s}_block{b}/{expand,depthwise,project}/{conv,bn} in order; `features.18.{0,1}` ->
  last/{conv,bn}; `classifier.1` -> head (see `_mobilenetv2_names`). Conv kernels (out, in,
  kh, kw) -> (kh, kw, in, out), the depthwise ones (C, 1, 3, 3) -> (3, 3, 1, C).

  Inputs: chenyaofo trained the CIFAR-100 models on inputs normalised with CIFAR-100's
  mean/std (0.5070, 0.4865, 0.4409)/(0.2673, 0.2564, 0.2761) (image-classification-codebase
  conf/cifar100.conf): `--config.data.normalization=cifar100` (ours differs in the 4th
  decimal), not the configs' `cifar` default.

  Args:
    path_or_dict: a file (see `read_state_dict`) or a {name: array/tensor} mapping.
    variables: `model.init(...)` of a `MobileNetV2` (collections `params`, `trainable`,
      `batch_stats`); its values are kept for whatever is not loaded.
    dont_load: regular expressions (full match) of our '/'-joined names kept at their init
      (default: the head, trained for another label set).
    model: the `MobileNetV2` module the variables belong to, or None; given, its strides
      (which no state dict records) are checked against chenyaofo's.

  Returns:
    A new variables dict with the state dict's values.

  Raises:
    CheckpointError: missing, unexpected, mis-shaped or corrupt tensors, listed in one
      message with hints (width, number of blocks); a 1000-class (torchvision ImageNet)
      classifier; a model with chenyaofo's channels but other strides.
  """
  where = _where(path_or_dict)
  state = normalize_names(read_state_dict(path_or_dict))
  tree = _Tree(variables)
  names = _mobilenetv2_names(list(tree.owner))
  foreign = sorted(n for n, t in names.items() if t is None)
  if foreign:
    raise _checkpoint_error(f"load_cifar_mobilenetv2: {foreign[0]!r} is no MobileNetV2 "
                            "parameter; pass the variables of get_model('mobilenetv2', ...)")
  hints, refusals = _mobilenetv2_checks(state, tree, names, model)
  blocks = _features(names.values()) - 2
  stem = np.shape(tree.flat.get("params", {}).get("stem/conv/kernel", ()))
  return _merge(state, tree, names, dont_load=dont_load, where=where, hints=hints,
                refusals=refusals,
                header=f"MobileNetV2, {blocks} blocks, stem {stem[-1] if stem else '?'} "
                       "channels")


# model name -> the importer `pretrain.source="state_dict"` uses.
def load_state_dict(model_name: str, path_or_dict, variables: Mapping[str, Any], *,
                    dont_load: Sequence[str] = ("head/.*",), model=None) -> dict:
  """The importer for `model_name` (`pretrain.source="state_dict"`).

  Args:
    model_name: a `models.MODEL_NAMES` entry: resnet* -> `load_cifar_resnet`, mobilenetv2 ->
      `load_cifar_mobilenetv2`.
    path_or_dict, variables, dont_load: as those functions.
    model: the module (checked by the MobileNetV2 importer), or None.

  Returns:
    A new variables dict.

  Raises:
    ValueError: a model with no PyTorch importer (the ViTs load AugReg `.npz` files).
    CheckpointError: as the importer.
  """
  if model_name.startswith("resnet"):
    return load_cifar_resnet(path_or_dict, variables, dont_load=dont_load)
  if model_name == "mobilenetv2":
    return load_cifar_mobilenetv2(path_or_dict, variables, dont_load=dont_load, model=model)
  raise ValueError(f"No PyTorch state-dict importer for model {model_name!r} (only resnet* "
                   "and mobilenetv2); ViTs load AugReg .npz files: pretrain.source='npz' "
                   "(python -m fastntk_jax.pretrained_files --list)")
