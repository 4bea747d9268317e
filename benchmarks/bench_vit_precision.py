"""Float32 vs float64 solve of the Fast-NTK update at the ViT-B/16 prompt size, p = 89,108.

    JAX_ENABLE_X64=1 python -m benchmarks.bench_vit_precision --out benchmarks/results

The network is ViT-B/16 as the configs build it (hidden 768, 12 blocks, 12 heads, MLP 3072,
L = 4 key/value prompts in every block, a 20-class head): its trainable collection has
exactly p = 12·2·4·768 + 768·20 + 20 = 89,108 parameters, as configs/vit_base_imagenet_r.py.
p does not depend on the image size, so the images are 32x32 (4 patches + cls) instead of
224x224 (196 patches), which makes the Jacobians ~40x cheaper and lets them fit this CPU.
Weights random (no checkpoint can be downloaded here), inputs N(0, 1) images with balanced
labels, class 0 forgotten, λ = 1e-2 (the configs').

The Jacobian rows J [n·C, p] are computed once, in float32 (the network's dtype in the
pipeline), by `jax.vmap(jax.jacrev)` in blocks. From them the dual solver's update
(Eq. (1), as `solvers._delta_dual`: Θ = J Jᵀ, Cholesky of Θ_rr + λI, Schur
complement, Δ = P J_fᵀ M V) is evaluated in NumPy twice: with Θ and every solve in float32,
and in float64. Reported: ‖Δ₃₂ − Δ₆₄‖/‖Δ₆₄‖, the 2-norm condition number of Θ_rr + λI, and
whether κ·ε(float32) > 1 (the library's precision-warning rule). `--check` first runs the
same NumPy evaluation against `unlearn.ntk_forget(solver="dual", solve_dtype=float64)` on a
small ViT, so the figure is the library's update (the library's own float64 mode also
carries the network's tangents in float64, which this isolates from the solve).
Writes vit_precision.{md,json}.
"""

import argparse
import json
import time

import numpy as np

from benchmarks import common

common.ensure_repo_on_path()


def _cho_solve(a, b):
  import scipy.linalg  # pylint: disable=g-import-not-at-top
  return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a, lower=True), b)


def dual_delta(j_r, e_r, j_f, e_f, lam, dtype):
  """Eq. (1) with the dual solver's algebra in `dtype` (kernels, Cholesky, products).

  j_r [n_r·C, p], e_r [n_r·C] (one_hot - f0), likewise for the forget set."""
  j_r, e_r, j_f, e_f = (np.asarray(a, dtype) for a in (j_r, e_r, j_f, e_f))
  lam = dtype(lam)
  k_rr = j_r @ j_r.T + lam * np.eye(j_r.shape[0], dtype=dtype)
  k_rf = j_r @ j_f.T
  k_ff = j_f @ j_f.T + lam * np.eye(j_f.shape[0], dtype=dtype)
  a = _cho_solve(k_rr, k_rf)
  schur = k_ff - k_rf.T @ a
  v = -e_f + a.T @ e_r
  z = _cho_solve(0.5 * (schur + schur.T), v)
  u = j_f.T @ z
  back = j_r.T @ _cho_solve(k_rr, j_r @ u)
  eig = np.linalg.eigvalsh(k_rr.astype(np.float64))
  return (u - back).astype(np.float64), float(eig[-1] / eig[0]) if eig[0] > 0 else np.inf


def jacobian_rows(apply_fn, w0, x, block: int):
  """([n·C, p] float32 Jacobian rows at w0, [n, C] logits), sample-major."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.flatten_util import ravel_pytree  # pylint: disable=g-import-not-at-top
  flat0, unravel = ravel_pytree(w0)
  f = lambda flat, xi: apply_fn(unravel(flat), xi[None])[0]
  jac = jax.jit(jax.vmap(jax.jacrev(f), in_axes=(None, 0)))
  fwd = jax.jit(lambda flat, xb: apply_fn(unravel(flat), xb))
  rows, logits = [], []
  for i in range(0, x.shape[0], block):
    xb = x[i:i + block]
    rows.append(np.asarray(jac(flat0, xb), np.float32))  # [b, C, p]
    logits.append(np.asarray(fwd(flat0, xb), np.float32))
  j = np.concatenate(rows)
  return j.reshape(-1, j.shape[-1]), np.concatenate(logits)


def _split_rows(j, logits, y, forget, classes):
  e = (np.eye(classes, dtype=np.float32)[y] - logits)  # [n, C]
  j3 = j.reshape(len(y), classes, -1)
  pick = lambda m: (j3[m].reshape(-1, j3.shape[-1]), e[m].reshape(-1))
  return pick(~forget), pick(forget)


def check_against_library(seed: int = 0) -> float:
  """Relative difference of the NumPy float64 evaluation from `unlearn.ntk_forget` (dual,
  float64) on a small prompted ViT; ~1e-10 when both compute the same update."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.flatten_util import ravel_pytree  # pylint: disable=g-import-not-at-top
  from fastntk_jax import unlearn  # pylint: disable=g-import-not-at-top
  from fastntk_jax.models import get_model, make_apply_fn, split  # pylint: disable=g-import-not-at-top
  classes = 4
  model = get_model("vit_b16", classes, prompt_length=2, hidden_size=32, num_layers=2,
                    num_heads=2, mlp_dim=64)
  w0, frozen = split(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3))))
  apply_fn = make_apply_fn(model, frozen)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(12, 32, 32, 3)).astype(np.float32)
  y = np.repeat(np.arange(classes), 3).astype(np.int32)
  forget = y == 0
  new = unlearn.ntk_forget(apply_fn, w0, w0, retain=(x[~forget], y[~forget]),
                           forget=(x[forget], y[forget]), num_classes=classes, damping=1e-2,
                           solver="dual", kernel_impl="jax", solve_dtype=jnp.float64)
  lib = np.asarray(ravel_pytree(new)[0], np.float64) - np.asarray(ravel_pytree(w0)[0], np.float64)
  j, logits = jacobian_rows(apply_fn, w0, x, block=12)
  (j_r, e_r), (j_f, e_f) = _split_rows(j, logits, y, forget, classes)
  ours, _ = dual_delta(j_r, e_r, j_f, e_f, 1e-2, np.float64)
  return float(np.linalg.norm(ours - lib) / np.linalg.norm(lib))


