"""A stream of forget requests: incremental (fastntk_jax.unlearn.stream) vs from scratch (ntk_forget).

    python -m benchmarks.bench_stream --out benchmarks/results          # < 3 min on 2 shared CPUs
    python benchmarks/bench_stream.py --n 600 --requests 5 --frac 0.01

Setup: a real Flax ResNet-8 (option-B shortcuts) from `fastntk_jax.models`, trainable = BN
scale/bias + head (p = 1,322 for C = 10), random frozen conv weights, BN statistics set to the
batch statistics of random inputs; D = n random 16x16x3 inputs with random labels in [0, C);
params_init = the initial trainable collection, params = params_init + N(0, 0.05²) noise (a
stand-in for the fine-tuned w_D: the update's cost does not depend on its value).
Requests: k disjoint random subsets of D, each `frac`·n samples.

Measured (wall clock, `jax.block_until_ready`):
  * stream init: `init_forget_state` (Jacobians of D cached, G = JᵀJ, Cholesky of G + λI),
    compile and run timed separately;
  * stream request i: the first `forget_request` call (compiles at the first request of a
    padded size), then the steady-state time of the same jitted call repeated on the same
    inputs (pure function: same state in, same result) -- min and median of `--repeats`;
    once with `factor_update="downdate"` and once with "refactor";
  * from scratch: `jax.jit(unlearn.ntk_forget)` (solver "primal", the same λ, batch size and
    solve dtype) on retain = D minus the cumulative union, forget = the union, compile and
    run timed separately (the retain size changes with every request, so each recompiles);
  * agreement: ‖θ_stream,i − θ_scratch,i‖ / ‖θ_scratch,i − θ_D‖ after each request.

The solve runs in float64 (`solve_dtype`, x64 enabled; params, inputs and Jacobians stay
float32) so that the agreement column measures the algorithms, not float32 round-off.
Writes <out>/stream.md, stream.png and stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # pylint: disable=g-import-not-at-top


def _fmt(seconds) -> str:
  if seconds is None:
    return "–"
  if seconds >= 10:
    return f"{seconds:.1f} s"
  if seconds >= 0.1:
    return f"{seconds:.2f} s"
  return f"{seconds * 1e3:.0f} ms"


def build(cfg):
  """ResNet-8 (shortcut B) on 16x16 inputs with calibrated BN statistics; data; requests."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from fastntk_jax.models import get_model, make_apply_fn, make_train_apply_fn, split

  c, n, s = cfg["num_classes"], cfg["n"], cfg["seed"]
  rng = np.random.default_rng(s)
  x = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
  y = rng.integers(0, c, size=n).astype(np.int32)
  model = get_model("resnet8", c, shortcut="B")
  variables = model.init(jax.random.PRNGKey(s), jnp.zeros((1, 16, 16, 3), jnp.float32))
  trainable, frozen = split(variables)
  # Freshly initialised BN statistics (0, 1) are not those of any data; use the batch
  # statistics of random inputs (one training-mode pass: new = m·old + (1-m)·batch).
  calib = jnp.asarray(rng.normal(size=(128, 16, 16, 3)).astype(np.float32))
  _, new_stats = jax.jit(make_train_apply_fn(model, frozen))(trainable, calib)
  m = 0.9  # fastntk_jax.models.layers.BatchNorm.momentum
  stats = jax.tree_util.tree_map(lambda a, b: (a - m * b) / (1 - m), new_stats,
                                 frozen["batch_stats"])
  apply_fn = make_apply_fn(model, {**frozen, "batch_stats": stats})
  params_full = common.perturb(trainable, 0.05, s + 1)
  k = max(1, int(round(cfg["frac"] * n)))
  perm = rng.permutation(n)
  requests = [np.sort(perm[i * k:(i + 1) * k]) for i in range(cfg["requests"])]
  return apply_fn, trainable, params_full, x, y, requests


