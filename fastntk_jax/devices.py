"""Which devices JAX sees, and whether an accelerator was found: `python -m fastntk_jax.devices`.

Run after installing (`launch/install_accelerator.sh` runs it last):

  python -m fastntk_jax.devices                          # report; exit 0 even on a CPU
  python -m fastntk_jax.devices --require-accelerator    # exit 1 unless a GPU or TPU is found
  python -m fastntk_jax.devices --require-platform=gpu   # exit 1 unless JAX's devices are GPUs
  python -m fastntk_jax.devices --json                   # the same report as one JSON object

It prints the versions of JAX and its accelerator plugins, every device, the outcome of a small
matrix product on the default device, and, when no accelerator was found, why that is likely
(no plugin installed, a plugin without a driver, JAX's own backend errors) and the command that
fixes it. Importing this module does not start JAX; `report()` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import json
import logging
import os
import shutil
import sys
import time
from typing import Optional, Sequence

ACCELERATORS = ("gpu", "tpu")
# Distributions that give JAX an accelerator backend (present when jax[cuda12|cuda13|tpu] was
# installed with a pip that honours the extras).
PLUGINS = ("jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt",
           "libtpu", "libtpu-nightly", "jax-rocm7-plugin", "jax-rocm60-plugin")
INSTALL_HINT = "bash launch/install_accelerator.sh cuda12 (or cuda13, tpu; see BUILD.md)"


@dataclasses.dataclass
class Report:
  """What `report()` found. `platforms` are JAX's device platforms ("cpu", "gpu", "tpu")."""
  jax: Optional[str]
  jaxlib: Optional[str]
  plugins: dict
  backend: Optional[str]
  devices: list
  platforms: list
  backend_messages: list
  nvidia_driver: bool
  check: Optional[str]
  error: Optional[str] = None

  @property
  def accelerator(self) -> bool:
    return any(p in ACCELERATORS for p in self.platforms)


def _version(dist: str) -> Optional[str]:
  try:
    return md.version(dist)
  except md.PackageNotFoundError:
    return None


def nvidia_driver_present() -> bool:
  """An NVIDIA kernel driver is loaded (or its tool is on PATH): a GPU is probably there."""
  return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


