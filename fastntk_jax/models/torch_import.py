"""Public PyTorch CIFAR ResNet weights onto `CifarResNet` (ResNet-20/32/44/56/110, any 6n+2).

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
the configs' CIFAR-10 default `cifar` is not it); chenyaofo's CIFAR-100 models: `cifar100`;
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
from typing import Any, Mapping, Sequence

import numpy as np

from fastntk_jax import pretrained_files

log = logging.getLogger(__name__)

__all__ = ["TORCH_INSTALL", "read_state_dict", "normalize_names", "load_cifar_resnet"]

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
  import flax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  where = "the given state dict" if isinstance(path_or_dict, Mapping) else repr(
      os.fspath(path_or_dict))
  state = normalize_names(read_state_dict(path_or_dict))
  variables = flax.core.unfreeze(variables) if isinstance(variables, flax.core.FrozenDict) \
      else {k: v for k, v in variables.items()}
  collections = [c for c in ("params", "trainable", "batch_stats") if c in variables]
  flat = {c: flax.traverse_util.flatten_dict(flax.core.unfreeze(variables[c]), sep="/")
          for c in collections}
  owner = {name: c for c, leaves in flat.items() for name in leaves}
  head = "fc" if any(n.startswith("fc.") for n in state) else "linear"
  shortcut = "downsample" if any(".downsample." in n for n in state) else "shortcut"
  skip = [re.compile(p) for p in dont_load]
  skipped = lambda name: any(r.fullmatch(name) for r in skip)

  missing, mismatched, corrupt, values, used = [], [], [], {}, set()
  for ours in sorted(owner):
    torch_name = _to_torch(ours, head, shortcut)
    if torch_name is None:
      raise _checkpoint_error(f"load_cifar_resnet: {ours!r} is no CIFAR ResNet parameter; "
                              "pass the variables of get_model('resnet<6n+2>', ...)")
    if skipped(ours):
      continue
    if torch_name not in state:
      missing.append(f"{torch_name}  (for {owner[ours]}/{ours})")
      continue
    used.add(torch_name)
    target = flat[owner[ours]][ours]
    value = _convert(ours, state[torch_name])
    if value.shape != tuple(np.shape(target)):
      mismatched.append(f"{torch_name} {state[torch_name].shape} -> {ours}: "
                        f"{value.shape} vs model {tuple(np.shape(target))}")
      continue
    if np.issubdtype(value.dtype, np.floating) and (
        not np.all(np.isfinite(value)) or (ours.endswith("/var") and np.any(value < 0))):
      corrupt.append(f"{torch_name} (for {owner[ours]}/{ours})")
      continue
    values[ours] = jnp.asarray(value, dtype=jnp.result_type(target))
  unexpected = []
  for name in sorted(set(state) - used):
    ours = _from_torch(name)
    if ours is not None and skipped(ours):
      continue
    unexpected.append(name + (f"  (would be {ours})" if ours else ""))
  if missing or unexpected or mismatched or corrupt:
    theirs = _blocks_per_stage(state)
    mine = _blocks_per_stage([_to_torch(n, head, shortcut) for n in owner])
    parts = [f"PyTorch state dict {where} does not match the model "
             f"(ResNet-{6 * mine + 2}, {'projection' if any('shortcut_conv' in n for n in owner) else 'option-A'} shortcuts):"]
    if theirs and theirs != mine:
      parts.append(f"  the state dict has {theirs} blocks per stage (ResNet-{6 * theirs + 2}); "
                   f"the model has {mine}: set model.name=resnet{6 * theirs + 2}")
    has_proj = any(re.search(r"\.(shortcut|downsample)\.0\.weight$", n) for n in state)
    model_proj = any("shortcut_conv" in n for n in owner)
    if has_proj and not model_proj:
      parts.append("  the state dict has projection shortcuts (1x1 conv + BN): set "
                   "model.options.shortcut='B'")
    elif model_proj and not has_proj:
      parts.append("  the state dict has parameter-free (option-A) shortcuts: set "
                   "model.options.shortcut='A'")
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
    flat[owner[ours]][ours] = value
  out = dict(variables)
  for c in collections:
    out[c] = flax.traverse_util.unflatten_dict(flat[c], sep="/")
  log.info("loaded %d tensors from %s (kept at init: %s)", len(values), where,
           ", ".join(dont_load) or "nothing")
  return out