def run(cfg: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.flatten_util import ravel_pytree  # pylint: disable=g-import-not-at-top
  from fastntk_jax import ntk, stream, unlearn  # pylint: disable=g-import-not-at-top

  t_start = time.perf_counter()
  apply_fn, w0, w_full, x, y, requests = build(cfg)
  n, c, lam, bs = cfg["n"], cfg["num_classes"], cfg["damping"], cfg["batch_size"]
  sdtype = jnp.float64
  p = ntk.num_params(w0)
  flat = lambda t: np.asarray(ravel_pytree(t)[0], np.float64)
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  out = {"config": cfg, "p": p, "n": n, "num_classes": c, "request_size": len(requests[0]),
         "load_average_start": os.getloadavg()}

  # --- stream: init (compile and run timed separately).
  init = lambda: jax.block_until_ready(stream.init_forget_state(
      apply_fn, w0, train=(xj, yj), num_classes=c, damping=lam, batch_size=bs,
      solve_dtype=sdtype, cache_jacobian=True, factor_update="downdate"))
  t0 = time.perf_counter()
  init()  # compiles and runs
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  state0 = init()  # runs the cached executable
  init_run = time.perf_counter() - t0
  init_compile = max(first - init_run, 0.0)
  out["init"] = {"compile_s": init_compile, "run_s": init_run}
  print(f"init: compile {init_compile:.1f}s run {init_run:.1f}s", flush=True)

  # --- stream: requests, per factor-update mode.
  out["stream"] = {}
  serve = jax.jit(stream.serve_request)
  stream_params = {}
  for mode in ("downdate", "refactor"):
    state, params, rows = state0.replace(factor_update=mode), w_full, []
    for i, req in enumerate(requests):
      t0 = time.perf_counter()
      new_params, new_state = jax.block_until_ready(stream.forget_request(state, params, req))
      first = time.perf_counter() - t0
      size = min(stream.request_bucket(len(req)), n)
      idx = np.full(size, req[0], np.int32)
      idx[:len(req)] = req
      mask = jnp.asarray(np.arange(size) < len(req))
      times = []
      for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        jax.block_until_ready(serve(state, params, jnp.asarray(idx), mask))
        times.append(time.perf_counter() - t0)
      rows.append({"first_call_s": first, "steady_min_s": min(times),
                   "steady_median_s": statistics.median(times),
                   "update": int(new_state.last_update),
                   "pivot_ratio": float(new_state.last_pivot_ratio)})
      print(f"stream[{mode}] request {i + 1}: first {first:.2f}s steady {min(times):.3f}s",
            flush=True)
      state, params = new_state, new_params
      if mode == "downdate":
        stream_params[i] = flat(params)
    out["stream"][mode] = rows
  out["padded_size"] = size
  out["auto_choice"] = ("downdate" if stream.downdate_flops(p, size * c)
                        < stream.refactor_flops(p) else "refactor")

  # --- from scratch: ntk_forget on the cumulative union.
  scratch = []
  base = flat(w_full)
  forget_fn = lambda w0_, w_, xr, yr, xf, yf: unlearn.ntk_forget(
      apply_fn, w0_, w_, retain=(xr, yr), forget=(xf, yf), num_classes=c, damping=lam,
      solver="primal", batch_size=bs, solve_dtype=sdtype)
  for i in range(len(requests)):
    union = np.concatenate(requests[:i + 1])
    keep = np.setdiff1d(np.arange(n), union)
    args = (w0, w_full, xj[keep], yj[keep], xj[union], yj[union])
    t0 = time.perf_counter()
    compiled = jax.jit(forget_fn).lower(*args).compile()
    comp = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = flat(jax.block_until_ready(compiled(*args)))
    run_s = time.perf_counter() - t0
    rel = float(np.linalg.norm(stream_params[i] - res) / np.linalg.norm(res - base))
    scratch.append({"compile_s": comp, "run_s": run_s, "rel_diff": rel,
                    "num_forgotten": int(union.size)})
    print(f"scratch request {i + 1}: compile {comp:.1f}s run {run_s:.1f}s rel {rel:.1e}",
          flush=True)
  out["scratch"] = scratch
  out["load_average_end"] = os.getloadavg()
  out["total_s"] = time.perf_counter() - t_start
  return out


def write_report(res: dict, info: dict, outdir: Path, argv: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  k = len(res["scratch"])
  init = res["init"]
  dd, rf, sc = res["stream"]["downdate"], res["stream"]["refactor"], res["scratch"]
  init_total = init["compile_s"] + init["run_s"]
  load = lambda triple: " ".join(f"{v:.2f}" for v in triple)
  first_req = init["run_s"] + dd[0]["steady_min_s"]  # request 1 = init + the request
  rows = [["init", 0, _fmt(init_total), _fmt(init["run_s"]), _fmt(init["run_s"]), "–", "–",
           "–", "–", "–", "–"]]
  for i in range(k):
    rows.append([
        i + 1, sc[i]["num_forgotten"], _fmt(dd[i]["first_call_s"]),
        _fmt(dd[i]["steady_min_s"]), _fmt(rf[i]["steady_min_s"]),
        f"{dd[i]['pivot_ratio']:.3f}", _fmt(sc[i]["compile_s"]), _fmt(sc[i]["run_s"]),
        f"{100 * (dd[i]['steady_min_s'] + (init['run_s'] if i == 0 else 0)) / sc[i]['run_s']:.1f}%",
        "100% (incl. init)" if i == 0 else f"{100 * dd[i]['steady_min_s'] / first_req:.1f}%",
        f"{sc[i]['rel_diff']:.1e}"])
  later = [dd[i]["steady_min_s"] for i in range(1, k)]
  summary = (
      f"Request 1 (init + request, steady state) took {_fmt(first_req)}; requests 2..{k} "
      f"took {_fmt(min(later))}–{_fmt(max(later))} each, i.e. "
      f"{100 * max(later) / first_req:.1f}% of request 1 at most "
      f"({100 * statistics.median(later) / first_req:.1f}% median). From scratch, each "
      f"request costs {_fmt(min(s['run_s'] for s in sc))}–{_fmt(max(s['run_s'] for s in sc))} "
      f"of run time plus {_fmt(min(s['compile_s'] for s in sc))}–"
      f"{_fmt(max(s['compile_s'] for s in sc))} of compilation (the retain set changes size).")
  headers = ["request", "forgotten so far", "stream: first call (incl. compile)",
             "stream: steady, downdate", "stream: steady, refactor", "min pivot ratio",
             "scratch: compile", "scratch: run", "stream steady / scratch run",
             "stream steady / request 1 (init + request)", "‖θ_stream − θ_scratch‖/‖Δ‖"]
  md = [
      "# Stream of forget requests: incremental vs from scratch "
      f"({info.get('backend', '?')})", "",
      "Generated by `benchmarks/bench_stream.py`. Command:", "", f"    {argv}", "",
      "## Machine", "", common.machine_markdown(info), "",
      f"Load average at start / end of the run: {load(res['load_average_start'])} / "
      f"{load(res['load_average_end'])} (the {info.get('cpu_cores_usable', '?')} cores may be "
      "shared with other work: short timings are the minimum of "
      f"{res['config']['repeats']} repeats).", "",
      "## Setup", "",
      f"ResNet-8 with option-B shortcuts (`get_model('resnet8', {res['num_classes']}, "
      f"shortcut='B')`), trainable = BN scale/bias + head, p = {res['p']:,}; D = "
      f"{res['n']} random 16x16x3 inputs, C = {res['num_classes']}; {k} requests of "
      f"{res['request_size']} samples each ({100 * res['config']['frac']:.0f}% of D, disjoint, "
      f"random); λ = {res['config']['damping']}; batch_size = {res['config']['batch_size']}; "
      "params/inputs/Jacobians float32, solve (G, factor, solution) float64. Stream: "
      "`stream.init_forget_state` (Jacobians of D cached: "
      f"{res['n'] * res['num_classes'] * res['p'] * 4 / 2**20:.0f} MiB) then "
      "`stream.forget_request` per request; scratch: `jax.jit(unlearn.ntk_forget)` with "
      "solver='primal' on D minus the cumulative union.", "",
      "Rows: *init* = `init_forget_state` (first call = compile + run, steady = run); "
      "1..k = the requests. Columns: *stream: first call* = the first `forget_request` call "
      "(it compiles only at the first request of a padded size); *stream: steady* = the same "
      "jitted call repeated on the same inputs, with the factor downdated (rank C·"
      f"{res['padded_size']} = {res['num_classes'] * res['padded_size']}: "
      f"{res['request_size']} samples padded to {res['padded_size']}) or refactorised; "
      "*min pivot ratio* = smallest (L'_kk/L_kk)² of the downdate (1 = nothing "
      "removed); *scratch: compile / run* = `ntk_forget` compiled and run once; *stream "
      "steady / scratch run* counts init in request 1; *stream steady / request 1* = the "
      "request's steady time (downdate) over request 1's (init run + request); the last "
      "column compares the streamed params after request i with the from-scratch params for "
      "the union of requests 1..i, relative to the size of the update.", "",
      "## Result", "",
      common.markdown_table(headers, rows), "",
      summary, "",
      f"Stream init alone: compile {_fmt(init['compile_s'])}, run {_fmt(init['run_s'])}. "
      f"`factor_update='auto'` would choose **{res['auto_choice']}** at this p and rank "
      "(FLOP estimate); both give the same parameters (tests/test_stream.py).", "",
      "Why later requests are cheap: the Gram matrix of D, its Cholesky factor and the "
      "Jacobian rows are reused; a request costs a gather of its cached Jacobian rows, a "
      f"rank-{res['num_classes'] * res['padded_size']} update of G and b, the factor update "
      "and two triangular solves, "
      "O(m·p² + p²), against O(n·C·p² + p³) plus n·C backward passes from scratch.", "",
      "![stream](stream.png)", ""]
  common.atomic_write(outdir / "stream.md", "\n".join(md))
  common.atomic_write(outdir / "stream.json", json.dumps({"machine": info, **res}, indent=1,
                                                        default=str))

  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  xs = list(range(1, k + 1))
  w = 0.27
  stream_steady = [dd[i]["steady_min_s"] + (init["run_s"] if i == 0 else 0) for i in range(k)]
  ax.bar([v - w for v in xs], stream_steady, w, label="stream, downdate (req. 1 incl. init)")
  ax.bar(xs, [rf[i]["steady_min_s"] + (init["run_s"] if i == 0 else 0) for i in range(k)], w,
         label="stream, refactor (req. 1 incl. init)")
  ax.bar([v + w for v in xs], [s["run_s"] for s in sc], w, label="from scratch: run")
  ax.bar([v + w for v in xs], [s["compile_s"] for s in sc], w,
         bottom=[s["run_s"] for s in sc], label="from scratch: compile", alpha=0.5)
  ax.set_yscale("log")
  ax.set_xlabel(f"request ({res['request_size']} samples = "
                f"{100 * res['config']['frac']:.0f}% of D each)")
  ax.set_ylabel("seconds (steady state; log scale)")
  ax.set_xticks(xs)
  ax.set_title(f"Forget-request stream, ResNet-8 (p={res['p']:,}, n={res['n']}, "
               f"C={res['num_classes']}), {info.get('cpu_cores_usable', '?')} CPU cores")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(outdir / "stream.png", dpi=120)
  plt.close(fig)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--n", type=int, default=600)
  ap.add_argument("--num-classes", type=int, default=10)
  ap.add_argument("--requests", type=int, default=4)
  ap.add_argument("--frac", type=float, default=0.01, help="request size as a fraction of n")
  ap.add_argument("--damping", type=float, default=1e-2)
  ap.add_argument("--batch-size", type=int, default=100)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  cfg = {"n": a.n, "num_classes": a.num_classes, "requests": a.requests, "frac": a.frac,
         "damping": a.damping, "batch_size": a.batch_size, "repeats": a.repeats,
         "seed": a.seed}
  if a.requests < 2:
    ap.error("--requests must be >= 2 (the point is the cost of the later ones)")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_x64", True)  # before any array exists (see run())
  info = common.machine_info()  # load average at the start of the run
  res = run(cfg)
  argv_s = "python -m benchmarks.bench_stream " + " ".join(sys.argv[1:] if argv is None
                                                            else argv)
  write_report(res, info, Path(a.out), argv_s.strip())
  print(f"total {res['total_s']:.0f}s; wrote {a.out}/stream.md, stream.png, stream.json")


if __name__ == "__main__":
  main()
