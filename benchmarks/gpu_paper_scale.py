"""The paper's scale on one accelerator: ResNet-110 and ViT-B/16 prompts at 5,000 images,
each against Retrain on the same device. Prepared for a lent GPU (`gpu_paper_scale.sh`
runs it there); `--quick` shrinks every size so it runs on a CPU (tests/test_benchmarks.py).

    JAX_ENABLE_X64=1 python -m benchmarks.gpu_paper_scale --out OUT [--models resnet110,vit_b16]

Per model, random inputs (the cost does not depend on pixel values), 10% forgotten (one
class), the served parameters w0 plus noise:

* resnet110 (BN scale/bias + head, p = 8,746, 32x32, C = 10): the update with the primal and
  the dual solver, float64 solves: both finite, their relative difference, times (compile
  apart), peak device memory;
* vit_b16 (K/V prompts + head, p = 89,108 at C = 20, 224x224): the primal solver in float32
  (its Gram is 32 GB; float64 would be 63 GB twice over), finite, its condition number and
  precision warning, times, peak memory;
* Retrain for each: fine-tuning the trainable collection on D_r from w0 with the paper's
  protocol (`configs/resnet110_cifar10.py` / `configs/vit_base_imagenet_r.py`:
  `finetune`), `--retrain-epochs` of it (default: all), timed per epoch; the ratio
  update / Retrain is of the measured times, with the epochs run stated.

With `--linearized`, ResNet-110 also in linearised mode (`run_linearized`): Full, Retrain
and Fast-NTK in closed form from one Gram pass, and Fast-NTK's distance to Retrain.

Writes gpu_paper_scale.{json,md}, rewritten after every phase.
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from fastntk_jax import config as config_lib
from fastntk_jax import train
from fastntk_jax.models import get_model, make_apply_fn, split

MODELS = {  # name: (config file, image size, classes, solvers, solve dtype)
    "resnet110": ("resnet110_cifar10.py", 32, 10, ("primal", "dual"), "float64"),
    "vit_b16": ("vit_base_imagenet_r.py", 224, 20, ("primal",), "float32"),
}
QUICK = {"resnet110": ("resnet8", 32), "vit_b16": ("vit_ti16", 32)}


def _peak_device_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _network(name: str, image_size: int, classes: int):
  """(model, w0, frozen); ResNets get calibrated BatchNorm statistics (common.build_resnet)."""
  if name.startswith("resnet"):
    calib, _ = common.random_data(128, classes, 1000, 0)
    return common.build_resnet(name, classes, None, 0, calib)
  model = get_model(name, classes)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)))
  w0, frozen = split(variables)
  return model, w0, frozen


def _workload(key: str, args, record: dict):
  """(config, record entry, model, w0, frozen, x, y, n_forget) of model `key`: n random
  inputs, the first 10% of class 0 (forgotten), the rest of the other classes."""
  cfg_file, size, classes, _, _ = MODELS[key]
  name, n = key, args.n
  if args.quick:
    name, size = QUICK[key]
  cfg = config_lib.load_config_file(str(common.REPO_ROOT / "configs" / cfg_file))
  entry = record.setdefault("models", {}).setdefault(key, {"network": name, "n": n,
                                                            "image_size": size,
                                                            "num_classes": classes})
  model, w0, frozen = _network(name, size, classes)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, size, size, 3)).astype(np.float32)
  n_forget = n // 10
  y = np.concatenate([np.zeros(n_forget, np.int32),
                      rng.integers(1, classes, size=n - n_forget).astype(np.int32)])
  return cfg, entry, model, w0, frozen, x, y, n_forget


def run_model(key: str, args, record: dict, save) -> None:
  _, _, classes, solvers, solve_dtype = MODELS[key]
  cfg, entry, model, w0, frozen, x, y, n_forget = _workload(key, args, record)
  n = args.n
  retain, forget = (x[n_forget:], y[n_forget:]), (x[:n_forget], y[:n_forget])
  apply_fn = make_apply_fn(model, frozen)
  params = common.perturb(w0, 1e-2, 1)
  entry["num_params"] = int(sum(l.size for l in jax.tree_util.tree_leaves(w0)))
  dtype = jnp.float64 if solve_dtype == "float64" and jax.config.jax_enable_x64 else None
  entry["solve_dtype"] = "float64" if dtype is not None else "float32"
  deltas = {}
  for solver in solvers:
    print(f"{key}: {solver} update, n = {n}, p = {entry['num_params']} ...", flush=True)
    t = common.time_ntk_forget(apply_fn, w0, params, retain, forget, num_classes=classes,
                               damping=float(cfg.unlearn.damping), solver=solver,
                               batch_size=args.batch_size, solve_dtype=dtype)
    if t.get("status") == "refused":
      entry[solver] = t
    else:
      deltas[solver] = t.pop("delta")
      entry[solver] = {**t, "peak_device_bytes": _peak_device_bytes()}
    print(f"  {entry[solver]}", flush=True)
    save()
  if len(deltas) == 2:
    a, b = deltas.values()
    entry["solver_relative_difference"] = float(np.linalg.norm(a - b) / np.linalg.norm(a))
  epochs = args.retrain_epochs or cfg.finetune.epochs
  spec = train.TrainSpec.from_config(cfg.finetune, epochs=epochs)
  stamps = [time.perf_counter()]

  def progress(epoch, loss):
    stamps.append(time.perf_counter())
    entry["retrain"] = {"epochs_run": epoch + 1, "protocol_epochs": int(cfg.finetune.epochs),
                        "epoch_seconds": np.diff(stamps).tolist(), "last_loss": float(loss),
                        "seconds": stamps[-1] - stamps[0]}
    save()

  print(f"{key}: Retrain, {epochs} epochs on {n - n_forget} images ...", flush=True)
  train.fit(model, w0, frozen, retain, spec, classes, seed=0, progress=progress)
  best = min((entry[s]["run_s"] for s in solvers if "run_s" in entry.get(s, {})), default=None)
  if best is not None:
    entry["update_over_retrain"] = best / entry["retrain"]["seconds"]
  print(f"  retrain {entry['retrain']['seconds']:.1f} s; update/Retrain "
        f"{entry.get('update_over_retrain')}", flush=True)
  save()


def run_linearized(key: str, args, record: dict, save) -> None:
  """Linearised fine-tuning at the paper's scale (`finetune.mode="linearized"`, closed form,
  the configs' `:linearized`): Full and Retrain are the ridge minimisers of f_lin at w0,
  solved from the Gram statistics of D_r and D_f (one Jacobian pass each,
  `Forgetter.accumulate`), and Fast-NTK's update from Full reuses them
  (`Forgetter.from_gram_stats`, as the pipeline's shared-Gram path). Exact in exact
  arithmetic: its distance to Retrain is round-off. Records the times (the Grams' apart
  from their compilation; the solves' and the update's with theirs),
  finiteness, ‖w_fastntk − w_retrain‖ / ‖w_retrain − w0‖ and the peak device memory."""
  from fastntk_jax.experiment.methods import fastntk as fastntk_method  # pylint: disable=g-import-not-at-top
  from fastntk_jax.unlearn import api as unlearn_api  # pylint: disable=g-import-not-at-top
  from fastntk_jax.unlearn import linear  # pylint: disable=g-import-not-at-top
  _, _, classes, _, solve_dtype = MODELS[key]
  cfg, entry, model, w0, frozen, x, y, n_forget = _workload(key, args, record)
  n = args.n
  dtype = jnp.float64 if solve_dtype == "float64" and jax.config.jax_enable_x64 else None
  forgetter = unlearn_api.make_forgetter(
      make_apply_fn(model, frozen), num_classes=classes, damping=float(cfg.unlearn.damping),
      solver="primal", batch_size=args.batch_size, solve_dtype=dtype)
  out = {"solve_dtype": "float64" if dtype is not None else "float32"}
  print(f"{key}: linearised Full, Retrain and Fast-NTK, n = {n} ...", flush=True)
  stats, compile_s = {}, 0.0
  start = time.perf_counter()
  for part, rows in (("retain", slice(n_forget, n)), ("forget", slice(0, n_forget))):
    state, compiled = forgetter.accumulate(w0, x[rows], y[rows],
                                           chunk_rows=min(n - n_forget, 8 * args.batch_size))
    compile_s += compiled
    stats[part] = (state["g"], state["b"])
  out["grams_s"] = time.perf_counter() - start - compile_s
  out["compile_s"] = compile_s
  lam = jnp.asarray(float(cfg.unlearn.damping), stats["retain"][0].dtype)
  start = time.perf_counter()
  retrain = linear.ridge_solution(w0, [stats["retain"]], lam)
  full = linear.ridge_solution(w0, [stats["retain"], stats["forget"]], lam)
  jax.block_until_ready((retrain, full))
  out["full_and_retrain_solves_s"] = time.perf_counter() - start
  plan = fastntk_method.reference_model_plan(
      forgetter.plan(w0, w0, (x[n_forget:], y[n_forget:]), (x[:n_forget], y[:n_forget]),
                     traced=True), "gpu_paper_scale: the shared Gram path")
  start = time.perf_counter()
  fast, _ = forgetter.from_gram_stats(full, stats["retain"], stats["forget"], plan)
  jax.block_until_ready(fast)
  out["update_s"] = time.perf_counter() - start
  flat = lambda w: np.concatenate([np.ravel(np.asarray(l, np.float64))
                                   for l in jax.tree_util.tree_leaves(w)])
  out["finite"] = bool(np.all(np.isfinite(flat(fast))) and np.all(np.isfinite(flat(retrain))))
  moved = np.linalg.norm(flat(retrain) - flat(w0))
  out["relative_distance_to_retrain"] = float(np.linalg.norm(flat(fast) - flat(retrain))
                                              / max(moved, 1e-300))
  out["peak_device_bytes"] = _peak_device_bytes()
  entry["linearized"] = out
  print(f"  {out}", flush=True)
  save()


def write_markdown(record: dict, out) -> None:
  lines = ["# The paper's scale on one device", "",
           "    JAX_ENABLE_X64=1 python -m benchmarks.gpu_paper_scale " + " ".join(record["argv"]),
           "", common.machine_markdown(record["machine"]), "",
           "| model | n | p | solver | finite | compile s | run s | peak device GiB | "
           "Retrain s (epochs) | update / Retrain |", "|---|---|---|---|---|---|---|---|---|---|"]
  for key, e in record.get("models", {}).items():
    r = e.get("retrain", {})
    for solver in MODELS[key][3]:
      s = e.get(solver, {})
      peak = s.get("peak_device_bytes")
      lines.append(
          f"| {e['network']} | {e['n']:,} | {e.get('num_params', 0):,} | {solver} "
          f"({e.get('solve_dtype')}) | {s.get('finite', s.get('status'))} | "
          f"{common.fmt_s(s.get('compile_s'))} | {common.fmt_s(s.get('run_s'))} | "
          f"{'–' if peak is None else f'{peak / 2**30:.1f}'} | "
          f"{common.fmt_s(r.get('seconds'))} ({r.get('epochs_run', 0)}/"
          f"{r.get('protocol_epochs', '?')}) | {common.fmt_g(e.get('update_over_retrain'))} |")
    if "solver_relative_difference" in e:
      lines.append(f"| | | | primal vs dual: {e['solver_relative_difference']:.2e} | | | | | | |")
    lin = e.get("linearized")
    if lin:
      peak = lin.get("peak_device_bytes")
      lines.append(
          f"| {e['network']} linearised | {e['n']:,} | {e.get('num_params', '–')} | closed "
          f"form ({lin['solve_dtype']}) | {lin['finite']} | {common.fmt_s(lin['compile_s'])} "
          f"| Grams {common.fmt_s(lin['grams_s'])}, Full + Retrain solves "
          f"{common.fmt_s(lin['full_and_retrain_solves_s'])}, update "
          f"{common.fmt_s(lin['update_s'])} | {'–' if peak is None else f'{peak / 2**30:.1f}'} "
          f"| ‖w − w_r‖ / ‖w_r − w0‖ = {lin['relative_distance_to_retrain']:.1e} | |")
  common.atomic_write(out / "gpu_paper_scale.md", "\n".join(lines) + "\n")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--models", default="resnet110,vit_b16")
  ap.add_argument("--n", type=int, default=5000)
  ap.add_argument("--batch-size", type=int, default=64, help="Jacobian block (images)")
  ap.add_argument("--retrain-epochs", type=int, default=None,
                  help="default: the protocol's; fewer when the device time is short")
  ap.add_argument("--linearized", action="store_true",
                  help="also the linearised closed form (ResNet-110: Full, Retrain, Fast-NTK)")
  ap.add_argument("--quick", action="store_true",
                  help="resnet8 / vit_ti16 at 32x32 (a CPU check of the script itself)")
  args = ap.parse_args(argv)
  unknown = set(args.models.split(",")) - set(MODELS)
  if unknown:
    sys.exit(f"gpu_paper_scale: unknown model(s) {sorted(unknown)}; choose from {list(MODELS)}")
  out = common.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  record = {"machine": common.machine_info(), "argv": list(argv or sys.argv[1:])}

  def save():
    common.atomic_write(out / "gpu_paper_scale.json", json.dumps(record, indent=1, default=str))
    write_markdown(record, out)

  for key in args.models.split(","):
    run_model(key, args, record, save)
    if args.linearized and MODELS[key][4] == "float64":  # the CNN: its p x p Gram fits
      run_linearized(key, args, record, save)
  print((out / "gpu_paper_scale.md").read_text())


if __name__ == "__main__":
  main()
