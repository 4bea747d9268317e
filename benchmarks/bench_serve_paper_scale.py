"""Serving deletion requests at the paper's scale: ResNet-110 (BN scale/bias + head,
p = 8,746), 5,000 images, against Retrain run to completion, in one run on this machine.

    JAX_ENABLE_X64=1 python -m benchmarks.bench_serve_paper_scale --out benchmarks/results

What it does, with the library's own pieces (`unlearn.make_forgetter`, `train.fit`):

1. **Cold**: the state of D at w0 (`Forgetter.init`: residuals, G = JᵀJ and b = JᵀE over
   all 5,000 images, Cholesky of G + λI and the ridge solution), float64, with the Jacobian
   rows kept (`cache_jacobian=True`, n·C·p·8 bytes = 3.5 GB) so a request needs no backward
   pass. Its compilation is reported apart (`timings`).
2. **Requests** on that state, each compiled once untimed and then timed: the class request
   (the 500 images of class 0, the paper's class-forgetting case) and a 1% sample request (50
   random images of other classes), with the Jacobian cache and without it (the request then
   computes its own rows: one forward and C backward passes per forgotten image).
3. **Checks**: every result finite; the class request's new ridge solution against an
   independent float64 solve of (J_rᵀJ_r + λI) s = J_rᵀE_r built in NumPy from the cached
   rows of the 4,500 retained images; the cached and uncached requests' parameters agree.
4. **Retrain**: fine-tuning the trainable collection on the class request's D_r (4,500
   images) from w0 with `configs/resnet110_cifar10.py`'s protocol (SGD, 40 epochs, batch
   64), every epoch run, through `train.fit`.

The network is `common.build_resnet` (random frozen convs, BatchNorm statistics of 128
random images, as the other paper-scale benchmarks); random 32x32 inputs (the cost does not
depend on pixel values); the served parameters are w0 plus noise (the request's cost does
not depend on them either). The sample request's ratio uses the class request's Retrain
(4,500 images): Retrain on the 4,950 images a 1% request keeps takes longer, so that ratio
is an upper bound. Writes serve_paper_scale.{md,json,png}; the JSON is rewritten after every
phase, so an interrupted run keeps what it measured.
"""

import argparse
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np

from benchmarks import common
from fastntk_jax import config as config_lib
from fastntk_jax import train
from fastntk_jax import unlearn
from fastntk_jax.models import make_apply_fn


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _serve_timed(forgetter, state, params, indices) -> dict:
  """Serves `indices` twice on the same (immutable) state: the first call compiles, the
  second is the request's latency."""
  t0 = time.perf_counter()
  jax.block_until_ready(forgetter.serve(state, params, indices))
  first = time.perf_counter() - t0
  t0, c0 = time.perf_counter(), time.process_time()
  new, after = jax.block_until_ready(forgetter.serve(state, params, indices))
  seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
  flat = np.asarray(ravel_pytree(new)[0], np.float64)
  return {"seconds": seconds, "cpu_seconds": cpu, "compile_seconds": max(first - seconds, 0.0),
          "num_forgotten": int(indices.size), "finite": bool(np.isfinite(flat).all()),
          "factor_update": ("none", "downdate", "refactor", "refactor after a failed downdate")[
              int(after.last_update)],
          "condition_estimate": float(after.last_condition_estimate),
          "params": flat, "solution": np.asarray(after.solution, np.float64)}


