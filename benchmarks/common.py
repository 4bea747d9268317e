"""Shared helpers of the benchmark scripts (not part of the library).

Each measured configuration runs in its own subprocess (`run_child`), so its peak memory is
its own: on CPU the peak resident set size of that process (`os.wait4` rusage, ru_maxrss),
on an accelerator the device's `memory_stats()['peak_bytes_in_use']` read inside the child.
The parent enforces a wall-clock limit and (optionally) a resident-memory limit per child.

Compatible with jax 0.5.x and jax 0.11.x (only `jax.tree_util`, `jax.jit(...).lower().compile()`,
`jax.block_until_ready` and `jax.random.PRNGKey` are used).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]

GiB = 2 ** 30


# --------------------------------------------------------------------------------------
# Machine / version record.
# --------------------------------------------------------------------------------------


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def _git_commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastntk_jax", "benchmarks"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    if out.returncode == 0:
      return out.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    pass
  return "unknown"


def machine_info() -> dict:
  """Machine, versions, backend and date of this run (imports jax in this process)."""
  import jax  # pylint: disable=g-import-not-at-top
  import psutil  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  info = {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "cpu": _cpu_model(),
      "cpu_cores": os.cpu_count(),
      "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count(),
      "host_memory_gib": round(psutil.virtual_memory().total / GiB, 1),
      "load_average_at_start": (" ".join(f"{x:.2f}" for x in os.getloadavg())
                                if hasattr(os, "getloadavg") else "n/a"),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "flax": _version("flax"),
      "neural_tangents": _version("neural-tangents"),
      "backend": jax.default_backend(),
      "device": f"{device.platform}: {getattr(device, 'device_kind', '?')} "
                f"(x{jax.device_count()})",
      "git_commit": _git_commit(),
  }
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
      info["device_memory_gib"] = round(stats["bytes_limit"] / GiB, 1)
  return info


def machine_markdown(info: dict) -> str:
  rows = [(k.replace("_", " "), str(v)) for k, v in info.items()]
  return markdown_table(["", ""], rows)


# --------------------------------------------------------------------------------------
# Formatting.
# --------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  out = ["| " + " | ".join(str(h) for h in headers) + " |",
         "| " + " | ".join("---" for _ in headers) + " |"]
  for r in rows:
    out.append("| " + " | ".join(str(c) for c in r) + " |")
  return "\n".join(out)


def fmt_bytes(n: Optional[float]) -> str:
  if n is None:
    return "–"
  if n >= GiB:
    return f"{n / GiB:.2f} GiB"
  return f"{n / 2**20:.0f} MiB"


def fmt_s(x: Optional[float]) -> str:
  if x is None:
    return "–"
  return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def fmt_g(x: Optional[float], digits: int = 2) -> str:
  if x is None:
    return "–"
  return f"{x:.{digits}e}"


def atomic_write(path: Path, text: str) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Parent side: one configuration per subprocess.
# --------------------------------------------------------------------------------------

_CURRENT_CHILD: list = []  # the running child, so a SIGTERM to the parent can end it


def _terminate_current_child(*_):
  for p in list(_CURRENT_CHILD):
    try:
      os.killpg(p.pid, signal.SIGKILL)
    except OSError:
      pass
  raise SystemExit(143)


def install_sigterm_handler() -> None:
  """On SIGTERM (e.g. from `timeout`), kill the running child, then exit."""
  signal.signal(signal.SIGTERM, _terminate_current_child)


def child_env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  # Accelerators: allocate on demand so peak_bytes_in_use reflects the computation.
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def run_child(module: str, config: dict, *, timeout_s: float,
              memory_limit_bytes: Optional[int] = None, poll_s: float = 0.25) -> dict:
  """Runs `python -m <module> --worker <config json>` and measures it.

  Returns:
    dict with status ("ok" | "timeout" | "memory" | "error" | "refused"), result (the
    worker's JSON or None), peak_rss_bytes (the child's peak resident set, from wait4),
    wall_s, and log_tail (last lines of the child's output, for errors).
  """
  import psutil  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="fastntk_bench_") as tmp:
    result_path = Path(tmp) / "result.json"
    log_path = Path(tmp) / "log.txt"
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(config),
           "--result", str(result_path)]
    start = time.perf_counter()
    with open(log_path, "w") as log:
      proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    _CURRENT_CHILD.append(proc)
    status, rusage, max_seen_rss = None, None, 0
    try:
      ps = psutil.Process(proc.pid)
    except psutil.Error:
      ps = None
    try:
      while True:
        pid, wstatus, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
          proc.returncode = os.waitstatus_to_exitcode(wstatus)
          break
        elapsed = time.perf_counter() - start
        if ps is not None and memory_limit_bytes is not None:
          try:
            rss = ps.memory_info().rss
            max_seen_rss = max(max_seen_rss, rss)
            if rss > memory_limit_bytes:
              status = "memory"
          except psutil.Error:
            pass
        if elapsed > timeout_s:
          status = "timeout"
        if status is not None:
          os.killpg(proc.pid, signal.SIGKILL)
          _, wstatus, rusage = os.wait4(proc.pid, 0)
          proc.returncode = os.waitstatus_to_exitcode(wstatus)
          break
        time.sleep(poll_s)
    finally:
      _CURRENT_CHILD.remove(proc)
    wall = time.perf_counter() - start
    peak = max(int(rusage.ru_maxrss) * 1024, max_seen_rss) if rusage else None  # KiB on Linux
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    result = None
    if status is None:
      if proc.returncode == 0 and result_path.exists():
        result = json.loads(result_path.read_text())
        status = result.get("status", "ok")
      else:
        status = "oom-killed" if proc.returncode in (-9, 137) else "error"
    return {"status": status, "result": result, "peak_rss_bytes": peak, "wall_s": wall,
            "returncode": proc.returncode, "log_tail": "\n".join(tail)}


# --------------------------------------------------------------------------------------
# Worker side.
# --------------------------------------------------------------------------------------


def worker_main(argv: Sequence[str], fn: Callable[[dict], dict]) -> None:
  """Entry point of a child: runs `fn(config)` and writes its JSON result atomically."""
  ap = argparse.ArgumentParser()
  ap.add_argument("--worker", required=True)
  ap.add_argument("--result", required=True)
  a = ap.parse_args(argv)
  config = json.loads(a.worker)
  out = fn(config)
  out.setdefault("status", "ok")
  out.update(process_memory())
  atomic_write(Path(a.result), json.dumps(out))


def process_memory() -> dict:
  """Peak memory as seen from inside the child: device peak (accelerators) and host RSS."""
  import resource  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  out = {"self_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
         "device_peak_bytes": None}
  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
  return out


def current_rss() -> int:
  import psutil  # pylint: disable=g-import-not-at-top
  return int(psutil.Process().memory_info().rss)


def device_bytes_in_use() -> Optional[int]:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  return (device.memory_stats() or {}).get("bytes_in_use")


def random_data(n: int, num_classes: int, seed: int, n_forget: int):
  """CIFAR-shaped random inputs; the first `n_forget` samples are class 0 (the forgotten
  class), the others have random labels in [1, C). Returns numpy (x [n,32,32,3], y [n])."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
  y = np.concatenate([np.zeros(n_forget, np.int32),
                      rng.integers(1, num_classes, size=n - n_forget).astype(np.int32)])
  return x, y


def build_resnet(name: str, num_classes: int, widths: Optional[Sequence[int]], seed: int,
                 calib_x):
  """A CIFAR ResNet with 'pre-trained-like' BatchNorm statistics.

  Freshly initialised BN statistics (mean 0, var 1) let activations grow through the residual
  stages (2x variance per block: ~2^54 for ResNet-110). We set every BN's running mean/var to
  the batch statistics of `calib_x` instead: one training-mode forward pass gives
  new = m*old + (1-m)*batch, so batch = (new - m*old) / (1-m) exactly.

  Returns:
    (model, trainable, frozen) with frozen = {'params': ..., 'batch_stats': calibrated}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fastntk_jax.models import get_model, make_train_apply_fn, split  # pylint: disable=g-import-not-at-top
  kwargs = {"widths": tuple(widths)} if widths else {}
  model = get_model(name, num_classes, **kwargs)
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3), jnp.float32))
  trainable, frozen = split(variables)
  _, new_stats = jax.jit(make_train_apply_fn(model, frozen))(trainable, jnp.asarray(calib_x))
  m = 0.9  # fastntk_jax.models.layers.BatchNorm.momentum
  stats = jax.tree_util.tree_map(lambda new, old: (new - m * old) / (1 - m), new_stats,
                                 frozen["batch_stats"])
  return model, trainable, {**frozen, "batch_stats": stats}


def perturb(tree, scale: float, seed: int):
  """tree + scale * N(0, 1) noise, leaf by leaf (the 'fine-tuned' params w_D)."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


def time_jitted(fn: Callable, args: tuple, *, repeat_below_s: float = 30.0) -> dict:
  """Compiles `jax.jit(fn)` for `args` (timed), runs it once (timed), and once more when the
  first run took less than `repeat_below_s`; the steady-state figure is the faster run (the
  machine may be shared: the minimum is the least disturbed). CPU seconds of this process
  (all threads, `time.process_time`) are recorded beside the wall-clock seconds.

  Returns:
    dict compile_s, compile_cpu_s, first_run_s, run_s, run_cpu_s, runs, and 'out'.
  """
  import jax  # pylint: disable=g-import-not-at-top
  t0, c0 = time.perf_counter(), time.process_time()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s, compile_cpu = time.perf_counter() - t0, time.process_time() - c0
  t0, c0 = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(compiled(*args))
  first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
  run, run_cpu, runs = first, first_cpu, 1
  if first < repeat_below_s:
    t0, c0 = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(compiled(*args))
    second, second_cpu = time.perf_counter() - t0, time.process_time() - c0
    runs = 2
    if second < first:
      run, run_cpu = second, second_cpu
  return {"compile_s": compile_s, "compile_cpu_s": compile_cpu, "first_run_s": first,
          "run_s": run, "run_cpu_s": run_cpu, "runs": runs, "out": out}


def time_ntk_forget(apply_fn: Callable, params_init, params, retain: tuple, forget: tuple,
                    **kwargs) -> dict:
  """Times the jitted Fast-NTK update (`Forgetter.forget_with_info`, see `time_jitted`) and
  measures it; a cg capped below its tolerance is timed and recorded, not raised.

  Args:
    apply_fn, params_init, params: as for `ntk_forget`.
    retain, forget: (x, y) arrays.
    **kwargs: the other `ntk_forget` arguments.

  Returns:
    {"status": "refused", "message"} when the plan refuses for memory; otherwise
    `time_jitted`'s timings plus "delta" (new - params, flat float64 numpy), "update_norm",
    "finite" and "converged" (cg reached its tolerance; True for the direct solvers).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.flatten_util import ravel_pytree  # pylint: disable=g-import-not-at-top
  from fastntk_jax import unlearn  # pylint: disable=g-import-not-at-top
  num_classes = kwargs.pop("num_classes")
  forgetter = unlearn.make_forgetter(apply_fn, num_classes=num_classes, **kwargs)

  def forget_fn(a, b, xr, yr, xf, yf):
    new, info = forgetter.forget_with_info(a, b, (xr, yr), (xf, yf))
    return new, info

  try:
    t = time_jitted(forget_fn, (params_init, params, *retain, *forget), repeat_below_s=5.0)
  except unlearn.InsufficientMemoryError as e:
    return {"status": "refused", "message": str(e)}
  new, info = t.pop("out")
  delta = np.asarray(ravel_pytree(new)[0] - ravel_pytree(params)[0], np.float64)
  t.update(delta=delta, update_norm=float(np.linalg.norm(delta)),
           finite=bool(np.all(np.isfinite(delta))), converged=bool(info.converged))
  return t


def ensure_repo_on_path() -> None:
  """Lets `python benchmarks/<name>.py` (not only `python -m benchmarks.<name>`) import us."""
  root = str(REPO_ROOT)
  if root not in sys.path:
    sys.path.insert(0, root)
