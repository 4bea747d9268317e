"""Roofline: achieved FLOP/s of the Fast-NTK building blocks vs this machine's matmul peak.

Measures, in one run on one machine:
  * the matmul peak: a float32 GEMM (N x N x N, default 2048) — the practical ceiling;
  * the per-sample Jacobian of a CIFAR ResNet's logits w.r.t. its BN+head collection
    (`vmap(jacrev)`, the cost that dominates every solver), with its FLOPs counted by XLA's
    own cost analysis of the compiled program;
  * the contractions the solvers do with it: JᵀJ (primal, 2·m·p² FLOPs) and J Jᵀ (dual,
    2·m²·p FLOPs), m = n·C rows; the primal's p×p Cholesky (p³/3 FLOPs);
  * the dual's matrix-free passes: a batched jvp and vjp over the same samples (XLA's count).
Each is compiled first and timed as the best of several runs; the table gives GFLOP/s and the
fraction of the measured GEMM peak.

Then the **reverse-mode floor** of the cold path, per `--floor-models` (default ResNet-110
BN+head at 32x32 and ViT-S/16 prompts at 224x224, C = 10): the per-sample Jacobian of a
block (`ntk.jacobian_rows`, what the state of D and the primal Grams compute, by each
`ntk.JacobianMethod`, with compile seconds) against one
forward and C backward passes over the same block (`jax.vjp` once, C pullbacks of one-hot
cotangents: what any reverse-mode Jacobian must do at least), per image; the ratio is the
cold path's distance from its bound (target ≤ 1.1). Writes `roofline.{md,json,png}`.

    python -m benchmarks.bench_roofline --out benchmarks/results
    python -m benchmarks.bench_roofline --out DIR --floor-only   # the floor table alone
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from fastntk_jax import ntk
from fastntk_jax.models import get_model
from fastntk_jax.models import trainable as tr


def best_time(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def xla_flops(fn, *args) -> float:
  analysis = fn.lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def compile_seconds(fn, *args) -> float:
  start = time.perf_counter()
  fn.lower(*args).compile()
  return time.perf_counter() - start


def reverse_mode_floor(name: str, image_size: int, block: int, *, num_classes: int) -> dict:
  """Per-image seconds of a block's per-sample Jacobian (each `ntk.JacobianMethod`) and of
  forward + C backward passes, with each program's compile seconds."""
  model = get_model(name, num_classes)
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, image_size, image_size, 3)))
  w, frozen = tr.split(variables)
  apply_fn = tr.make_apply_fn(model, frozen)
  x = jax.random.normal(jax.random.PRNGKey(2), (block, image_size, image_size, 3), jnp.float32)

  def forward_and_backwards(w, x):
    out, pull = jax.vjp(lambda w: apply_fn(w, x), w)
    return out, [pull(jax.nn.one_hot(jnp.full((x.shape[0],), c), num_classes,
                                     dtype=out.dtype))[0] for c in range(num_classes)]

  floor = jax.jit(forward_and_backwards)
  floor_compile_s = compile_seconds(floor, w, x)  # first: later calls hit the cache
  t_floor = best_time(floor, w, x, repeats=3)
  out = {"model": name, "image_size": image_size, "block": block,
         "num_params": int(ntk.num_params(w)), "floor_s_per_image": t_floor / block,
         "floor_compile_s": floor_compile_s,
         "auto": ntk.resolve_jacobian_method("auto", num_classes).value, "methods": {}}
  for method in (ntk.JacobianMethod.BATCHED_COTANGENTS, ntk.JacobianMethod.PULLBACKS):
    jac = jax.jit(lambda w, x, m=method: ntk.jacobian_rows(apply_fn, w, x, batch_size=None,
                                                           method=m))
    compile_s = compile_seconds(jac, w, x)
    t_jac = best_time(jac, w, x, repeats=3)
    out["methods"][method.value] = {"jacobian_s_per_image": t_jac / block,
                                    "compile_s": compile_s,
                                    "ratio": t_jac / t_floor}
  return out


def measure_floors(spec_list: str) -> list:
  floors = []
  for spec in filter(None, spec_list.split(",")):
    name, size, block = spec.split(":")
    floors.append(reverse_mode_floor(name, int(size), int(block), num_classes=10))
    print(floors[-1], flush=True)
  return floors