class _Collect(logging.Handler):
  """Keeps JAX's backend messages ("Unable to initialize backend 'cuda': ...")."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def report() -> Report:
  """Starts JAX, lists its devices and runs a small matrix product on the default device."""
  plugins = {d: v for d in PLUGINS if (v := _version(d)) is not None}
  collect = _Collect()
  bridge = logging.getLogger("jax._src.xla_bridge")
  bridge.addHandler(collect)
  level, propagate = bridge.level, bridge.propagate
  bridge.setLevel(logging.DEBUG)
  bridge.propagate = False  # reported below instead of printed in between
  try:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    devices = jax.devices()
    backend = jax.default_backend()
  except Exception as e:  # pylint: disable=broad-except  # e.g. JAX_PLATFORMS=cuda without a GPU
    return Report(jax=_version("jax"), jaxlib=_version("jaxlib"), plugins=plugins, backend=None,
                  devices=[], platforms=[], backend_messages=collect.messages,
                  nvidia_driver=nvidia_driver_present(), check=None,
                  error=" ".join(f"{type(e).__name__}: {e}".split()))
  finally:
    bridge.removeHandler(collect)
    bridge.setLevel(level)
    bridge.propagate = propagate
  described = []
  for d in devices:
    entry = {"id": d.id, "platform": d.platform, "kind": getattr(d, "device_kind", ""),
             "process": getattr(d, "process_index", 0)}
    try:
      stats = d.memory_stats() or {}
      if "bytes_limit" in stats:
        entry["memory_gib"] = round(stats["bytes_limit"] / 2**30, 1)
    except Exception:  # pylint: disable=broad-except  # CPU devices have no memory stats
      pass
    described.append(entry)
  start = time.perf_counter()
  x = jnp.ones((512, 512), jnp.float32)
  value = float((x @ x)[0, 0].block_until_ready())
  check = (f"512x512 matmul on {devices[0].platform}:{devices[0].id}: {value:g} (expected 512) "
           f"in {time.perf_counter() - start:.2f} s")
  if value != 512.0:
    check += "  WRONG RESULT"
  return Report(jax=jax.__version__, jaxlib=_version("jaxlib"), plugins=plugins, backend=backend,
                devices=described, platforms=sorted({d.platform for d in devices}),
                backend_messages=collect.messages, nvidia_driver=nvidia_driver_present(),
                check=check)


def diagnosis(r: Report) -> list:
  """Lines saying why no accelerator was found and what to do (empty when one was)."""
  if r.accelerator:
    return []
  lines = [("No accelerator: JAX sees only " + "/".join(r.platforms) + " devices.") if r.platforms
           else "No accelerator: JAX started no backend."]
  cuda = [p for p in r.plugins if p.startswith("jax-cuda")]
  if not r.plugins:
    lines.append("No JAX accelerator plugin is installed (jax-cuda12-plugin, libtpu, ...): this "
                 "is a CPU-only JAX.")
    if r.nvidia_driver:
      lines.append("An NVIDIA driver is present on this machine, so a GPU probably is too.")
    lines.append(f"Install one with: {INSTALL_HINT}")
  elif cuda and not r.nvidia_driver:
    lines.append(f"{', '.join(cuda)} is installed but no NVIDIA driver was found "
                 "(/proc/driver/nvidia, nvidia-smi): no GPU on this machine, or its driver is "
                 "not loaded.")
  else:
    lines.append(f"Installed plugins: {', '.join(f'{k} {v}' for k, v in r.plugins.items())}; "
                 "JAX did not bring them up (see its messages below; a plugin must match "
                 f"jaxlib {r.jaxlib}).")
  for message in r.backend_messages:
    if "nable to initialize backend" in message or "GPU" in message or "TPU" in message:
      lines.append(f"JAX: {' '.join(message.split())}")
  return lines


def _why(r: Report) -> str:
  lines = diagnosis(r)[1:2]
  hint = "" if r.plugins else f" Install one with: {INSTALL_HINT}"
  return (" ".join(lines) + hint).strip()


def format_report(r: Report) -> str:
  out = [f"jax {r.jax}, jaxlib {r.jaxlib}; accelerator plugins: "
         + (", ".join(f"{k} {v}" for k, v in r.plugins.items()) or "none")]
  if r.error:
    out.append(f"JAX failed to start a backend: {r.error}")
  else:
    out.append(f"default backend: {r.backend}; {len(r.devices)} device"
               f"{'s' if len(r.devices) != 1 else ''}:")
    for d in r.devices:
      memory = f", {d['memory_gib']} GiB" if "memory_gib" in d else ""
      out.append(f"  {d['platform']}:{d['id']}  {d['kind']}  (process {d['process']}{memory})")
    out.append(r.check)
  if r.accelerator:
    out.append(f"Accelerator found: {', '.join(p for p in r.platforms if p in ACCELERATORS)}.")
  else:
    out.extend(diagnosis(r))
  return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m fastntk_jax.devices",
      description="Print the devices JAX sees; say clearly when no accelerator was found.")
  parser.add_argument("--require-accelerator", action="store_true",
                      help="exit 1 unless JAX sees a GPU or a TPU")
  parser.add_argument("--require-platform", choices=ACCELERATORS + ("cpu",),
                      help="exit 1 unless JAX sees devices of this platform")
  parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  r = report()
  if args.json:
    print(json.dumps({**dataclasses.asdict(r), "accelerator": r.accelerator,
                      "diagnosis": diagnosis(r)}, indent=2))
  else:
    print(format_report(r))
  failed = None
  if r.error:
    failed = f"JAX failed to start a backend: {r.error}"
  elif args.require_platform and args.require_platform not in r.platforms:
    failed = (f"no {args.require_platform} device found (JAX sees: "
              f"{', '.join(r.platforms) or 'none'}). {_why(r)}")
  elif args.require_accelerator and not r.accelerator:
    failed = (f"no accelerator found (JAX sees: {', '.join(r.platforms) or 'none'}). {_why(r)}")
  elif r.check and r.check.endswith("WRONG RESULT"):
    failed = f"the check computation gave a wrong result: {r.check}"
  if failed:
    print(f"fastntk_jax.devices: error: {failed}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
