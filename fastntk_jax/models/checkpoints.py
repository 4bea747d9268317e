"""Checkpoints: import public ViT `.npz` weights; save/restore this project's variables (orbax).

ViT import (`load_vit_npz`) merges a google-research/vision_transformer / AugReg `.npz`
(a flat dict whose keys are parameter paths joined with '/') into a freshly initialised
variables dict, the way big_vision does: every name the model expects must come from the
checkpoint unless deliberately kept fresh, every checkpoint name must be used, and any
difference is reported in one readable error listing the names. Kept fresh on purpose:
the prompts (never in a public checkpoint; always) and the head (`dont_load` default:
the public head is for another label set). Position embeddings are resampled when the
checkpoint was trained at another resolution.

Own checkpoints (`save_checkpoint`/`restore_checkpoint`) hold the full variables dict with
orbax. Orbax writes into a temporary directory and renames it when complete, so a killed
save never leaves a directory at `path`; a damaged one gives `CheckpointError`.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import zipfile
from typing import Any, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from fastntk_jax.models.layers import FROZEN_PARAMS, TRAINABLE

PyTree = Any

__all__ = [
    "CheckpointError",
    "POSEMB_NAME",
    "load_npz",
    "load_vit_npz",
    "resample_posemb",
    "save_checkpoint",
    "restore_checkpoint",
]

POSEMB_NAME = "Transformer/posembed_input/pos_embedding"
PRE_LOGITS = "pre_logits"
# Prompts are new parameters introduced by prompt tuning: always left at their init.
_PROMPT_RE = re.compile(r"(.*/)?prompt_[kv]")
_MAX_LISTED = 30  # names listed per category in an error message


class CheckpointError(ValueError):
  """A checkpoint cannot be used: corrupt/truncated file, or names/shapes that do not match."""


def _list(names: Sequence[str]) -> str:
  shown = [f"    {n}" for n in names[:_MAX_LISTED]]
  if len(names) > _MAX_LISTED:
    shown.append(f"    ... and {len(names) - _MAX_LISTED} more")
  return "\n".join(shown)


def _mismatch(head: str, missing, unexpected, mismatched, *, missing_what: str,
              unexpected_what: str) -> CheckpointError:
  """One error listing what a checkpoint lacks, what it has too many of, and wrong shapes."""
  parts = [head]
  for names, what in ((missing, missing_what), (unexpected, unexpected_what),
                      (mismatched, "shape mismatch(es)")):
    if names:
      parts.append(f"  {len(names)} {what}:\n{_list(names)}")
  return CheckpointError("\n".join(parts))


def load_npz(path: str) -> dict[str, np.ndarray]:
  """Reads a flat `.npz` checkpoint into {name: array}.

  Args:
    path: file path.

  Returns:
    Dict from '/'-joined parameter names to numpy arrays.

  Raises:
    FileNotFoundError: no file at `path`.
    CheckpointError: the file is not a readable `.npz` (truncated download, wrong format).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"No ViT checkpoint at {path!r}.")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise CheckpointError(
        f"Could not read {path!r} as an .npz checkpoint (truncated or not an .npz file?): "
        f"{type(e).__name__}: {e}") from e