def floor_table(floors: list) -> list:
  if not floors:
    return []
  lines = ["## The cold path against its reverse-mode floor", "",
           "Per image: the per-sample Jacobian of a block (`ntk.jacobian_rows`, each "
           "`JacobianMethod`) vs one forward and C = 10 backward passes over the same block "
           "(the least any reverse-mode Jacobian does). Best of 3 after compiling; compile "
           "seconds apart. AUTO's choice in bold.", "",
           "| model | image | p | block | method | Jacobian s/image | forward + C backward "
           "s/image | ratio | compile s (floor's) |", "|---|---|---|---|---|---|---|---|---|"]
  for f in floors:
    for method, m in f["methods"].items():
      mark = "**" if method == f["auto"] else ""
      lines.append(f"| {f['model']} | {f['image_size']}² | {f['num_params']:,} | "
                   f"{f['block']} | {mark}{method}{mark} | {m['jacobian_s_per_image']:.4f} | "
                   f"{f['floor_s_per_image']:.4f} | {mark}{m['ratio']:.2f}{mark} | "
                   f"{m['compile_s']:.1f} ({f['floor_compile_s']:.1f}) |")
  return lines + [""]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--gemm", type=int, default=2048)
  ap.add_argument("--model", default="resnet20")
  ap.add_argument("--n", type=int, default=64, help="samples per Jacobian block")
  ap.add_argument("--floor-models", default="resnet110:32:64,vit_s16:224:8",
                  help="name:image_size:block,... for the reverse-mode floor ('' = none)")
  ap.add_argument("--floor-only", action="store_true",
                  help="only the floor table (floor.{md,json}), not the roofline")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  machine = common.machine_info()
  if args.floor_only:
    floors = measure_floors(args.floor_models)
    lines = ["# The cold path against its reverse-mode floor", "",
             f"    python -m benchmarks.bench_roofline --out {args.out} --floor-only "
             f"--floor-models={args.floor_models}", "", common.machine_markdown(machine), ""]
    lines += floor_table(floors)
    with open(os.path.join(args.out, "floor.md"), "w") as f:
      f.write("\n".join(lines))
    with open(os.path.join(args.out, "floor.json"), "w") as f:
      json.dump({"machine": machine, "floors": floors}, f, indent=1)
    print("\n".join(lines))
    return

  rows = []
  k = jax.random.PRNGKey(0)
  a = jax.random.normal(k, (args.gemm, args.gemm), jnp.float32)
  gemm = jax.jit(lambda a, b: jnp.matmul(a, b, precision="highest"))
  t = best_time(gemm, a, a)
  peak = 2.0 * args.gemm ** 3 / t
  rows.append(("GEMM float32 %d³ (the peak)" % args.gemm, 2.0 * args.gemm ** 3, t))

  model = get_model(args.model, 10)
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
  w, frozen = tr.split(variables)
  apply_fn = tr.make_apply_fn(model, frozen)
  x = jax.random.normal(jax.random.PRNGKey(2), (args.n, 32, 32, 3), jnp.float32)
  jac = jax.jit(lambda w, x: ntk.jacobian(apply_fn, w, x))
  flops = xla_flops(jac, w, x)
  rows.append((f"Jacobian, {args.model} BN+head, {args.n} samples (vmap(jacrev))", flops,
               best_time(jac, w, x)))
  j = jac(w, x)
  m, p = j.shape
  jtj = jax.jit(lambda j: jnp.matmul(j.T, j, precision="highest"))
  rows.append((f"JᵀJ ({m} x {p}) -> {p}²  [primal]", 2.0 * m * p * p, best_time(jtj, j)))
  jjt = jax.jit(lambda j: jnp.matmul(j, j.T, precision="highest"))
  rows.append((f"J Jᵀ ({m} x {p}) -> {m}²  [dual]", 2.0 * m * m * p, best_time(jjt, j)))
  # The dual's matrix-free passes (P J_fᵀ: one vjp and one jvp per sample), batched.
  u = jax.tree_util.tree_map(jnp.ones_like, w)
  jvp = jax.jit(lambda w, x, u: ntk.jvp_rows(apply_fn, w, x, u, batch_size=None))
  rows.append((f"jvp, {args.model}, {args.n} samples (batched)  [dual]", xla_flops(jvp, w, x, u),
               best_time(jvp, w, x, u)))
  cot = jnp.ones((args.n, j.shape[0] // args.n), jnp.float32)
  vjp = jax.jit(lambda w, x, c: ntk.vjp_rows(apply_fn, w, x, c, batch_size=None))
  rows.append((f"vjp, {args.model}, {args.n} samples (batched)  [dual]",
               xla_flops(vjp, w, x, cot), best_time(vjp, w, x, cot)))
  spd = jtj(j) + jnp.eye(p, dtype=j.dtype)
  chol = jax.jit(lambda a: jnp.linalg.cholesky(a))
  rows.append((f"Cholesky {p}² [primal]", p ** 3 / 3.0, best_time(chol, spd)))

  lines = ["# Roofline: achieved FLOP/s vs this machine's GEMM peak", "",
           "    python -m benchmarks.bench_roofline --out " + args.out, "",
           common.machine_markdown(machine), "",
           "| computation | GFLOP | seconds (best of 5) | GFLOP/s | % of GEMM peak |",
           "|---|---|---|---|---|"]
  record = []
  for name, fl, secs in rows:
    rate = fl / secs
    lines.append(f"| {name} | {fl / 1e9:.3f} | {secs:.4f} | {rate / 1e9:.1f} | "
                 f"{100 * rate / peak:.1f}% |")
    record.append({"name": name, "flops": fl, "seconds": secs, "flops_per_s": rate})
  lines += ["", "Jacobian FLOPs are XLA's cost analysis of the compiled program; the "
            "contractions' are the analytic 2·m·k·n.", ""]
  floors = measure_floors(args.floor_models)
  lines += floor_table(floors)
  with open(os.path.join(args.out, "roofline.md"), "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(args.out, "roofline.json"), "w") as f:
    json.dump({"machine": machine, "rows": record, "peak_flops_per_s": peak,
               "floors": floors}, f, indent=1)

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 3.5))
  names = [r[0].split(" (")[0].split(",")[0] for r in rows]
  rates = [r[1] / r[2] / 1e9 for r in rows]
  ax.barh(names, rates, color=["k"] + ["C0"] * (len(rows) - 1))
  ax.axvline(peak / 1e9, color="k", ls="--", lw=0.8)
  ax.set_xlabel("GFLOP/s (dashed: measured GEMM peak)")
  ax.set_title(f"Roofline on {jax.default_backend()}")
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "roofline.png"), dpi=110)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
