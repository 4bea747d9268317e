"""Dual vs primal vs cg on a real Flax CIFAR ResNet (BN scale/bias + head trainable).

    python -m benchmarks.bench_solvers --out benchmarks/results
    python benchmarks/bench_solvers.py --models resnet20,resnet20:w2 --n 100,400,1600  # grid

For every (model, n) and solver, one subprocess builds the model (random frozen conv weights,
BN statistics set to the batch statistics of random inputs, C = 10), random 32x32 inputs
(forget set = the first 10% = class 0, the rest random labels in [1, C)), params_init = the
initial trainable collection and params = params_init + noise, then:

  1. compiles `jax.jit(unlearn.ntk_forget)` (timed: "compile s"), runs it (timed; run twice
     when the first run is short, "run s" is then the second), and saves Δ = new - params;
  2. for the solvers in --diagnostics-solvers (default primal, dual), calls
     `unlearn.ntk_forget_with_diagnostics` (a second, independent first call: compile + run
     + the condition number's eigen-decomposition, "diag call s") for the condition number.

Peak memory is the child's peak RSS (CPU; whole process: runtime + data + both calls) or the
device's peak_bytes_in_use (accelerators). Each Δ is compared with primal's:
||Δ_s - Δ_primal|| / ||Δ_primal||. `auto`'s choice comes from `unlearn.plan.estimate_costs` +
`unlearn.plan.choose_solver` with the same arguments `ntk_forget` uses.

Writes <out>/bench_solvers.md, bench_solvers.png and bench_solvers.json (rewritten after
every configuration, so a run stopped early still leaves its partial tables).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # pylint: disable=g-import-not-at-top

MODULE = "benchmarks.bench_solvers"
SOLVERS = ("primal", "dual", "cg")  # primal first: the others are compared with it


def parse_model(spec: str) -> tuple[str, list[int] | None]:
  """'resnet20' | 'resnet20:w2' (widths x2) | 'resnet20:32-64-128' -> (name, widths)."""
  name, _, opt = spec.partition(":")
  if not opt:
    return name, None
  if opt.startswith("w"):
    k = int(opt[1:])
    return name, [16 * k, 32 * k, 64 * k]
  return name, [int(v) for v in opt.split("-")]


# --------------------------------------------------------------------------------------
# Worker (one configuration, in its own process).
# --------------------------------------------------------------------------------------


def worker(cfg: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  if cfg.get("solve_dtype") == "float64":
    jax.config.update("jax_enable_x64", True)  # before any array exists
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fastntk_jax import ntk, unlearn  # pylint: disable=g-import-not-at-top
  from fastntk_jax.unlearn import plan as unlearn_plan  # pylint: disable=g-import-not-at-top
  from fastntk_jax.models import make_apply_fn  # pylint: disable=g-import-not-at-top

  c, n, n_f = cfg["num_classes"], cfg["n"], cfg["n_forget"]
  x, y = common.random_data(n, c, cfg["seed"], n_f)
  name, widths = parse_model(cfg["model"])
  calib_x, _ = common.random_data(128, c, cfg["seed"] + 1000, 0)  # same BN stats for every n
  model, trainable, frozen = common.build_resnet(name, c, widths, cfg["seed"], calib_x)
  apply_fn = make_apply_fn(model, frozen)
  p0 = trainable
  p1 = common.perturb(trainable, 0.05, cfg["seed"] + 1)
  xr, yr = jnp.asarray(x[n_f:]), jnp.asarray(y[n_f:])
  xf, yf = jnp.asarray(x[:n_f]), jnp.asarray(y[:n_f])
  p = ntk.num_params(p0)
  solve_dtype = jnp.float64 if cfg.get("solve_dtype") == "float64" else None
  dtype_bytes = 8 if solve_dtype is not None else 4
  kwargs = dict(num_classes=c, damping=cfg["damping"], solver=cfg["solver"],
                batch_size=cfg["batch_size"], cg_maxiter=cfg["cg_maxiter"],
                solve_dtype=solve_dtype)
  network = unlearn_plan.network_cost(apply_fn, p0, xr)  # what ntk_forget's auto uses
  costs = unlearn_plan.estimate_costs(p, n - n_f, n_f, c, batch_size=cfg["batch_size"],
                                 dtype_bytes=dtype_bytes, cg_maxiter=cfg["cg_maxiter"],
                                 network=network)
  budget = int(0.8 * unlearn_plan.available_memory_bytes())
  # What `solver="auto"` picks with the library's defaults (cg_maxiter=None), with the cg
  # iteration cap this benchmark passes (the cap lowers cg's predicted cost), and with the
  # first cost model (a linear model's Jacobian cost, no network passes) for comparison.
  default_costs = unlearn_plan.estimate_costs(p, n - n_f, n_f, c, batch_size=cfg["batch_size"],
                                         dtype_bytes=dtype_bytes, network=network)
  auto, auto_reason = unlearn_plan.choose_solver(default_costs, budget, "auto")
  auto_capped, _ = unlearn_plan.choose_solver(costs, budget, "auto")
  auto_linear, _ = unlearn_plan.choose_solver(
      unlearn_plan.estimate_costs(p, n - n_f, n_f, c, batch_size=cfg["batch_size"],
                             dtype_bytes=dtype_bytes), budget, "auto")
  out = {"p": p, "n_outputs": n * c, "auto": auto, "auto_reason": auto_reason,
         "auto_with_cg_cap": auto_capped, "auto_linear_proxy": auto_linear,
         "forward_flops_per_sample": network.flops if network else None,
         "default_costs": {k: {"bytes": v.bytes, "flops": v.flops}
                           for k, v in default_costs.items()},
         "costs": {k: {"bytes": v.bytes, "flops": v.flops} for k, v in costs.items()},
         "kernel_impl": ntk.resolve_implementation("auto").value,
         "backend": jax.default_backend(), "baseline_rss_bytes": common.current_rss(),
         "baseline_device_bytes": common.device_bytes_in_use()}

  out.update(common.time_ntk_forget(apply_fn, p0, p1, (xr, yr), (xf, yf), **kwargs))
  if out.get("status") == "refused":
    return out
  np.save(cfg["delta_path"], out.pop("delta"))
  if cfg["solver"] in cfg["diagnostics_solvers"]:
    try:
      _, diag = unlearn.ntk_forget_with_diagnostics(
          apply_fn, p0, p1, retain=(xr, yr), forget=(xf, yf), **kwargs)
    except unlearn.SolveError as e:  # non-finite, or cg short of its tolerance: recorded
      out.update(solve_error=str(e), estimated_bytes=costs[cfg["solver"]].bytes)
    else:
      out.update(diag_seconds=diag.seconds, condition_number=diag.condition_number,
                 cg_relative_residual=diag.cg_relative_residual, converged=diag.converged,
                 estimated_bytes=diag.estimated_bytes, measured_bytes=diag.measured_bytes)
  else:
    out["estimated_bytes"] = costs[cfg["solver"]].bytes
  return out


# --------------------------------------------------------------------------------------
# Parent: runs the grid, writes tables and the plot.
# --------------------------------------------------------------------------------------


def peak_bytes(r: dict) -> int | None:
  res = r.get("result") or {}
  if res.get("device_peak_bytes") is not None:
    return res["device_peak_bytes"]
  return r.get("peak_rss_bytes")


def regret(ok: list, auto: str, fastest: dict) -> str:
  """auto's steady-state run time over the fastest solver's ('1.00' = auto was fastest)."""
  mine = next((r for r in ok if r["solver"] == auto), None)
  if mine is None:
    return "– (auto's solver did not complete)"
  return f"{mine['result']['run_s'] / fastest['result']['run_s']:.2f}"


def write_outputs(out_dir: Path, info: dict, args, records: list, notes: list[str]) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  on_device = info["backend"] != "cpu"
  mem_label = "peak device mem" if on_device else "peak RSS"
  # Relative difference vs primal, per configuration.
  primal = {}
  for r in records:
    if r["solver"] == "primal" and r["status"] == "ok":
      primal[(r["model"], r["n"])] = np.load(r["delta_file"])
  rows, cross = [], []
  for r in records:
    res = r.get("result") or {}
    rel = "–"
    ref = primal.get((r["model"], r["n"]))
    if r["status"] == "ok" and ref is not None and Path(r["delta_file"]).exists():
      d = np.load(r["delta_file"])
      rel = f"{np.linalg.norm(d - ref) / max(np.linalg.norm(ref), 1e-300):.1e}"
    comp, run = res.get("compile_s"), res.get("run_s")
    cr = (comp + res["first_run_s"]) if comp is not None else None
    cond = res.get("condition_number")
    extra = ""
    if r["solver"] == "cg" and r["status"] == "ok":
      resid = res.get("cg_relative_residual")
      extra = (f" (cg ≤ {args.cg_maxiter} iterations"
               + (f", residual {resid:.1e}" if resid is not None else "") + ")")
    status = r["status"] if r["status"] != "ok" else "ok"
    if r["status"] not in ("ok",) and r.get("why"):
      status += f": {r['why']}"
    rows.append([r["model"], res.get("p", r.get("p", "–")), r["n"], r["n"] * args.num_classes,
                 r["solver"], common.fmt_s(comp), common.fmt_s(run),
                 common.fmt_s(res.get("run_cpu_s")), common.fmt_s(cr),
                 common.fmt_s(res.get("diag_seconds")), common.fmt_bytes(peak_bytes(r)),
                 common.fmt_bytes(res.get("baseline_device_bytes") if on_device
                                  else res.get("baseline_rss_bytes")),
                 common.fmt_bytes(res.get("estimated_bytes")),
                 common.fmt_g(cond, 1) if cond else "–", rel + extra, status])
  configs = []
  for r in records:
    key = (r["model"], r["n"])
    if key not in configs:
      configs.append(key)
  for key in configs:
    rs = [r for r in records if (r["model"], r["n"]) == key]
    ok = [r for r in rs if r["status"] == "ok"]
    res0 = next((r["result"] for r in rs if r.get("result")), {})
    if not ok:
      cross.append([key[0], res0.get("p", "–"), key[1] * args.num_classes, "–", "–",
                    res0.get("auto", "–"), "–", "–", res0.get("auto_linear_proxy", "–"), "–",
                    "no solver completed"])
      continue
    fast_run = min(ok, key=lambda r: r["result"]["run_s"])
    fast_cr = min(ok, key=lambda r: r["result"]["compile_s"] + r["result"]["first_run_s"])
    auto = res0.get("auto", "–")
    incomplete = [r["solver"] for r in rs if r["status"] != "ok"]
    note = ("" if not incomplete else
            "not completed: " + ", ".join(incomplete))
    flops = res0.get("default_costs", {})
    pred = " / ".join(f"{flops[s]['flops']:.1e}" for s in SOLVERS if s in flops)
    cross.append([key[0], res0.get("p", "–"), key[1] * args.num_classes,
                  f"{fast_run['solver']} ({common.fmt_s(fast_run['result']['run_s'])} s)",
                  f"{fast_cr['solver']} "
                  f"({common.fmt_s(fast_cr['result']['compile_s'] + fast_cr['result']['first_run_s'])} s)",
                  f"{auto} (with cg cap: {res0.get('auto_with_cg_cap', '–')})",
                  "yes" if auto == fast_run["solver"] else "**no**", regret(ok, auto, fast_run),
                  res0.get("auto_linear_proxy", "–"), pred, note])

  md = [f"# Solver benchmark: dual vs primal vs cg ({info['backend']})", "",
        "Generated by `benchmarks/bench_solvers.py`. Command:", "",
        f"    {' '.join(['python -m benchmarks.bench_solvers'] + sys.argv[1:])}", "",
        "## Machine", "", common.machine_markdown(info), "",
        "## Setup", "",
        f"CIFAR ResNets (random frozen conv weights, BN statistics = batch statistics of random "
        f"inputs), trainable = BN scale/bias + head; C = {args.num_classes}; random 32x32x3 "
        f"inputs; forget set = first {args.forget_frac:.0%} of n (class 0), the rest random "
        f"labels; damping λ = {args.damping}; batch_size = {args.batch_size}; network in "
        f"float32, solve in {args.solve_dtype}; "
        f"cg_maxiter = {args.cg_maxiter}. `:w2` = widths doubled (32, 64, 128).", "",
        "Columns: *compile s* = trace+lower+compile of `jax.jit(ntk_forget)`; *run s* = "
        "steady-state run of the compiled update (the faster of two runs when the first took "
        "< 5 s, else the one run); *run CPU s* = CPU time of that run summed over threads "
        "(less sensitive than wall time to other jobs on a shared machine); *compile+run s* = "
        "compile + first run (what a first call costs); *diag call s* = a later "
        "`ntk_forget_with_diagnostics` call in the same process (it re-traces and compiles "
        "its own jit, partly served by caches warmed by the first call, and adds the "
        "eigen-decomposition for the condition number); "
        f"*{mem_label}* = peak of the whole child process (" +
        ("device peak_bytes_in_use" if on_device else
         "ru_maxrss: runtime + data + both calls") +
        "), *baseline* = the same just before the first compile; *estimate* = "
        "`estimate_costs` (the solver's working memory); *cond* = condition number of the "
        "matrix the solver inverts (dual: Θ_rr+λI, primal: G+λI over D); *rel diff* = "
        "‖Δ − Δ_primal‖/‖Δ_primal‖.", "",
        "## Timings and memory", "",
        common.markdown_table(
            ["model", "p", "n", "n·C", "solver", "compile s", "run s", "run CPU s",
             "compile+run s",
             "diag call s", mem_label, "baseline", "estimate", "cond", "rel diff vs primal",
             "status"], rows), "",
        "## Crossover and `auto`", "",
        "*predicted FLOPs* from `estimate_costs` with the library defaults (primal / dual / "
        "cg; network passes counted with the forward FLOPs of `unlearn_plan.network_cost`), which "
        "`auto` minimises among the solvers predicted to fit in memory; *linear-proxy model "
        "picked* = the first cost model's choice (Jacobians costed as a linear model's); *auto's "
        "run / fastest* = how much slower auto's choice ran than the fastest (1.00 = none); *auto "
        "picks* = `choose_solver` with the library defaults (cg_maxiter=None), and in brackets "
        f"with this run's cg cap ({args.cg_maxiter} iterations), which lowers cg's predicted "
        "cost. *fastest* compares the solvers that completed.", "",
        common.markdown_table(
            ["model", "p", "n·C", "fastest (run)", "fastest (compile+run)", "auto picks",
             "auto = fastest run?", "auto's run / fastest", "linear-proxy model picked",
             "predicted FLOPs p/d/cg", "note"], cross), ""]
  if notes:
    md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  md += ["Plot: `bench_solvers.png`. Raw records: `bench_solvers.json`.", ""]
  common.atomic_write(out_dir / "bench_solvers.md", "\n".join(md))
  slim = [{k: v for k, v in r.items() if k != "delta_file"} for r in records]
  common.atomic_write(out_dir / "bench_solvers.json",
                      json.dumps({"machine": info, "args": vars(args), "records": slim},
                                 indent=1, default=str))
  plot(out_dir / "bench_solvers.png", info, records, configs, mem_label)


def plot(path: Path, info: dict, records: list, configs: list, mem_label: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
  labels = [f"{m}\nn={n}" for m, n in configs]
  xs = np.arange(len(configs))
  width = 0.26
  colors = {"primal": "tab:blue", "dual": "tab:orange", "cg": "tab:green"}
  for i, s in enumerate(SOLVERS):
    run, cr, mem = [], [], []
    for key in configs:
      r = next((r for r in records if (r["model"], r["n"]) == key and r["solver"] == s), None)
      res = (r or {}).get("result") or {}
      ok = r is not None and r["status"] == "ok"
      run.append(res["run_s"] if ok else np.nan)
      cr.append(res["compile_s"] + res["first_run_s"] if ok else np.nan)
      mem.append((peak_bytes(r) or np.nan) / 2**20 if r is not None else np.nan)
    off = (i - 1) * width
    axes[0].bar(xs + off, run, width, label=s, color=colors[s])
    axes[1].bar(xs + off, cr, width, label=s, color=colors[s])
    axes[2].bar(xs + off, mem, width, label=s, color=colors[s])
  for ax, title, unit in ((axes[0], "steady-state run", "s"),
                          (axes[1], "compile + first run", "s"),
                          (axes[2], mem_label + " (whole process)", "MiB")):
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize=8)
  fig.suptitle(f"Fast-NTK solvers, {info['device']}, jax {info['jax']}, {info['date_utc']} "
               "(missing bar = not completed)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--configs", default="resnet8@40,resnet8:w2@40,resnet8@160",
                  help="comma list of MODEL@n, MODEL = resnet8|resnet20|...[:wK (widths xK)|"
                       ":a-b-c (widths)]; run in this order")
  ap.add_argument("--models", default=None, help="with --n: the grid models x n (overrides "
                  "--configs), smallest n first")
  ap.add_argument("--n", default=None, help="comma list of total sample counts n")
  ap.add_argument("--solvers", default=",".join(SOLVERS))
  ap.add_argument("--num-classes", type=int, default=10)
  ap.add_argument("--forget-frac", type=float, default=0.1)
  ap.add_argument("--damping", type=float, default=1e-2)
  ap.add_argument("--batch-size", type=int, default=256)
  ap.add_argument("--cg-maxiter", type=int, default=10,
                  help="cg iteration cap (the library default min(2*dim, 2000) is far too slow "
                       "for a CPU benchmark; the residual is reported)")
  ap.add_argument("--timeout", type=float, default=120.0, help="per configuration, seconds")
  ap.add_argument("--budget-seconds", type=float, default=360.0,
                  help="total; later configurations are skipped once it is spent")
  ap.add_argument("--diagnostics-solvers", default="primal,dual",
                  help="solvers that also get an ntk_forget_with_diagnostics call (condition "
                       "number; cg: residual)")
  ap.add_argument("--no-diagnostics", action="store_true",
                  help="no ntk_forget_with_diagnostics call at all (no condition numbers)")
  ap.add_argument("--solve-dtype", choices=("float32", "float64"), default="float32",
                  help="dtype of the kernels/Grams in the solve (float64 enables x64 in the "
                       "children; the network itself stays float32)")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  common.install_sigterm_handler()
  out_dir = Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  info = common.machine_info()
  print(json.dumps(info, indent=1), flush=True)
  if args.models or args.n:
    models = [m for m in (args.models or "resnet20").split(",") if m]
    ns = [int(v) for v in (args.n or "100").split(",") if v]
    configs = [(m, n) for n in ns for m in models]
  else:
    configs = []
    for item in args.configs.split(","):
      m, _, n = item.partition("@")
      configs.append((m, int(n)))
  diag_solvers = ([] if args.no_diagnostics else
                  [s for s in args.diagnostics_solvers.split(",") if s])
  solvers = [s for s in args.solvers.split(",") if s]
  if "primal" in solvers:
    solvers = ["primal"] + [s for s in solvers if s != "primal"]
  start = time.perf_counter()
  records, notes = [], []
  import tempfile  # pylint: disable=g-import-not-at-top
  tmp = Path(tempfile.mkdtemp(prefix="bench_solvers_"))
  for model, n in configs:
    n_f = max(1, round(args.forget_frac * n))
    for solver in solvers:
      left = args.budget_seconds - (time.perf_counter() - start)
      rec = {"model": model, "n": n, "solver": solver,
             "delta_file": str(tmp / f"{model.replace(':', '_')}_{n}_{solver}.npy")}
      if left < 20:
        rec.update(status="skipped", why=f"total budget {args.budget_seconds:.0f} s spent")
        records.append(rec)
        continue
      cfg = {"model": model, "n": n, "n_forget": n_f, "solver": solver,
             "num_classes": args.num_classes, "damping": args.damping,
             "batch_size": args.batch_size, "cg_maxiter": args.cg_maxiter,
             "seed": args.seed, "diagnostics_solvers": diag_solvers,
             "solve_dtype": args.solve_dtype,
             "delta_path": rec["delta_file"]}
      limit = min(args.timeout, left)
      print(f"[bench_solvers] {model} n={n} {solver} (limit {limit:.0f} s)...", flush=True)
      r = common.run_child(MODULE, cfg, timeout_s=limit)
      rec.update(status=r["status"], result=r["result"], peak_rss_bytes=r["peak_rss_bytes"],
                 wall_s=r["wall_s"])
      if r["status"] == "timeout":
        rec["why"] = f"> {limit:.0f} s" + (" (what was left of the total budget)"
                                           if limit < args.timeout else "")
      elif r["status"] == "refused":
        rec["why"] = (r["result"] or {}).get("message", "")
      elif r["status"] != "ok":
        rec["why"] = r["log_tail"].splitlines()[-1][:200] if r["log_tail"] else ""
        print(r["log_tail"], flush=True)
      res = r["result"] or {}
      print(f"  -> {r['status']} wall {r['wall_s']:.1f} s, compile {res.get('compile_s')}, "
            f"run {res.get('run_s')}, peak {common.fmt_bytes(peak_bytes(rec))}", flush=True)
      records.append(rec)
      write_outputs(out_dir, info, args, records, notes)
  notes.append(f"total wall time {time.perf_counter() - start:.0f} s "
               f"(budget {args.budget_seconds:.0f} s, per-configuration limit {args.timeout:.0f} s)")
  write_outputs(out_dir, info, args, records, notes)
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(tmp, ignore_errors=True)  # the saved updates (Δ) were only for the comparison
  print((out_dir / "bench_solvers.md").read_text())
  return 0


if __name__ == "__main__":
  if "--worker" in sys.argv:
    common.worker_main(sys.argv[1:], worker)
  else:
    sys.exit(main())