def resample_posemb(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """Resamples a ViT position embedding to another patch grid, keeping the cls embedding.

  As vision_transformer's checkpoint loader: the first token (cls) is kept as is, the rest
  is viewed as a square (g, g, D) grid and zoomed bilinearly (scipy.ndimage.zoom, order=1)
  to the new (g', g') grid.

  Args:
    posemb: [1, 1 + g*g, D].
    num_tokens: 1 + g'*g', the model's token count.

  Returns:
    [1, num_tokens, D] float array.

  Raises:
    CheckpointError: either grid is not square.
  """
  posemb = np.asarray(posemb)
  cls_tok, grid = posemb[:, :1], posemb[0, 1:]
  g_old = int(round(np.sqrt(len(grid))))
  g_new = int(round(np.sqrt(num_tokens - 1)))
  if g_old * g_old != len(grid) or g_new * g_new != num_tokens - 1:
    raise CheckpointError(
        f"Cannot resample position embedding of {posemb.shape[1]} tokens to {num_tokens}: "
        f"both must be 1 (cls) + a square number of patches.")
  grid = grid.reshape(g_old, g_old, -1)
  zoom = (g_new / g_old, g_new / g_old, 1)
  grid = scipy.ndimage.zoom(grid, zoom, order=1).reshape(1, g_new * g_new, -1)
  return np.concatenate([cls_tok, grid.astype(posemb.dtype)], axis=1)


def load_vit_npz(path: str, variables: Mapping[str, Any], *,
                 dont_load: Sequence[str] = ("head/.*",),
                 report: dict | None = None) -> dict:
  """Loads a public ViT `.npz` checkpoint into freshly initialised ViT variables.

  Args:
    path: `.npz` in the vision_transformer/AugReg layout, e.g. keys
      `Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel` (D, heads, D/heads),
      `embedding/kernel` (P, P, 3, D), `cls` (1, 1, D), `Transformer/posembed_input/pos_embedding`
      (1, N + 1, D), `head/kernel` (D, classes).
    variables: `model.init(...)` of a `VisionTransformer` (collections `params` and
      `trainable`); its values are the init for whatever is not loaded.
    dont_load: regular expressions (full match against '/'-joined names). Matching model
      names keep their init value; matching checkpoint names are ignored. Default keeps the
      head fresh. Prompts (`.../prompt_k`, `.../prompt_v`) are always kept fresh.
    report: if a dict, filled with "dropped" (checkpoint names dropped on purpose, e.g.
      `pre_logits/*`) and "kept_at_init" (model names not loaded).

  `pre_logits/{kernel,bias}` (the representation layer, a dense + tanh before the head, of
  the original ImageNet-21k checkpoints such as imagenet21k/ViT-B_16.npz) is dropped with a
  log message when the model has no such layer: ours classifies the cls token directly, as
  vision_transformer's own fine-tuning does (`load_pretrained` drops `pre_logits` when
  `representation_size` is None).

  Returns:
    A new variables dict (same structure as `variables`) with the checkpoint's values in
    `params` (and in `trainable` for any loaded head). The position embedding is resampled
    if the checkpoint's patch grid differs from the model's.

  Raises:
    CheckpointError: names missing from the checkpoint, unexpected checkpoint names, or
      shape mismatches -- all listed in one message -- or an unreadable file.
  """
  ckpt = load_npz(path)
  variables = flax.core.unfreeze(variables) if isinstance(variables, flax.core.FrozenDict) \
      else {k: v for k, v in variables.items()}
  for col in (FROZEN_PARAMS, TRAINABLE):
    if col not in variables:
      raise ValueError(f"load_vit_npz: `variables` has no {col!r} collection "
                       f"(got {sorted(variables)}); pass model.init(...) of a ViT.")
  flat = {col: flax.traverse_util.flatten_dict(flax.core.unfreeze(variables[col]), sep="/")
          for col in (FROZEN_PARAMS, TRAINABLE)}
  where = {}  # name -> collection
  for col, leaves in flat.items():
    for name in leaves:
      where[name] = col  # ViT names are unique across the two collections by construction

  skip = [re.compile(p) for p in dont_load]
  skipped = lambda name: any(r.fullmatch(name) for r in skip)
  to_load = {n for n in where if not _PROMPT_RE.fullmatch(n) and not skipped(n)}
  provided = {n for n in ckpt if not skipped(n)}
  pre_logits = sorted(n for n in provided if n.startswith(PRE_LOGITS + "/"))
  if pre_logits and not any(n.startswith(PRE_LOGITS + "/") for n in where):
    logging.getLogger(__name__).info(
        "ViT checkpoint %s: dropping %s (the ImageNet-21k representation layer; the model "
        "classifies the cls token with a fresh head, as vision_transformer's fine-tuning)",
        path, ", ".join(pre_logits))
    provided -= set(pre_logits)
  else:
    pre_logits = []
  if report is not None:
    report["dropped"] = pre_logits
    report["kept_at_init"] = sorted(n for n in where if n not in to_load)

  missing = sorted(to_load - provided)
  unexpected = sorted(provided - to_load)
  mismatched = []
  values = {}
  for name in sorted(to_load & provided):
    target = flat[where[name]][name]
    value = ckpt[name]
    if value.shape != target.shape and name == POSEMB_NAME and value.ndim == 3 \
        and value.shape[2] == target.shape[2] and value.shape[0] == target.shape[0] == 1:
      value = resample_posemb(value, target.shape[1])
    if value.shape != tuple(target.shape):
      mismatched.append(f"{name}: checkpoint {value.shape} vs model {tuple(target.shape)}")
      continue
    values[name] = jnp.asarray(value, dtype=target.dtype)

  if missing or unexpected or mismatched:
    raise _mismatch(f"ViT checkpoint {path!r} does not match the model:", missing, unexpected,
                    mismatched, missing_what="model parameter(s) missing from the checkpoint "
                    "(add a dont_load pattern to keep them at init)",
                    unexpected_what="unexpected checkpoint name(s) the model does not have "
                    "(add a dont_load pattern to ignore them)")

  for name, value in values.items():
    flat[where[name]][name] = value
  out = dict(variables)
  for col in (FROZEN_PARAMS, TRAINABLE):
    out[col] = flax.traverse_util.unflatten_dict(flat[col], sep="/")
  return out


# ----------------------------------------------------------------------------- orbax


def _checkpointer():
  # Imported lazily: orbax pulls in tensorstore, which model-only users need not pay for.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp, ocp.PyTreeCheckpointer()


def _as_plain(tree: PyTree) -> PyTree:
  return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree


def save_checkpoint(path: str, tree: PyTree, *, overwrite: bool = False) -> None:
  """Saves a pytree (e.g. a full variables dict) with orbax, atomically.

  Orbax writes to `<path>.orbax-checkpoint-tmp-*` and renames it to `path` only when all
  data and metadata are written, so `path` either holds a complete checkpoint or does not
  exist.

  Args:
    path: checkpoint directory (made absolute; its parent is created).
    tree: pytree of arrays.
    overwrite: replace an existing checkpoint. The new one is completed first under another
      name and then swapped in, so a crash never loses both.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False.
  """
  _, ckptr = _checkpointer()
  path = os.path.abspath(path)
  tree = _as_plain(tree)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if not os.path.exists(path):
    ckptr.save(path, tree)
    return
  if not overwrite:
    raise FileExistsError(f"Checkpoint {path!r} already exists; pass overwrite=True to replace it.")
  new, old = f"{path}.new-{os.getpid()}", f"{path}.old-{os.getpid()}"
  shutil.rmtree(new, ignore_errors=True)
  ckptr.save(new, tree)
  os.rename(path, old)
  os.rename(new, path)
  shutil.rmtree(old, ignore_errors=True)


def _abstract(leaf: Any, sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(np.shape(leaf)), jnp.result_type(leaf), sharding=sharding)


def _saved_tree(meta: Any) -> Optional[PyTree]:
  """The stored tree's metadata from what `PyTreeCheckpointer.metadata` returns, or None.

  Orbax 0.6-0.11 return the tree (or a TreeMetadata with `.tree`); 0.12+ wrap it in a
  StepMetadata whose `item_metadata` is the TreeMetadata, or None when the folder holds none.
  """
  if meta is not None and hasattr(meta, "item_metadata"):
    meta = meta.item_metadata
  if meta is not None and hasattr(meta, "tree"):
    meta = meta.tree
  return meta if meta else None


def restore_checkpoint(path: str, target: PyTree) -> PyTree:
  """Restores a checkpoint written by `save_checkpoint` into the structure of `target`.

  Args:
    path: checkpoint directory.
    target: pytree with the expected structure, shapes and dtypes: concrete arrays or
      `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape(model.init, ...)`).

  Returns:
    Pytree like `target` holding the stored values as `jax.Array`s on the default device.

  Raises:
    FileNotFoundError: nothing at `path` (the message says if an unfinished save was found).
    CheckpointError: the checkpoint is corrupt or truncated, or its names/shapes differ from
      `target` (the differences are listed).
  """
  ocp, ckptr = _checkpointer()
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    partial = glob.glob(glob.escape(path) + ".orbax-checkpoint-tmp-*")
    hint = (f" An unfinished save exists ({os.path.basename(partial[0])}): the writer was "
            f"killed before the checkpoint was complete; save it again." if partial else "")
    raise FileNotFoundError(f"No checkpoint at {path!r}.{hint}")
  target = _as_plain(target)

  def corrupt(e: BaseException) -> CheckpointError:
    first = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
    return CheckpointError(
        f"Checkpoint {path!r} is corrupt or truncated and cannot be restored "
        f"({type(e).__name__}: {first}). Recreate it with save_checkpoint().")

  try:
    saved = _saved_tree(ckptr.metadata(path))
  except Exception as e:  # pylint: disable=broad-except  (missing _METADATA, bad JSON, ...)
    raise corrupt(e) from e
  if saved is None:
    # Newer orbax answers a folder without its metadata with an empty StepMetadata instead of
    # raising; restoring it anyway fails inside orbax's event loop, which prints a traceback
    # per leaf before the error reaches us.
    raise corrupt(FileNotFoundError(
        "no orbax tree metadata (_METADATA) in the folder: it was not written by "
        "save_checkpoint, or the save did not finish"))

  saved_flat = {"/".join(map(str, k)): v for k, v in
                flax.traverse_util.flatten_dict(_as_plain(saved)).items()} \
      if isinstance(saved, Mapping) else {}
  target_flat = {"/".join(map(str, k)): v for k, v in
                 flax.traverse_util.flatten_dict(target).items()} \
      if isinstance(target, Mapping) else {}
  if saved_flat and target_flat:
    missing = sorted(set(target_flat) - set(saved_flat))
    unexpected = sorted(set(saved_flat) - set(target_flat))
    mismatched = [f"{n}: checkpoint {tuple(saved_flat[n].shape)} vs target "
                  f"{tuple(np.shape(target_flat[n]))}"
                  for n in sorted(set(target_flat) & set(saved_flat))
                  if hasattr(saved_flat[n], "shape")
                  and tuple(saved_flat[n].shape) != tuple(np.shape(target_flat[n]))]
    if missing or unexpected or mismatched:
      raise _mismatch(f"Checkpoint {path!r} does not match the target structure:", missing,
                      unexpected, mismatched,
                      missing_what="name(s) missing from the checkpoint",
                      unexpected_what="unexpected name(s) in the checkpoint")

  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(lambda l: _abstract(l, sharding), target)
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  try:
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=abstract,
                                                           restore_args=restore_args))
  except Exception as e:  # pylint: disable=broad-except
    raise corrupt(e) from e
