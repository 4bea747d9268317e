"""Fast-NTK on ResNet-110 (BN scale/bias + head, p = 8,746) at the paper's scale, 5,000
images, on this machine, phase by phase.

    JAX_ENABLE_X64=1 python -m benchmarks.bench_fastntk_cpu_5000 --out benchmarks/results

The primal solver's two phases are run with the library's own pieces, exactly as
`unlearn.ntk_forget(..., solver="primal")` composes them (`ntk.apply_rows` for the residuals,
`ntk.gram` streaming J_rᵀJ_r and J_fᵀJ_f in blocks of 64 — called eagerly, a host loop over
one compiled block step — and `solvers.primal_delta`), so each phase is timed on its own and
the one set of Grams is solved twice: in float64 (the reference) and in float32 (what a
float32 run would get), with the relative residual of each. That answers "does it complete,
how long, how much memory, and is the result right" in one 20-minute run.

The network is built by `common.build_resnet`: random frozen conv weights with BatchNorm
statistics set to the batch statistics of 128 random images, as a pre-trained network has.
With fresh statistics (mean 0, var 1) a ResNet-110's activations grow ~2x per block (logits
~1e9, Gram eigenvalues to ~1e22), and the float32 primal solve is non-finite: that is what
the first version of this benchmark measured.

Random 32x32 inputs (the cost does not depend on the pixel values), 10 classes, 10% forgotten
(class 0). Writes fastntk_cpu_5000.{md,json}: seconds per phase (wall and CPU), peak RSS of the
whole process, finiteness, update norms and the float32-vs-float64 difference; and
fastntk_cpu_5000.png (seconds per phase; `--replot` redraws it from the JSON).
"""

import argparse
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from fastntk_jax import ntk, unlearn
from fastntk_jax.models import make_apply_fn
from fastntk_jax.unlearn import solvers


def _timed(fn, *args):
  """(result, wall s, CPU s) of fn(*args), blocking on the result."""
  c0, t0 = time.process_time(), time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0, time.process_time() - c0


def _relative_residual(g, b, lam, x):
  """‖(G+λI)x - b‖ / ‖b‖ in float64."""
  g, b, x = (np.asarray(a, np.float64) for a in (g, b, x))
  return float(np.linalg.norm(g @ x + lam * x - b) / np.linalg.norm(b))