def _independent_solution(state, retain_idx, damping) -> np.ndarray:
  """(J_rᵀJ_r + λI)⁻¹ J_rᵀE_r in NumPy float64 from the cached Jacobian rows."""
  jac = np.asarray(state.jac)
  p = jac.shape[-1]
  g = np.zeros((p, p))
  b = np.zeros(p)
  residuals = np.asarray(state.residuals, np.float64)
  for start in range(0, retain_idx.size, 500):  # bounded host memory
    idx = retain_idx[start:start + 500]
    rows = jac[idx].reshape(-1, p).astype(np.float64)
    g += rows.T @ rows
    b += rows.T @ residuals[idx].reshape(-1)
  g[np.diag_indices(p)] += damping
  return np.linalg.solve(g, b)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--n", type=int, default=5000, help="images in D (10 classes)")
  ap.add_argument("--model", default="resnet110")
  ap.add_argument("--sample-fraction", type=float, default=0.01)
  ap.add_argument("--jacobian-block", type=int, default=64,
                  help="images per compiled Jacobian block (unlearn batch_size)")
  ap.add_argument("--retrain-epochs", type=int, default=None,
                  help="default: the protocol's (40); fewer only for a quick try")
  args = ap.parse_args(argv)
  if not jax.config.jax_enable_x64:
    sys.exit("bench_serve_paper_scale: run with JAX_ENABLE_X64=1 (the solve is float64)")
  out = common.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  cfg = config_lib.load_config_file(str(common.REPO_ROOT / "configs" / "resnet110_cifar10.py"))
  protocol = train.TrainSpec.from_config(cfg.finetune)
  epochs = args.retrain_epochs or protocol.epochs
  c, n = 10, args.n
  n_forget = n // c
  damping = float(cfg.unlearn.damping)
  record = {"machine": common.machine_info(), "argv": list(argv or sys.argv[1:]),
            "model": args.model, "n": n, "num_classes": c, "damping": damping,
            "retrain_protocol": protocol.describe(), "retrain_epochs": epochs}

  def save():
    common.atomic_write(out / "serve_paper_scale.json", json.dumps(record, indent=1,
                                                                  default=str))

  calib_x, _ = common.random_data(128, c, 1000, 0)
  model, w0, frozen = common.build_resnet(args.model, c, None, 0, calib_x)
  x, y = common.random_data(n, c, 0, n_forget)
  apply_fn = make_apply_fn(model, frozen)
  params = common.perturb(w0, 1e-2, 1)
  p = int(ravel_pytree(w0)[0].size)
  record["num_params"] = p
  forgetter = unlearn.make_forgetter(apply_fn, num_classes=c, damping=damping,
                                     solver="primal", batch_size=args.jacobian_block,
                                     solve_dtype=jnp.float64, cache_jacobian=True)

  print(f"cold: state of D over {n} images, p = {p}, Jacobian cache "
        f"{n * c * p * 8 / 2**30:.2f} GiB ...", flush=True)
  timings = {}
  c0 = time.process_time()
  state = jax.block_until_ready(forgetter.init(w0, (x, y), timings=timings))
  record["cold"] = {**timings, "cpu_seconds": time.process_time() - c0,
                    "run_seconds": timings["seconds"] - timings["compile_seconds"],
                    "finite": bool(np.isfinite(np.asarray(state.solution)).all()),
                    "peak_rss_gib": _peak_rss_gib()}
  print(f"  {record['cold']}", flush=True)
  save()

  rng = np.random.default_rng(0)
  class_idx = np.arange(n_forget)
  sample_idx = np.sort(rng.choice(np.arange(n_forget, n), max(1, int(args.sample_fraction * n)),
                                  replace=False))
  uncached = state.replace(jac=None)
  requests = {}
  for name, idx, st in (("class request, Jacobian cache", class_idx, state),
                        ("1% request, Jacobian cache", sample_idx, state),
                        ("1% request, no cache", sample_idx, uncached),
                        ("class request, no cache", class_idx, uncached)):
    print(f"{name}: {idx.size} images ...", flush=True)
    requests[name] = _serve_timed(forgetter, st, params, idx)
    shown = {k: v for k, v in requests[name].items() if k not in ("params", "solution")}
    print(f"  {shown}", flush=True)
    record["requests"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("params", "solution")}
                          for k, v in requests.items()}
    record["peak_rss_gib"] = _peak_rss_gib()
    save()

  print("checks: an independent float64 solve on the retained rows ...", flush=True)
  retain_idx = np.arange(n_forget, n)
  reference = _independent_solution(state, retain_idx, damping)
  got = requests["class request, Jacobian cache"]["solution"]
  record["checks"] = {
      "class_request_vs_independent_solve": float(np.linalg.norm(got - reference)
                                                  / np.linalg.norm(reference)),
      "sample_request_cache_vs_no_cache": float(
          np.linalg.norm(requests["1% request, Jacobian cache"]["params"]
                         - requests["1% request, no cache"]["params"])
          / np.linalg.norm(requests["1% request, Jacobian cache"]["params"])),
      "class_request_cache_vs_no_cache": float(
          np.linalg.norm(requests["class request, Jacobian cache"]["params"]
                         - requests["class request, no cache"]["params"])
          / np.linalg.norm(requests["class request, Jacobian cache"]["params"])),
  }
  print(f"  {record['checks']}", flush=True)
  save()
  del state, uncached, requests

  print(f"Retrain: {epochs} epochs on {n - n_forget} images ...", flush=True)
  spec = train.TrainSpec.from_config(cfg.finetune, epochs=epochs)
  stamps, losses = [time.perf_counter()], []

  def progress(epoch, loss):
    stamps.append(time.perf_counter())
    losses.append(float(loss))
    print(f"  epoch {epoch + 1}/{epochs}: {stamps[-1] - stamps[-2]:.1f} s, loss {loss:.4f}",
          flush=True)
    record["retrain"] = {"epoch_seconds": np.diff(stamps).tolist(), "losses": losses,
                         "complete": epoch + 1 == epochs}
    save()

  c0 = time.process_time()
  train.fit(model, w0, frozen, (x[retain_idx], y[retain_idx]), spec, c, seed=0,
            progress=progress)
  record["retrain"].update(seconds=stamps[-1] - stamps[0], cpu_seconds=time.process_time() - c0)
  record["peak_rss_gib"] = _peak_rss_gib()
  retrain_s = record["retrain"]["seconds"]
  record["ratios"] = {name: r["seconds"] / retrain_s for name, r in record["requests"].items()}
  record["ratios"]["cold (state of D, compile excluded)"] = (
      record["cold"]["run_seconds"] / retrain_s)
  save()
  write_report(record, out)