def run_point(n_per_class: int, classes: int, image_size: int, prompt_length: int,
              damping: float, seed: int, block: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fastntk_jax.models import count_params, get_model, make_apply_fn, split  # pylint: disable=g-import-not-at-top
  model = get_model("vit_b16", classes, prompt_length=prompt_length)
  w0, frozen = split(model.init(jax.random.PRNGKey(seed),
                                jnp.zeros((1, image_size, image_size, 3), jnp.float32)))
  p = count_params(w0)
  apply_fn = make_apply_fn(model, frozen)
  rng = np.random.default_rng(seed)
  n = n_per_class * classes
  x = rng.normal(size=(n, image_size, image_size, 3)).astype(np.float32)
  y = np.repeat(np.arange(classes), n_per_class).astype(np.int32)
  forget = y == 0
  start = time.perf_counter()
  j, logits = jacobian_rows(apply_fn, w0, x, block)
  jac_s = time.perf_counter() - start
  (j_r, e_r), (j_f, e_f) = _split_rows(j, logits, y, forget, classes)
  out = {"n": n, "n_per_class": n_per_class, "classes": classes, "p": p,
         "n_outputs": n * classes, "image_size": image_size, "jacobian_seconds": jac_s}
  deltas = {}
  for name, dtype in (("float64", np.float64), ("float32", np.float32)):
    start = time.perf_counter()
    delta, cond = dual_delta(j_r, e_r, j_f, e_f, damping, dtype)
    deltas[name] = delta
    eps = float(np.finfo(dtype).eps)
    out[name] = {"condition_number": cond, "kappa_eps": cond * eps,
                 "update_norm": float(np.linalg.norm(delta)),
                 "finite": bool(np.all(np.isfinite(delta))),
                 "solve_seconds": time.perf_counter() - start}
    print(f"n={n} {name}: κ {cond:.3g} (κ·ε {cond * eps:.2g}), |Δ| "
          f"{np.linalg.norm(delta):.4g}", flush=True)
  ref = np.linalg.norm(deltas["float64"])
  out["relative_difference"] = float(np.linalg.norm(deltas["float32"] - deltas["float64"]) / ref)
  out["cosine"] = float(deltas["float32"] @ deltas["float64"]
                        / (np.linalg.norm(deltas["float32"]) * ref))
  print(f"n={n}: ‖Δ32 − Δ64‖/‖Δ64‖ = {out['relative_difference']:.3g}", flush=True)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--n-per-class", default="2,5", help="comma-separated images per class")
  ap.add_argument("--classes", type=int, default=20)
  ap.add_argument("--image-size", type=int, default=32)
  ap.add_argument("--prompt-length", type=int, default=4)
  ap.add_argument("--damping", type=float, default=1e-2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--block", type=int, default=5, help="images per Jacobian block")
  ap.add_argument("--no-check", action="store_true", help="skip the check against the library")
  args = ap.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_enable_x64:
    raise SystemExit("bench_vit_precision: run with JAX_ENABLE_X64=1 (the library check)")
  info = common.machine_info()
  check = None if args.no_check else check_against_library(args.seed)
  if check is not None:
    print(f"NumPy dual vs unlearn.ntk_forget (float64, small ViT): {check:.2g}", flush=True)
  points = [run_point(int(k), args.classes, args.image_size, args.prompt_length, args.damping,
                      args.seed, args.block)
            for k in args.n_per_class.split(",") if k.strip()]
  out = common.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  record = {"machine": info, "args": vars(args), "library_check": check, "points": points}
  common.atomic_write(out / "vit_precision.json", json.dumps(record, indent=1, default=str))
  rows = [(f"{pt['p']:,}", pt["n"], f"{pt['n_outputs']:,}",
           f"{pt['float64']['condition_number']:.3g}", f"{pt['float32']['kappa_eps']:.2g}",
           f"{pt['relative_difference']:.3g}", f"{pt['cosine']:.6f}",
           common.fmt_s(pt["jacobian_seconds"])) for pt in points]
  md = ["# Float32 vs float64 solve at the ViT-B/16 prompt size", "",
        "    JAX_ENABLE_X64=1 python -m benchmarks.bench_vit_precision "
        f"--out {args.out} --n-per-class {args.n_per_class} --block {args.block}", "",
        common.markdown_table(["p", "n", "n·C", "κ(Θ_rr+λI)", "κ·ε₃₂", "‖Δ₃₂ − Δ₆₄‖/‖Δ₆₄‖",
                               "cos(Δ₃₂, Δ₆₄)", "Jacobian s"], rows), "",
        ("NumPy dual vs `unlearn.ntk_forget(solver='dual', solve_dtype=float64)` on a small "
         f"ViT: relative difference {check:.2g}." if check is not None else ""), "",
        common.machine_markdown(info), ""]
  common.atomic_write(out / "vit_precision.md", "\n".join(md))
  print("\n".join(md))


if __name__ == "__main__":
  main()
