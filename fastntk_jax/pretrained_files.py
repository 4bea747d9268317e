"""A pretrained checkpoint named by the config, checked before a run claims its workdir: the
file is there and has the format its `pretrain.source` reads (headers only, not the arrays).
Light: numpy-free, no JAX (the config's checks run before JAX starts)."""

from __future__ import annotations

import json
import os
import zipfile
from typing import Optional

# What `models.torch_import` reads as a PyTorch file.
TORCH_SUFFIXES = (".pt", ".pth", ".th", ".tar", ".bin", ".ckpt")


def check(cfg) -> None:
  """Refuses a run whose input files are missing (the pretrained checkpoint): called when a
  run is prepared, not by `validate`, so that a config naming files on another machine still
  validates (``--dry_run``, the config tests).

  Raises:
    ValueError: naming the field, the path and where such files come from.
  """
  if cfg.pretrain.source in ("npz", "state_dict", "checkpoint"):
    kind, exists = (("folder", os.path.isdir) if cfg.pretrain.source == "checkpoint"
                    else ("file", os.path.isfile))
    if not exists(cfg.pretrain.path):
      raise ValueError(f"config.pretrain.path={cfg.pretrain.path!r}: no such {kind} (pretrain."
                       f"source={cfg.pretrain.source!r}); see README 'Reproducing the paper' "
                       "for the checkpoints and where they go")
    problem = _unreadable(cfg.pretrain.source, cfg.pretrain.path)
    if problem:
      raise ValueError(f"config.pretrain.path={cfg.pretrain.path!r} (pretrain.source="
                       f"{cfg.pretrain.source!r}): {problem}")


def _unreadable(source: str, path: str) -> Optional[str]:
  """Why `path` cannot be a checkpoint of `source`, from its format alone (headers, not the
  arrays), or None: read before the workdir is claimed."""
  lower = path.lower()
  if source == "checkpoint":
    if not os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
      return ("not a finished checkpoint folder of this project (no _CHECKPOINT_METADATA), "
              "e.g. another workdir's pretrain/")
    return None
  if source == "npz" or lower.endswith(".npz"):
    if not zipfile.is_zipfile(path):
      return "not an .npz archive (a zip of .npy arrays)"
    with zipfile.ZipFile(path) as archive:
      if not any(n.endswith(".npy") for n in archive.namelist()):
        return "an archive without .npy arrays"
    return None
  if lower.endswith(".safetensors"):
    with open(path, "rb") as f:
      head = f.read(8)
      size = int.from_bytes(head, "little") if len(head) == 8 else -1
      try:
        if not 0 < size < os.path.getsize(path):
          raise ValueError
        json.loads(f.read(size))
      except ValueError:
        return "not a .safetensors file (no JSON header)"
    return None
  if lower.endswith(TORCH_SUFFIXES):
    with open(path, "rb") as f:
      magic = f.read(2)
    if not (zipfile.is_zipfile(path) or magic[:1] == b"\x80"):
      return "not a PyTorch file (neither torch.save's zip nor a pickle)"
    return None
  return ("unknown state-dict format; expected .pt, .pth, .th, .tar, .bin, .ckpt, .npz or "
          ".safetensors")
