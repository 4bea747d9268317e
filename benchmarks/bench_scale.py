"""Fast-NTK (BN scale/bias + head of ResNet-110) vs full-model NTK (all weights) as n grows.

    python -m benchmarks.bench_scale --out benchmarks/results
    python -m benchmarks.bench_scale --max-n 5000 --budget-seconds 120    # e.g. on a GPU

(CPU defaults: n = 16, 32 for both methods, 330 s per point, 660 s in all: on a 2-core CPU a
single ResNet-110 point costs minutes, most of it XLA compilation.)

Both methods compute the same kind of unlearning update (`unlearn.ntk_forget`, linearised at
w0) on ResNet-110 (CIFAR, option-A shortcuts, random frozen weights, BN statistics set to the
batch statistics of random inputs), C = 10, random 32x32 inputs, forget set = 10% (class 0):

  * fast: the trainable collection only (p ≈ 8.7k), primal solver, Jacobians streamed in
    batches of --fast-batch-size: memory ~ p² + batch·C·p, independent of n.
  * full: ALL weights trainable (the frozen conv kernels merged into the trainable pytree,
    p ≈ 1.73M; BN running statistics stay closed over), dual solver (the only one that can
    hold p = 1.7M: primal needs p² floats), kernel blocks of --full-batch-size samples.

Each (method, n) runs in its own subprocess: compile time (trace+lower+compile of
`jax.jit(ntk_forget)`) and run time are reported separately; peak memory is the child's peak
RSS (CPU) or the device's peak_bytes_in_use (accelerators). A method's sequence stops at the
first point that exceeds --budget-seconds (wall, whole child) or --memory-budget-gb (RSS
watchdog on CPU; also passed to ntk_forget as memory_limit_bytes, so the library refuses a
predicted overrun), or that is predicted (power-law fit in n of the last two measured points)
to take more than 2x the budget; the table says where and why. Missing Fast-NTK sizes up to
--target-n are extrapolated from the measured points and labelled as such.

Writes <out>/bench_scale.md, bench_scale.png and bench_scale.json (rewritten after each point).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # pylint: disable=g-import-not-at-top

MODULE = "benchmarks.bench_scale"
METHODS = ("fast", "full")
LABEL = {"fast": "Fast-NTK (BN+head, primal)", "full": "full-model NTK (all weights, dual)"}


# --------------------------------------------------------------------------------------
# Worker.
# --------------------------------------------------------------------------------------


def worker(cfg: dict) -> dict:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fastntk_jax import ntk, unlearn  # pylint: disable=g-import-not-at-top
  from fastntk_jax.unlearn import plan as unlearn_plan  # pylint: disable=g-import-not-at-top
  from fastntk_jax.models import make_apply_fn  # pylint: disable=g-import-not-at-top

  c, n, n_f = cfg["num_classes"], cfg["n"], cfg["n_forget"]
  calib_x, _ = common.random_data(128, c, cfg["seed"] + 1000, 0)
  model, trainable, frozen = common.build_resnet(cfg["model"], c, None, cfg["seed"], calib_x)
  x, y = common.random_data(n, c, cfg["seed"], n_f)
  if cfg["method"] == "fast":
    apply_fn = make_apply_fn(model, frozen)
    w0 = trainable
  else:
    stats = frozen["batch_stats"]
    w0 = {"trainable": trainable, "params": frozen["params"]}

    def apply_fn(w, xb):
      return model.apply({"params": w["params"], "trainable": w["trainable"],
                          "batch_stats": stats}, xb, train=False)
  w1 = common.perturb(w0, 0.01, cfg["seed"] + 1)
  p = ntk.num_params(w0)
  xr, yr = jnp.asarray(x[n_f:]), jnp.asarray(y[n_f:])
  xf, yf = jnp.asarray(x[:n_f]), jnp.asarray(y[:n_f])
  del x
  kwargs = dict(num_classes=c, damping=cfg["damping"], solver=cfg["solver"],
                batch_size=cfg["batch_size"], memory_limit_bytes=cfg["memory_limit_bytes"])
  costs = unlearn_plan.estimate_costs(p, n - n_f, n_f, c, batch_size=cfg["batch_size"],
                                 dtype_bytes=4)
  out = {"p": p, "estimated_bytes": costs[cfg["solver"]].bytes,
         "kernel_impl": ntk.resolve_implementation("auto").value,
         "baseline_rss_bytes": common.current_rss(),
         "baseline_device_bytes": common.device_bytes_in_use()}

  out.update(common.time_ntk_forget(apply_fn, w0, w1, (xr, yr), (xf, yf), **kwargs))
  out.pop("delta", None)
  return out


# --------------------------------------------------------------------------------------
# Parent.
# --------------------------------------------------------------------------------------


def peak_bytes(rec: dict):
  res = rec.get("result") or {}
  if res.get("device_peak_bytes") is not None:
    return res["device_peak_bytes"]
  return rec.get("peak_rss_bytes")


def power_law(points: list[tuple[float, float]], n: float) -> float:
  """Extrapolates t(n) from the last two (n, t) points as t = a·n^k (k clipped to [1, 3])."""
  (n1, t1), (n2, t2) = points[-2], points[-1]
  k = math.log(t2 / t1) / math.log(n2 / n1) if t1 > 0 and t2 > 0 and n2 != n1 else 1.0
  k = min(max(k, 1.0), 3.0)
  return t2 * (n / n2) ** k


def linear_fit(points: list[tuple[float, float]], n: float) -> tuple[float, float, float]:
  """Least-squares t = a + b·n over all points; returns (prediction, a, b)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ns = np.array([q[0] for q in points], float)
  ts = np.array([q[1] for q in points], float)
  if len(points) == 1:
    b, a = ts[0] / ns[0], 0.0
  else:
    b, a = np.polyfit(ns, ts, 1)
    if b <= 0:  # noise-dominated: fall back to proportional scaling of the largest point
      b, a = ts[-1] / ns[-1], 0.0
  return float(a + b * n), float(a), float(b)


