"""ViT-S/16 prompts at the paper's 20 classes x 50 images (1,000 images, 224x224) on this CPU:
the Fast-NTK update as the pipeline runs it, its memory and its time.

    JAX_ENABLE_X64=1 python -m benchmarks.bench_vit_memory --out benchmarks/results/vit_memory

The network is `configs/vit_small_imagenet_r.py:classes=20,ipc=50` (K/V prompts of length 4
in every block + a 20-class head: p = 44,564), randomly initialised (the AugReg weights cannot
be downloaded here; the cost does not depend on their values), on random 224x224 inputs, one
class of 50 images forgotten, the fine-tuned parameters w0 plus noise. The update is
`unlearn.ntk_forget_with_diagnostics` with the config's `unlearn` options (solver auto,
float64 solve, blocks of 32), the pipeline's path. Recorded: the plan (solver, whether the
dual keeps the Jacobian rows, predicted bytes), the run and compile seconds, κ, whether the
update is finite, the process's peak RSS (ru_maxrss) and its RSS sampled every second.

Writes vit_memory.{json,md} and vit_memory_rss.png into --out (the JSON rewritten as phases
finish; `--replot` redraws the table and the plot from it).
"""

import argparse
import json
import resource
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jax.flatten_util import ravel_pytree

from fastntk_jax import config as config_lib
from fastntk_jax import ntk
from fastntk_jax import unlearn
from fastntk_jax.models import get_model, make_apply_fn, split


def _rss_sampler(samples: list, stop: threading.Event, start: float) -> None:
  while not stop.wait(1.0):
    samples.append((round(time.perf_counter() - start, 1), common.current_rss()))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--classes", type=int, default=20)
  ap.add_argument("--ipc", type=int, default=50, help="images per class")
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--batch-size", type=int, default=None,
                  help="rows per Jacobian block (default: the config's unlearn.batch_size)")
  ap.add_argument("--solve-dtype", choices=("float32", "float64"), default=None,
                  help="default: the config's unlearn.solve_dtype (float64 needs x64)")
  ap.add_argument("--damping", type=float, default=None,
                  help="λ (default: the config's unlearn.damping). On random weights Θ's "
                  "spectrum is wide: with the config's λ the update is refused for precision "
                  "(κ·ε32 > 1) at these sizes; the cost does not depend on λ")
  ap.add_argument("--replot", action="store_true",
                  help="only rewrite vit_memory.md and vit_memory_rss.png from --out's JSON")
  args = ap.parse_args(argv)
  out = Path(args.out)
  if args.replot:
    record = json.loads((out / "vit_memory.json").read_text())
    write_markdown(record, out)
    write_plot(record, out)
    return
  out.mkdir(parents=True, exist_ok=True)
  record = {"machine": common.machine_info(), "command": "python -m benchmarks.bench_vit_memory "
            + " ".join(argv if argv is not None else __import__("sys").argv[1:])}

  def save():
    common.atomic_write(out / "vit_memory.json", json.dumps(record, indent=1, default=str))

  cfg = config_lib.load_config_file(str(
      common.REPO_ROOT / "configs" / f"vit_small_imagenet_r.py:classes={args.classes},"
      f"ipc={args.ipc}"))
  c, n = args.classes, args.classes * args.ipc
  model = get_model(cfg.model.name, c, **dict(cfg.model.options))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, args.image_size,
                                                             args.image_size, 3)))
  w0, frozen = split(variables)
  apply_fn = make_apply_fn(model, frozen)
  params = common.perturb(w0, 1e-2, 1)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, args.image_size, args.image_size, 3)).astype(np.float32)
  y = np.repeat(np.arange(c, dtype=np.int32), args.ipc)
  forget_mask = y == 0
  retain = (jnp.asarray(x[~forget_mask]), jnp.asarray(y[~forget_mask]))
  forget = (jnp.asarray(x[forget_mask]), jnp.asarray(y[forget_mask]))
  u = cfg.unlearn
  damping = u.damping if args.damping is None else args.damping
  options = dict(num_classes=c, damping=float(damping), solver=u.solver,
                 batch_size=int(args.batch_size or u.batch_size), kernel_impl=u.kernel_impl,
                 solve_dtype=(jnp.float64 if (args.solve_dtype or u.solve_dtype) == "float64"
                              else None))
  record["setup"] = {"model": cfg.model.name, "model_options": dict(cfg.model.options),
                     "image_size": args.image_size, "n": n, "n_forget": int(forget_mask.sum()),
                     "num_classes": c, "num_params": ntk.num_params(w0),
                     "options": {k: str(v) for k, v in options.items()},
                     "x64": bool(jax.config.jax_enable_x64),
                     "rss_before_update_bytes": common.current_rss()}
  plan = unlearn.make_forgetter(apply_fn, **options).plan(w0, params, retain, forget,
                                                          traced=True)
  record["plan"] = {"solver": plan.solver.value, "reason": plan.reason,
                    "keep_jacobian_rows": plan.keep_jacobian_rows,
                    "kernel": plan.kernel.value if plan.kernel else None,
                    "predicted_bytes": {k: v.bytes for k, v in plan.costs.items()},
                    "predicted_flops": {k: v.flops for k, v in plan.costs.items()}}
  save()
  print(f"plan: {plan.solver.value}, keep rows {plan.keep_jacobian_rows}; {plan.reason}",
        flush=True)
  samples, stop = [], threading.Event()
  start = time.perf_counter()
  sampler = threading.Thread(target=_rss_sampler, args=(samples, stop, start), daemon=True)
  sampler.start()
  cpu0 = time.process_time()
  try:
    new, diag = unlearn.ntk_forget_with_diagnostics(apply_fn, w0, params, retain=retain,
                                                    forget=forget, **options)
    delta = np.asarray(ravel_pytree(new)[0] - ravel_pytree(params)[0])
    record["update"] = {**diag.as_dict(), "finite": bool(np.all(np.isfinite(delta))),
                        "status": "ok"}
  except Exception as e:  # pylint: disable=broad-except  # recorded, then re-raised
    record["update"] = {"status": f"failed: {type(e).__name__}: {e}"}
    raise
  finally:
    stop.set()
    sampler.join()
    record["update_wall_s"] = time.perf_counter() - start
    record["update_cpu_s"] = time.process_time() - cpu0
    record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record["rss_samples"] = samples
    save()
    write_markdown(record, out)
    write_plot(record, out)
  print(json.dumps({k: record[k] for k in ("update_wall_s", "peak_rss_bytes")}), flush=True)