def plot(record: dict, path) -> None:
  """Wall seconds per phase (bars) with the peak RSS and the float32-vs-float64 check."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  phases = record["phases"]
  names = list(phases)[::-1]
  walls = [phases[k]["wall_s"] for k in names]
  fig, ax = plt.subplots(figsize=(8.5, 3.6))
  ax.barh(names, walls, color="C0")
  for y, w in enumerate(walls):
    ax.text(w, y, f" {w:.1f} s", va="center", fontsize=8)
  ax.set_xlabel("wall seconds (compilation included)")
  checks = record["checks"]
  ax.set_title(
      f"Fast-NTK primal, p = {record['p']:,}, n = {record['n']:,}: "
      f"{record['total_wall_s']:.0f} s, peak RSS {record['peak_rss_bytes'] / 2**30:.2f} GiB\n"
      f"a float32 solve of the same Grams is off by {checks['‖Δ32 - Δ64‖ / ‖Δ64‖']:.0%} "
      "(relative to float64)", fontsize=9)
  ax.set_xlim(0, max(walls) * 1.18)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--replot", action="store_true",
                  help="only redraw fastntk_cpu_5000.png from the JSON in --out")
  ap.add_argument("--n", type=int, default=5000, help="images in D = D_r ∪ D_f")
  ap.add_argument("--batch-size", type=int, default=64, help="images per streamed Jacobian block")
  ap.add_argument("--damping", type=float, default=1e-2, help="λ")
  ap.add_argument("--model", default="resnet110")
  args = ap.parse_args(argv)
  if args.replot:
    out = common.Path(args.out)
    plot(json.loads((out / "fastntk_cpu_5000.json").read_text()), out / "fastntk_cpu_5000.png")
    return
  if not jax.config.read("jax_enable_x64"):
    sys.exit("bench_fastntk_cpu_5000: run with JAX_ENABLE_X64=1 (the Grams are accumulated "
             "in float64 so that the float32 and float64 solves can be compared)")
  c, n = 10, args.n
  n_f = n // 10
  info = common.machine_info()
  calib_x, _ = common.random_data(128, c, 1000, 0)
  model, w0, frozen = common.build_resnet(args.model, c, None, 0, calib_x)
  apply_fn = make_apply_fn(model, frozen)
  p = ntk.num_params(w0)
  x, y = common.random_data(n, c, 0, n_f)
  x_r, y_r = jnp.asarray(x[n_f:]), jnp.asarray(y[n_f:])
  x_f, y_f = jnp.asarray(x[:n_f]), jnp.asarray(y[:n_f])
  del x
  lam = args.damping
  rows = {}
  retain_gram = f"J_rᵀJ_r, J_rᵀE_r ({n - n_f:,} images)"
  forget_gram = f"J_fᵀJ_f, J_fᵀE_f ({n_f:,} images)"
  print(f"ResNet {args.model}: p = {p:,}, n = {n:,} (forget {n_f:,}), batch {args.batch_size}",
        flush=True)

  def residuals(xs, ys):
    logits = ntk.apply_rows(apply_fn, w0, xs, batch_size=args.batch_size)
    return jax.nn.one_hot(ys, c, dtype=logits.dtype) - logits

  # The same precision scope as solvers.ridge_update (a no-op on CPU, TF32 off on GPU).
  with jax.default_matmul_precision("highest"):
    (e_r, e_f), *rows["residuals (forward passes)"] = _timed(
        lambda: (residuals(x_r, y_r), residuals(x_f, y_f)))
    print(f"residuals: {rows['residuals (forward passes)'][0]:.1f} s", flush=True)
    (g_r, b_r), *rows[retain_gram] = _timed(
        lambda: ntk.gram(apply_fn, w0, x_r, e_r, batch_size=args.batch_size, dtype=jnp.float64))
    print(f"retain Gram: {rows[retain_gram][0]:.1f} s", flush=True)
    (g_f, b_f), *rows[forget_gram] = _timed(
        lambda: ntk.gram(apply_fn, w0, x_f, e_f, batch_size=args.batch_size, dtype=jnp.float64))
    print(f"forget Gram: {rows[forget_gram][0]:.1f} s", flush=True)
    solve = jax.jit(lambda *a: solvers.primal_delta(*a, lam)[0])
    delta64, *rows["primal solve, float64 (2 Cholesky of p×p)"] = _timed(
        solve, g_r, b_r, g_f, b_f)
    f32 = [a.astype(jnp.float32) for a in (g_r, b_r, g_f, b_f)]
    delta32, *rows["primal solve, float32 (2 Cholesky of p×p)"] = _timed(solve, *f32)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  # The retain half of the solve, (G_r+λI)⁻¹b_r, is what both Δs share; check it directly.
  w_r64 = np.linalg.solve(np.asarray(g_r) + lam * np.eye(p), np.asarray(b_r))
  check = {
      "retain ridge solve relative residual, float64": _relative_residual(g_r, b_r, lam, w_r64),
      "Gram G_r largest diagonal": float(jnp.max(jnp.diag(g_r))),
      "Gram G_r smallest diagonal": float(jnp.min(jnp.diag(g_r))),
      "‖Δ‖ float64": float(jnp.linalg.norm(delta64)),
      "‖Δ‖ float32": float(jnp.linalg.norm(delta32)),
      "Δ float64 finite": bool(jnp.all(jnp.isfinite(delta64))),
      "Δ float32 finite": bool(jnp.all(jnp.isfinite(delta32))),
      "‖Δ32 - Δ64‖ / ‖Δ64‖": float(jnp.linalg.norm(delta32 - delta64) / jnp.linalg.norm(delta64)),
  }
  total = sum(r[0] for r in rows.values())
  total_cpu = sum(r[1] for r in rows.values())
  record = {"machine": info, "args": vars(args), "p": p, "n": n, "n_forget": n_f,
            "phases": {k: {"wall_s": v[0], "cpu_s": v[1]} for k, v in rows.items()},
            "total_wall_s": total, "total_cpu_s": total_cpu, "peak_rss_bytes": peak,
            "checks": check}
  cmd = ("JAX_ENABLE_X64=1 python -m benchmarks.bench_fastntk_cpu_5000 " +
         " ".join(argv if argv is not None else sys.argv[1:]))
  lines = [f"# Fast-NTK, {args.model} BN+head, at the paper's scale on this machine", "",
           "    " + cmd, "", common.machine_markdown(info), "",
           f"p = {p:,}, n = {n:,} (n·C = {n * c:,}; {n_f:,} forgotten), λ = {lam:g}, "
           f"Jacobian blocks of {args.batch_size} (compilation included in each phase).", "",
           common.markdown_table(
               ["phase", "wall s", "CPU s"],
               [[k, f"{v[0]:.1f}", f"{v[1]:.1f}"] for k, v in rows.items()] +
               [["**total**", f"**{total:.1f}**", f"**{total_cpu:.1f}**"]]), "",
           f"Peak RSS of the whole process: **{peak / 2**30:.2f} GiB**.", "",
           common.markdown_table(["check", "value"],
                                 [[k, v if isinstance(v, bool) else f"{v:.3g}"]
                                  for k, v in check.items()]), ""]
  text = "\n".join(lines)
  out = common.Path(args.out)
  common.atomic_write(out / "fastntk_cpu_5000.md", text)
  common.atomic_write(out / "fastntk_cpu_5000.json", json.dumps(record, indent=1, default=str))
  plot(record, out / "fastntk_cpu_5000.png")
  print(text)


if __name__ == "__main__":
  main()