def write_outputs(out_dir: Path, info: dict, args, records: list, stops: dict) -> None:
  on_device = info["backend"] != "cpu"
  mem_label = "peak device mem" if on_device else "peak RSS"
  rows = []
  for r in records:
    res = r.get("result") or {}
    comp = res.get("compile_s")
    cr = comp + res["first_run_s"] if comp is not None else None
    status = r["status"] + (f": {r['why']}" if r.get("why") else "")
    rows.append([LABEL[r["method"]], res.get("p", "–"), r["n"], r["n"] * args.num_classes,
                 r["batch_size"], common.fmt_s(comp), common.fmt_s(res.get("run_s")),
                 common.fmt_s(res.get("run_cpu_s")), common.fmt_s(cr), common.fmt_bytes(peak_bytes(r)),
                 common.fmt_bytes(res.get("baseline_device_bytes") if on_device
                                  else res.get("baseline_rss_bytes")),
                 common.fmt_bytes(res.get("estimated_bytes")), status])
  stop_rows = [[LABEL[m], stops.get(m, {}).get("last_ok", "–"),
                stops.get(m, {}).get("reason", "not stopped (n list exhausted)")]
               for m in METHODS if m in args.methods]
  # Extrapolation (labelled) to --target-n for the Fast-NTK method, and the full model's
  # predicted cost there (power law through its last two measured points).
  extra = []
  for m in METHODS:
    pts = [(r["n"], r["result"]["run_s"]) for r in records
           if r["method"] == m and r["status"] == "ok"]
    mem = [peak_bytes(r) for r in records if r["method"] == m and r["status"] == "ok"]
    comp = [r["result"]["compile_s"] for r in records if r["method"] == m and r["status"] == "ok"]
    if not pts:
      continue
    largest = max(q[0] for q in pts)
    if largest >= args.target_n:
      t = next(q[1] for q in pts if q[0] == largest)
      extra.append([LABEL[m], args.target_n, f"{common.fmt_s(t)} s run", "**measured**"])
      continue
    if m == "fast":
      ns_str = ", ".join(str(q[0]) for q in pts)
      cpu_pts = [(r["n"], r["result"]["run_cpu_s"]) for r in records
                 if r["method"] == m and r["status"] == "ok" and "run_cpu_s" in r["result"]]
      for label, series in (("wall", pts), ("CPU", cpu_pts)):
        if len(series) < 2:
          continue
        slope_ok = series[-1][1] > series[0][1]
        if slope_ok:
          pred, a, b = linear_fit(series, args.target_n)
          extra.append([LABEL[m], args.target_n,
                        f"≈ {common.fmt_s(pred)} {label} s run (+ ≈ {common.fmt_s(max(comp))} s "
                        "compile)",
                        f"**extrapolated**: least-squares t = {a:.1f} + {b:.3f}·n over the "
                        f"measured run {label} seconds at n = {ns_str} (Jacobian streaming is "
                        "linear in n, the p³ solve is a constant)"])
        else:
          extra.append([LABEL[m], args.target_n, "–",
                        f"run {label} seconds did not grow from n = {series[0][0]} to "
                        f"{series[-1][0]} ({series[0][1]:.1f} → {series[-1][1]:.1f} s): the "
                        "per-image cost is below the timing noise here; no fit"])
      t_last = pts[-1][1]
      extra.append([LABEL[m], args.target_n,
                    f"≤ ≈ {common.fmt_s(t_last * args.target_n / pts[-1][0])} s run",
                    f"**extrapolated upper bound**: run s at n = {pts[-1][0]} scaled ∝ n "
                    "(also scales the constant p³ solve)"])
      extra.append([LABEL[m], args.target_n, f"≈ {common.fmt_bytes(max(mem))} peak",
                    "**extrapolated**: primal memory ~ p² + batch·C·p does not grow with n; "
                    f"largest measured peak (n = {largest}) + "
                    f"{common.fmt_bytes(args.target_n * 3072 * 4)} of inputs"])
    else:
      if len(pts) >= 2:
        pred = power_law(pts, args.target_n)
        basis = (f"**extrapolated**: power law through the last two measured points "
                 f"(n = {pts[-2][0]}, {pts[-1][0]})")
      else:
        pred = pts[-1][1] * (args.target_n / pts[-1][0]) ** 2
        basis = "**extrapolated**: ∝ n² from the one measured point"
      extra.append([LABEL[m], args.target_n, f"≈ {pred:.3g} s run", basis])
      try:
        from fastntk_jax import unlearn  # pylint: disable=g-import-not-at-top
        from fastntk_jax.unlearn import plan as unlearn_plan  # pylint: disable=g-import-not-at-top
        pfull = next(r["result"]["p"] for r in records if r["method"] == m and r.get("result")
                     and "p" in r["result"])
        nf = max(1, round(args.forget_frac * args.target_n))
        est = unlearn_plan.estimate_costs(pfull, args.target_n - nf, nf, args.num_classes,
                                     batch_size=args.full_batch_size)["dual"].bytes
        extra.append([LABEL[m], args.target_n, f"≈ {common.fmt_bytes(est)} working memory",
                      "**model estimate** (`unlearn.plan.estimate_costs`, dual), not measured"])
      except Exception as e:  # pylint: disable=broad-except
        extra.append([LABEL[m], args.target_n, "–", f"estimate failed: {e!r}"])

  md = [f"# Scale: Fast-NTK vs full-model NTK on {args.model} ({info['backend']})", "",
        "Generated by `benchmarks/bench_scale.py`. Command:", "",
        f"    {' '.join(['python -m benchmarks.bench_scale'] + list(args.argv))}", "",
        "## Machine", "", common.machine_markdown(info), "",
        "## Setup", "",
        f"{args.model}, C = {args.num_classes}, random 32x32x3 inputs, forget set = "
        f"{args.forget_frac:.0%} (class 0), λ = {args.damping}, float32. Fast-NTK: BN "
        f"scale/bias + head trainable, solver primal, batch {args.fast_batch_size}. Full model: "
        f"every weight trainable, solver dual (kernel implementation: "
        f"{next((r['result'].get('kernel_impl') for r in records if r.get('result')), '?')}), "
        f"batch {args.full_batch_size}. Per-point budget: {args.budget_seconds:.0f} s wall "
        f"(whole child: start, model build, compile, run), memory "
        f"{args.memory_budget_gb:.1f} GiB; total budget {args.total_budget_seconds:.0f} s.", "",
        "Columns: *compile s* = trace+lower+compile of `jax.jit(ntk_forget)`; *run s* = "
        "steady-state run (the faster of two runs when the first took < 5 s, else the one "
        "run); *run CPU s* = its CPU time summed over threads; "
        f"*compile+run s* = a first call; *{mem_label}* = peak of the whole child process "
        "(" + ("device peak_bytes_in_use" if on_device else "ru_maxrss: runtime + model + data "
               "+ compile + run") + "); *baseline* = the same just before compiling; "
        "*estimate* = `estimate_costs` working memory of the solver.", "",
        "## Measured", "",
        common.markdown_table(["method", "p", "n", "n·C", "batch", "compile s", "run s",
                               "run CPU s", "compile+run s", mem_label, "baseline",
                               "estimate", "status"],
                              rows), "",
        "## Where each method stopped", "",
        common.markdown_table(["method", "largest n completed", "stopped because"], stop_rows),
        "", f"## At n = {args.target_n} (the paper's scale)", "",
        common.markdown_table(["method", "n", "value", "basis"], extra) if extra else
        "(no completed point to extrapolate from)", "",
        "Plot: `bench_scale.png`. Raw records: `bench_scale.json`.", ""]
  common.atomic_write(out_dir / "bench_scale.md", "\n".join(md))
  common.atomic_write(out_dir / "bench_scale.json",
                      json.dumps({"machine": info, "args": vars(args), "argv": args.argv,
                                  "records": records, "stops": stops}, indent=1, default=str))
  plot(out_dir / "bench_scale.png", info, args, records, mem_label)