def write_markdown(record: dict, out: Path) -> None:
  s, p, upd = record["setup"], record.get("plan", {}), record.get("update", {})
  gib = lambda b: f"{b / 2**30:.2f} GiB" if b is not None else "-"
  rows = [
      ["network", f"{s['model']} {s['model_options']}, {s['image_size']}², random weights"],
      ["images (forgotten)", f"{s['n']} ({s['n_forget']})"],
      ["p (prompts + head)", f"{s['num_params']:,}"],
      ["n·C", f"{s['n'] * s['num_classes']:,}"],
      ["λ (damping)", s["options"].get("damping")],
      ["solver (plan)", f"{p.get('solver')}, Jacobian rows kept: {p.get('keep_jacobian_rows')}"],
      ["predicted working set", gib(p.get("predicted_bytes", {}).get(p.get("solver")))],
      ["status", upd.get("status")],
      ["finite", upd.get("finite")],
      ["condition number (Θ_rr+λI)", common.fmt_g(upd.get("condition_number"))],
      ["precision warning", upd.get("precision_warning") or "none"],
      ["update run s (compile apart)", common.fmt_s(upd.get("seconds"))],
      ["compile s", common.fmt_s(upd.get("compile_seconds"))],
      ["wall s / CPU s of the whole call", f"{record.get('update_wall_s', 0):.0f} / "
                                            f"{record.get('update_cpu_s', 0):.0f}"],
      ["RSS before the update", gib(s.get("rss_before_update_bytes"))],
      ["peak RSS of the process", gib(record.get("peak_rss_bytes"))],
  ]
  text = ["# ViT-S/16 prompts, Fast-NTK update memory on this machine", "",
          f"Command: `{record['command']}`", "", common.machine_markdown(record["machine"]), "",
          common.markdown_table(["what", "value"], rows), "",
          f"Plan's reason: {p.get('reason')}", ""]
  common.atomic_write(out / "vit_memory.md", "\n".join(text))


def write_plot(record: dict, out: Path) -> None:
  """The process's RSS during the update (sampled every second) against the host's memory
  and the plan's predicted working set on top of the RSS before the update."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  samples = record.get("rss_samples") or []
  if not samples:
    return
  t, rss = zip(*samples)
  gib = 2.0 ** 30
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.plot([v / 60 for v in t], [b / gib for b in rss], label="process RSS")
  ax.axhline(record["machine"]["host_memory_gib"], color="k", ls=":", label="host memory")
  plan, setup = record.get("plan", {}), record["setup"]
  predicted = plan.get("predicted_bytes", {}).get(plan.get("solver"))
  if predicted:
    ax.axhline((setup["rss_before_update_bytes"] + predicted) / gib, color="C1", ls="--",
               label="RSS before + predicted working set")
  ax.set_xlabel("minutes into the update")
  ax.set_ylabel("GiB")
  ax.set_ylim(bottom=0)
  ax.set_title(f"{setup['model']} prompts, {setup['n']} images at {setup['image_size']}², "
               f"{plan.get('solver')} solver")
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "vit_memory_rss.png", dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