def write_report(record: dict, out) -> None:
  """serve_paper_scale.md (table) and .png (bars, log scale) from the JSON record."""
  retrain = record["retrain"]
  rows = [["Retrain (fine-tuning on D_r, every epoch run)",
           f"{record['n'] - record['n'] // record['num_classes']:,}",
           f"{retrain['seconds']:.0f}", "–", "1"],
          ["cold: state of D (Grams, factor, solution; Jacobian cache)", f"{record['n']:,}",
           f"{record['cold']['run_seconds']:.1f}", f"{record['cold']['compile_seconds']:.1f}",
           f"{record['ratios']['cold (state of D, compile excluded)']:.3f}"]]
  for name, r in record["requests"].items():
    rows.append([f"request: {name} ({r['factor_update']})", f"{r['num_forgotten']:,}",
                 f"{r['seconds']:.2f}", f"{r['compile_seconds']:.1f}",
                 f"**{record['ratios'][name]:.4f}**"])
  checks = record["checks"]
  lines = [
      f"# Serving deletion requests: {record['model']}, {record['n']:,} images, p = "
      f"{record['num_params']:,}, this machine", "",
      "    JAX_ENABLE_X64=1 python -m benchmarks.bench_serve_paper_scale "
      + " ".join(record["argv"]), "",
      common.machine_markdown(record["machine"]), "",
      f"λ = {record['damping']}, float64 solve. Retrain: {record['retrain_protocol']}, "
      f"{record['retrain_epochs']} epochs, all run. Peak RSS {record['peak_rss_gib']:.1f} GiB.",
      "",
      common.markdown_table(["what", "images", "seconds", "compile s", "/ Retrain"], rows), "",
      "Every result finite: "
      + str(record["cold"]["finite"] and all(r["finite"] for r in record["requests"].values()))
      + f". Class request vs an independent NumPy float64 solve on the retained rows: "
      f"{checks['class_request_vs_independent_solve']:.2e} relative; cached vs uncached "
      f"request parameters: {checks['sample_request_cache_vs_no_cache']:.2e} (1%), "
      f"{checks['class_request_cache_vs_no_cache']:.2e} (class).", "",
      "The 1% request's ratio is against Retrain on 4,500 images (the class request's D_r); "
      "Retrain on the 4,950 images it keeps takes longer, so that ratio is an upper bound.", ""]
  text = "\n".join(lines)
  common.atomic_write(out / "serve_paper_scale.md", text)
  plot(record, out / "serve_paper_scale.png")
  print(text)


def plot(record: dict, path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = ["Retrain (40 epochs)" if record["retrain"]["complete"] else "Retrain",
           "cold: state of D"] + [f"request: {k}" for k in record["requests"]]
  vals = [record["retrain"]["seconds"], record["cold"]["run_seconds"]] + [
      r["seconds"] for r in record["requests"].values()]
  fig, ax = plt.subplots(figsize=(8, 3.2))
  ax.barh(names[::-1], vals[::-1], color=["C0"] * len(record["requests"]) + ["C1", "C7"])
  ax.set_xscale("log")
  for yy, v in enumerate(vals[::-1]):
    ax.text(v, yy, f" {v:.3g} s", va="center", fontsize=8)
  ax.set_xlim(min(vals) / 2, max(vals) * 8)
  ax.set_xlabel("seconds on this CPU (log scale), compilation excluded")
  ax.set_title(f"{record['model']}, {record['n']:,} images: deletion requests vs Retrain",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--replot":
    d = common.Path(sys.argv[2] if len(sys.argv) > 2 else "benchmarks/results")
    write_report(json.loads((d / "serve_paper_scale.json").read_text()), d)
  else:
    main()