def plot(path: Path, info: dict, args, records: list, mem_label: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
  colors = {"fast": "tab:blue", "full": "tab:red"}
  for m in METHODS:
    ok = [r for r in records if r["method"] == m and r["status"] == "ok"]
    if not ok:
      continue
    ns = [r["n"] for r in ok]
    axes[0].plot(ns, [r["result"]["run_s"] for r in ok], "o-", color=colors[m],
                 label=LABEL[m] + ": run")
    axes[0].plot(ns, [r["result"]["compile_s"] + r["result"]["first_run_s"] for r in ok], "s:",
                 color=colors[m], alpha=0.6, label=LABEL[m] + ": compile+run")
    axes[1].plot(ns, [(peak_bytes(r) or 0) / 2**30 for r in ok], "o-", color=colors[m],
                 label=LABEL[m])
    if m == "fast" and max(ns) < args.target_n:
      pts = [(r["n"], r["result"]["run_s"]) for r in ok]
      slope_ok = len(pts) >= 2 and pts[-1][1] > pts[0][1]
      pred = (linear_fit(pts, args.target_n)[0] if slope_ok
              else pts[-1][1] * args.target_n / pts[-1][0])
      axes[0].plot([ns[-1], args.target_n], [pts[-1][1], pred], "--", color=colors[m])
      axes[0].plot([args.target_n], [pred], "o", mfc="none", color=colors[m],
                   label=f"Fast-NTK n={args.target_n}: EXTRAPOLATED"
                         + ("" if slope_ok else " upper bound (∝ n)"))
    failed = [r for r in records if r["method"] == m and r["status"] not in ("ok", "skipped",
                                                                             "predicted")]
    for r in failed:
      axes[0].axvline(r["n"], color=colors[m], ls=":", alpha=0.5)
      axes[0].annotate(f"{m} stopped: {r['status']}", (r["n"], axes[0].get_ylim()[1]),
                       rotation=90, fontsize=7, va="top", color=colors[m])
  for ax, ylabel, title in ((axes[0], "seconds", "update time vs n"),
                            (axes[1], "GiB", mem_label + " (whole process) vs n")):
    ax.set_xscale("log")
    ticks = sorted({r["n"] for r in records} | ({args.target_n} if ax is axes[0] else set()))
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if ax is axes[0]:
      ax.set_yscale("log")
      ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    else:
      ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.15)
    ax.set_xlabel("n (images, retain + forget)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
  fig.suptitle(f"{args.model}: Fast-NTK vs full-model NTK, {info['device']}, jax {info['jax']}, "
               f"{info['date_utc']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def default_n_lists(max_n: int, target_n: int) -> dict:
  fast = [n for n in (16, 64, 256, 1024, 2048) if n <= max_n]
  if target_n <= max_n and target_n not in fast:
    fast.append(target_n)
  elif max_n not in fast and max_n < target_n:
    fast.append(max_n)
  full, n = [], 16
  while n <= max_n:
    full.append(n)
    n *= 2
  return {"fast": sorted(set(fast)), "full": full}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--model", default="resnet110")
  ap.add_argument("--methods", default="fast,full")
  ap.add_argument("--max-n", type=int, default=32,
                  help="largest n tried (fast: 16, 64, 256, 1024, 2048, then --target-n; full: "
                       "16, 32, 64, ... doubling)")
  ap.add_argument("--target-n", type=int, default=5000,
                  help="the paper's scale: measured if <= --max-n, else extrapolated (labelled)")
  ap.add_argument("--fast-n", default=None, help="explicit comma list (overrides --max-n)")
  ap.add_argument("--full-n", default=None, help="explicit comma list (overrides --max-n)")
  ap.add_argument("--budget-seconds", type=float, default=330.0,
                  help="per point: wall-clock limit of the whole child process")
  ap.add_argument("--memory-budget-gb", type=float, default=None,
                  help="per point (default: 60%% of host RAM on CPU, 80%% of device memory)")
  ap.add_argument("--total-budget-seconds", type=float, default=660.0,
                  help="no new point starts once this much wall time is spent")
  ap.add_argument("--order", choices=("interleave", "fast-first"), default="interleave",
                  help="interleave: by n, fast before full; fast-first: every Fast-NTK point, "
                       "then the full model (so the paper-scale Fast-NTK point runs first)")
  ap.add_argument("--fast-batch-size", type=int, default=64)
  ap.add_argument("--full-batch-size", type=int, default=16)
  ap.add_argument("--num-classes", type=int, default=10)
  ap.add_argument("--forget-frac", type=float, default=0.1)
  ap.add_argument("--damping", type=float, default=1e-2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--render-only", action="store_true",
                  help="rewrite the .md/.png from <out>/bench_scale.json without running")
  args = ap.parse_args(argv)
  if args.render_only:
    saved = json.loads((Path(args.out) / "bench_scale.json").read_text())
    sargs = argparse.Namespace(**saved["args"])
    sargs.argv = saved.get("argv", ["--out", args.out])
    write_outputs(Path(args.out), saved["machine"], sargs, saved["records"], saved["stops"])
    print((Path(args.out) / "bench_scale.md").read_text())
    return 0
  args.argv = list(sys.argv[1:] if argv is None else argv)
  args.methods = [m for m in args.methods.split(",") if m]
  common.install_sigterm_handler()
  out_dir = Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  info = common.machine_info()
  print(json.dumps(info, indent=1), flush=True)
  import jax  # pylint: disable=g-import-not-at-top
  import psutil  # pylint: disable=g-import-not-at-top
  on_cpu = jax.default_backend() == "cpu"
  if args.memory_budget_gb is None:
    if on_cpu:
      args.memory_budget_gb = 0.6 * psutil.virtual_memory().total / common.GiB
    else:
      stats = jax.devices()[0].memory_stats() or {}
      args.memory_budget_gb = 0.8 * stats.get("bytes_limit", 16 * common.GiB) / common.GiB
  mem_limit = int(args.memory_budget_gb * common.GiB)
  lists = default_n_lists(args.max_n, args.target_n)
  if args.fast_n:
    lists["fast"] = [int(v) for v in args.fast_n.split(",")]
  if args.full_n:
    lists["full"] = [int(v) for v in args.full_n.split(",")]
  if args.order == "fast-first":
    plan = [(n, m) for m in METHODS if m in args.methods for n in sorted(lists[m])]
  else:
    plan = sorted([(n, m) for m in args.methods for n in lists[m]],
                  key=lambda q: (q[0], METHODS.index(q[1])))
  records, stops = [], {}
  start = time.perf_counter()
  for n, m in plan:
    if m in stops:
      continue
    rec = {"method": m, "n": n, "batch_size": args.fast_batch_size if m == "fast"
           else args.full_batch_size}
    left = args.total_budget_seconds - (time.perf_counter() - start)
    done = [(r["n"], r["wall_s"]) for r in records if r["method"] == m and r["status"] == "ok"]
    if left < 30:
      stops[m] = {"last_ok": done[-1][0] if done else "–",
                  "reason": f"total budget ({args.total_budget_seconds:.0f} s) spent before n = {n}"}
      continue
    if len(done) >= 2:
      pred = power_law(done, n)
      if pred > 2 * args.budget_seconds:
        rec.update(status="predicted", why=f"predicted ≈ {pred:.0f} s wall (power law from "
                                           f"n = {done[-2][0]}, {done[-1][0]}) > 2x budget")
        records.append(rec)
        stops[m] = {"last_ok": done[-1][0], "reason": f"n = {n} not run: " + rec["why"]}
        write_outputs(out_dir, info, args, records, stops)
        continue
    cfg = {"method": m, "model": args.model, "n": n,
           "n_forget": max(1, round(args.forget_frac * n)),
           "solver": "primal" if m == "fast" else "dual", "batch_size": rec["batch_size"],
           "num_classes": args.num_classes, "damping": args.damping, "seed": args.seed,
           "memory_limit_bytes": mem_limit}
    limit = min(args.budget_seconds, left)
    print(f"[bench_scale] {m} n={n} (limit {limit:.0f} s, memory {args.memory_budget_gb:.1f} "
          "GiB)...", flush=True)
    r = common.run_child(MODULE, cfg, timeout_s=limit,
                         memory_limit_bytes=mem_limit if on_cpu else None)
    rec.update(status=r["status"], result=r["result"], peak_rss_bytes=r["peak_rss_bytes"],
               wall_s=r["wall_s"])
    if r["status"] == "timeout":
      rec["why"] = (f"> {limit:.0f} s" + (" (total budget)" if limit < args.budget_seconds
                                          else " (per-point budget)"))
    elif r["status"] == "memory":
      rec["why"] = f"RSS > {args.memory_budget_gb:.1f} GiB"
    elif r["status"] == "refused":
      rec["why"] = (r["result"] or {}).get("message", "")[:300]
    elif r["status"] != "ok":
      rec["why"] = r["log_tail"].splitlines()[-1][:300] if r["log_tail"] else ""
      print(r["log_tail"], flush=True)
    res = r["result"] or {}
    print(f"  -> {r['status']} wall {r['wall_s']:.1f} s, compile {res.get('compile_s')}, "
          f"run {res.get('run_s')}, peak {common.fmt_bytes(peak_bytes(rec))}", flush=True)
    records.append(rec)
    if r["status"] != "ok":
      stops[m] = {"last_ok": done[-1][0] if done else "–",
                  "reason": f"n = {n}: {r['status']}" + (f" ({rec['why']})" if rec.get("why")
                                                          else "")}
    write_outputs(out_dir, info, args, records, stops)
  for m in args.methods:
    if m not in stops:
      ok = [r["n"] for r in records if r["method"] == m and r["status"] == "ok"]
      stops[m] = {"last_ok": ok[-1] if ok else "–",
                  "reason": f"not stopped: every n in {lists[m]} ran (raise --max-n to go further)"}
  write_outputs(out_dir, info, args, records, stops)
  print((out_dir / "bench_scale.md").read_text())
  print(f"[bench_scale] total wall {time.perf_counter() - start:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  if "--worker" in sys.argv:
    common.worker_main(sys.argv[1:], worker)
  else:
    sys.exit(main())
