"""The paper's table grid as separate jobs, and one merged table of their results.

Grid (one job per model × setting × seed; `--group-seeds` runs all seeds in one job):
  Table I   ResNet-110, MobileNetV2 on CIFAR-10 (10 classes), #IPC in CIFAR10_IPC
  Table II  ViT-S/16, ViT-B/16 (prompts) on ImageNet-R, #classes/#IPC in IMAGENET_R_SETTINGS
  appendix  ViT-B/16 on CIFAR-10, #IPC 50 (only with --groups=...,appendix)
Each grid point runs in each fine-tuning mode of `--modes` (MODES: "standard", the paper's
SGD fine-tuning, and "linearized", the exact mode in which Fast-NTK equals Retrain up to
round-off; both by default, so that the tables can put them side by side). Each job is
`python -m fastntk_jax.main --config=configs/<file>.py:<arg>[,linearized]
--config.seeds='(s,)' --workdir=<root>/<job>`: the config file's own argument picks the
setting and the mode, a config_flags override picks the seed, and every job has its own
workdir, named by model, setting, mode and seeds (jobs are independent and individually
resumable). The CNN jobs (PRETRAINED_HERE) also get
--config.pretrain.cache_dir=<root>/pretrain_cache: their CIFAR-100 backbone is trained once
per model, by the first job, and shared by every seed and #IPC; under SLURM the other jobs
of that model are submitted with --dependency=afterany on the first one.

  python launch/sweep.py --dry-run                            # print every job's command
  python launch/sweep.py --dry-run --modes=linearized         # the exact mode only
  python launch/sweep.py --backend=local --root=sweep         # run them here, one by one
  python launch/sweep.py --backend=slurm --root=/shared/sweep --sbatch-args='--nodes=2'
  python launch/sweep.py --merge sweep                        # -> sweep.md, sweep.json

Flags that start with --config. (e.g. --config.data.data_dir=/data/tfds) are passed to
every job. `--merge DIR...` reads every results.json under the given folders, groups them
by grid point and mode (model, dataset, #classes, #IPC, finetune.mode, read from the
results themselves), pools
the seeds of a grid point across jobs and writes one markdown table with a row per grid
point and method (mean ± std over seeds, population std as in results.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shlex
import subprocess
import sys
from typing import Iterable, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CIFAR-10 #IPC: 100 is the configs' Table I default; 500 (5,000 images) is the largest
# run the paper's abstract reports. The extracted paper text lacks its tables: check them
# and change this (or pass --cifar-ipc) if they list other values.
CIFAR10_IPC = (100, 500)
# ImageNet-R (#classes, #IPC), as listed in configs/vit_small_imagenet_r.py.
IMAGENET_R_SETTINGS = ((20, 20), (20, 50), (50, 20))
SEEDS = (0, 1, 2)
# The fine-tuning modes (config.finetune.mode): the paper's SGD fine-tuning, and the exact
# mode (the network linearised at w0, trained to its ridge minimiser; docs/derivation.md §5),
# selected by the config files' `linearized` argument.
MODES = ("standard", "linearized")
MODE_LABELS = {"standard": "standard", "linearized": "linearised"}

# (group, model name, dataset, config file). The model/dataset names are those that
# results.json records (config.model.name, config.data.name).
MODELS = (
    ("cifar10", "resnet110", "cifar10", "configs/resnet110_cifar10.py"),
    ("cifar10", "mobilenetv2", "cifar10", "configs/mobilenetv2_cifar10.py"),
    ("imagenet_r", "vit_s16", "imagenet_r", "configs/vit_small_imagenet_r.py"),
    ("imagenet_r", "vit_b16", "imagenet_r", "configs/vit_base_imagenet_r.py"),
    ("appendix", "vit_b16", "cifar10", "configs/vit_base_cifar10.py"),
)
GROUPS = ("cifar10", "imagenet_r", "appendix")
DEFAULT_GROUPS = ("cifar10", "imagenet_r")
# Models whose configs pre-train their backbone (on CIFAR-100): every job of such a model
# gets --config.pretrain.cache_dir=<root>/pretrain_cache, so the backbone is trained once and
# shared by every seed and #IPC (fastntk_jax/experiment/pretrain.py); under SLURM the other jobs of
# that model wait for the first one (--dependency=afterany), which trains it.
PRETRAINED_HERE = ("resnet110", "mobilenetv2")
CACHE_FOLDER = "pretrain_cache"

MODEL_LABELS = {"resnet110": "ResNet-110", "mobilenetv2": "MobileNetV2",
                "vit_s16": "ViT-S/16", "vit_b16": "ViT-B/16", "vit_ti16": "ViT-Ti/16"}
DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet_r": "ImageNet-R",
                  "digits": "digits"}
# Kept in step with fastntk_jax/experiment/report.py (METRICS); duplicated so that the merge
# runs without importing JAX. Method labels come from results.json.
METRICS = (("acc_retain", "D_r acc"), ("acc_forget", "D_f acc"),
           ("acc_test_retain", "Test acc (retain cls)"),
           ("acc_test_forget", "Test acc (forget cls)"), ("relearn_epochs", "Relearn (epochs)"))
# The field's metrics (report.py), merged too: what separates the two modes.
FIELD_METRICS = (("ua", "UA"), ("ra", "RA"), ("ta", "TA"), ("mia_efficacy", "MIA-Efficacy"),
                 ("avg_gap", "Avg. Gap"), ("relative_l2_to_retrain", "‖w − w_r‖/‖w_r − w0‖"))
PROBE_METRICS = ("probe_acc_retain", "probe_acc_forget")


@dataclasses.dataclass(frozen=True)
class Job:
  """One grid point and seed(s): one run of fastntk_jax.main in its own workdir."""
  model: str
  dataset: str
  config: str  # config file, relative to the repository root
  arg: str  # the config file's argument ("ipc=100", "classes=20,ipc=50")
  num_classes: int
  ipc: int
  seeds: tuple[int, ...]
  mode: str = "standard"  # one of MODES

  @property
  def name(self) -> str:
    seeds = "s" + "-".join(str(s) for s in self.seeds)
    return f"{self.model}_{self.dataset}_c{self.num_classes}_ipc{self.ipc}_{self.mode}_{seeds}"

  @property
  def config_arg(self) -> str:
    """The config file's argument: the setting, plus `linearized` in the exact mode."""
    return self.arg + (",linearized" if self.mode == "linearized" else "")

  def main_args(self, root: str, extra: Sequence[str] = ()) -> list[str]:
    """The arguments of `python -m fastntk_jax.main` for this job."""
    # A Python tuple literal for config_flags; "(0,)" needs its trailing comma.
    seeds = "(" + ",".join(str(s) for s in self.seeds) + ("," if len(self.seeds) == 1 else "") + ")"
    # The shared pre-training cache first, so that a --config.pretrain.cache_dir of the
    # user's (in `extra`) overrides it.
    cache = ([f"--config.pretrain.cache_dir={os.path.join(root, CACHE_FOLDER)}"]
             if self.model in PRETRAINED_HERE else [])
    return [f"--config={self.config}:{self.config_arg}", f"--config.seeds={seeds}",
            f"--workdir={os.path.join(root, self.name)}", *cache, *extra]


def parse_modes(text: str) -> tuple[str, ...]:
  """"standard,linearized" -> ("standard", "linearized"), in MODES order.

  Raises:
    ValueError: empty, or a word that is not a mode (the message names the allowed ones).
  """
  words = [w.strip() for w in str(text).split(",") if w.strip()]
  unknown = [w for w in words if w not in MODES]
  if unknown or not words:
    raise ValueError(f"--modes={text!r}: " + (f"unknown mode(s) {unknown}" if unknown else
                                             "no mode") +
                     f"; choose a comma-separated subset of {','.join(MODES)}")
  return tuple(m for m in MODES if m in words)


def grid(groups: Iterable[str] = DEFAULT_GROUPS, *, seeds: Sequence[int] = SEEDS,
         cifar_ipc: Sequence[int] = CIFAR10_IPC,
         imagenet_r: Sequence[tuple[int, int]] = IMAGENET_R_SETTINGS,
         models: Optional[Sequence[str]] = None, group_seeds: bool = False,
         modes: Sequence[str] = MODES) -> list[Job]:
  """The jobs of the paper's tables, in table order.

  Args:
    groups: subset of GROUPS.
    seeds: training seeds.
    cifar_ipc: #IPC values of the CIFAR-10 rows (10 classes each).
    imagenet_r: (#classes, #IPC) of the ImageNet-R rows.
    models: keep only these model names (None: all).
    group_seeds: one job per grid point running all seeds, instead of one per seed.
    modes: fine-tuning modes (subset of MODES), each grid point runs in each.

  Returns:
    Jobs, ordered by group, model, setting, mode, seed.
  """
  unknown = sorted(set(groups) - set(GROUPS))
  if unknown:
    raise ValueError(f"unknown group(s) {unknown}; choose from {list(GROUPS)}")
  modes = parse_modes(",".join(modes))
  jobs = []
  seed_sets = [tuple(seeds)] if group_seeds else [(s,) for s in seeds]
  for group, model, dataset, config in MODELS:
    if group not in groups or (models and model not in models):
      continue
    if dataset == "imagenet_r":
      settings = [(k, n, f"classes={k},ipc={n}") for k, n in imagenet_r]
    elif group == "appendix":
      settings = [(10, 50, "ipc=50")]
    else:
      settings = [(10, n, f"ipc={n}") for n in cifar_ipc]
    for k, n, arg in settings:
      for mode in modes:
        for s in seed_sets:
          jobs.append(Job(model, dataset, config, arg, k, n, s, mode))
  return jobs


def command(job: Job, *, backend: str, root: str, python: str, extra: Sequence[str] = (),
            sbatch_args: Sequence[str] = (), after: Optional[str] = None,
            parsable: bool = False) -> list[str]:
  """The exact command that runs (local) or submits (slurm) one job, run from REPO.

  slurm only: `after` = a job id this job waits for (--dependency=afterany:ID: it runs even
  if that one failed, and then trains the backbone itself); `parsable` = print the job id
  (sbatch --parsable), for the job the others of its backbone wait for.
  """
  args = job.main_args(root, extra)
  if backend == "local":
    return [python, "-m", "fastntk_jax.main", *args]
  if backend == "slurm":
    log = os.path.join(root, f"{job.name}.%j.out")
    flags = (["--parsable"] if parsable else []) + (
        [f"--dependency=afterany:{after}"] if after else [])
    return ["sbatch", *flags, f"--job-name=fastntk-{job.name}", f"--output={log}",
            *sbatch_args, "launch/slurm_gpu.sh", *args]
  raise ValueError(f"unknown backend {backend!r}; choose local or slurm")


def backbone_waits(jobs: Sequence[Job]) -> list[tuple[bool, Optional[int]]]:
  """Per job: (is the first job of its pre-trained backbone, index of that first job for the
  others of the same backbone, else None)."""
  first: dict[str, int] = {}
  out = []
  for i, job in enumerate(jobs):
    if job.model not in PRETRAINED_HERE:
      out.append((False, None))
    elif job.model not in first:
      first[job.model] = i
      out.append((True, None))
    else:
      out.append((False, first[job.model]))
  return out


# --------------------------------------------------------------------------------------
# Merging results.json files.
# --------------------------------------------------------------------------------------


def _find_results(paths: Sequence[str]) -> list[str]:
  found = []
  for p in paths:
    if os.path.isfile(p):
      found.append(p)
    elif os.path.isdir(p):
      found += sorted(glob.glob(os.path.join(p, "**", "results.json"), recursive=True))
    else:
      raise ValueError(f"--merge: {p!r} is neither a results.json nor a folder")
  if not found:
    raise ValueError(f"--merge: no results.json under {list(paths)}")
  return found


def result_mode(results: dict) -> str:
  """The fine-tuning mode a results.json was run in (its config's finetune.mode; results
  from before the mode existed are "standard")."""
  return (results["config"].get("finetune") or {}).get("mode") or "standard"


def _point(results: dict) -> tuple:
  """(model, dataset, #classes, #IPC, mode) of a results.json, from its own record."""
  cfg = results["config"]
  ipc = cfg["data"].get("images_per_class")
  return (results["model"]["name"], cfg["data"]["name"], int(results["data"]["num_classes"]),
          ipc if ipc is None else int(ipc), result_mode(results))


def merge(paths: Sequence[str]) -> dict:
  """Pools the per-seed metrics of every results.json by grid point and mode.

  Returns:
    {"points": [{"model", "dataset", "num_classes", "ipc", "mode", "seeds", "sources",
    "methods": {method: {metric: {"mean", "std", "per_seed"}}}}, ...]} in sorted order
    (metrics: METRICS and FIELD_METRICS).

  Raises:
    ValueError: a grid point has the same seed in two results (which one is right?), or a
      results.json lacks the fields the table needs.
  """
  points: dict[tuple, dict] = {}
  for path in _find_results(paths):
    with open(path) as f:
      res = json.load(f)
    try:
      key = _point(res)
      seeds = [int(s) for s in res["seeds"]]
      methods = res["methods"]
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: not a fastntk_jax results.json (missing {e})") from None
    entry = points.setdefault(key, {"seeds": [], "sources": [], "runs": {}, "probes": {},
                                    "model": res.get("model", {}), "pretrain": [],
                                    "labels": {}})
    clash = sorted(set(seeds) & set(entry["seeds"]))
    if clash:
      raise ValueError(f"seed(s) {clash} of {key} appear in both {path} and one of "
                       f"{entry['sources']}; remove one")
    entry["seeds"] += seeds
    entry["sources"].append(path)
    for name, metrics in methods.items():
      entry["labels"].setdefault(name, metrics.get("label", name))
      run = entry["runs"].setdefault(name, {m: [] for m, _ in METRICS + FIELD_METRICS})
      for m, _ in METRICS + FIELD_METRICS:
        per_seed = (metrics.get(m) or {}).get("per_seed") or [None] * len(seeds)
        run[m] += list(per_seed)
    # Table III: the linear probes (Pre-Trained, Random-Init, Fast-NTK) on D_r and D_f.
    for kind, metrics in (res.get("linear_probe") or {}).items():
      run = entry["probes"].setdefault(kind, {m: [] for m in PROBE_METRICS})
      for m in PROBE_METRICS:
        run[m] += list((metrics.get(m) or {}).get("per_seed") or [None] * len(seeds))
    if (res.get("pretrain") or {}).get("test_accuracy") is not None:
      entry["pretrain"].append(res["pretrain"])
  out = []
  for key in sorted(points, key=lambda k: tuple("" if v is None else v for v in k)):
    entry = points[key]
    model, dataset, k, ipc, mode = key
    methods = {name: {m: _stats(v) for m, v in run.items()} for name, run in entry["runs"].items()}
    probes = {kind: {m: _stats(v) for m, v in run.items()}
              for kind, run in entry["probes"].items()}
    params = {f: entry["model"].get(f) for f in ("trainable_params", "total_params",
                                                 "trainable_percent")}
    pre = entry["pretrain"][0] if entry["pretrain"] else None
    out.append({"model": model, "dataset": dataset, "num_classes": k, "ipc": ipc,
                "mode": mode, "seeds": entry["seeds"], "sources": entry["sources"], "methods": methods,
                "labels": entry["labels"],
                "probes": probes, "params": params,
                "pretrain": None if pre is None else {
                    f: pre.get(f) for f in ("dataset", "test_accuracy", "test_split",
                                            "recipe", "cache_key")}})
  return {"points": out}


def _stats(values: list) -> dict:
  vals = [v for v in values if v is not None]
  if not vals:
    return {"mean": None, "std": None, "per_seed": values}
  return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": values}


def _fmt(stat: dict, digits: int = 1) -> str:
  return ("–" if stat["mean"] is None
          else f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}")


def markdown(merged: dict) -> str:
  """One table: a row per grid point, mode and method."""
  head = ["Model", "Dataset", "#Classes/#IPC", "Mode", "Method",
          *(label for _, label in METRICS), "Avg. Gap", "Seeds"]
  lines = ["# Fast-NTK sweep", "",
           "Mean ± std over seeds (population std). Each row pools the seeds of one grid "
           "point across jobs.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for p in merged["points"]:
    for name in p["methods"]:
      row = [MODEL_LABELS.get(p["model"], p["model"]),
             DATASET_LABELS.get(p["dataset"], p["dataset"]),
             f"{p['num_classes']}/{p['ipc']}", MODE_LABELS.get(p["mode"], p["mode"]),
             p.get("labels", {}).get(name, name),
             *(_fmt(p["methods"][name][m]) for m, _ in METRICS),
             _fmt(p["methods"][name]["avg_gap"], 2),
             ",".join(str(s) for s in sorted(p["seeds"]))]
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def write_merged(paths: Sequence[str], out_dir: str) -> str:
  """Merges and writes out_dir/sweep.md and out_dir/sweep.json; returns the markdown path."""
  merged = merge(paths)
  os.makedirs(out_dir, exist_ok=True)
  md_path = os.path.join(out_dir, "sweep.md")
  for path, text in ((md_path, markdown(merged)),
                     (os.path.join(out_dir, "sweep.json"), json.dumps(merged, indent=1))):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)  # atomic: a reader never sees half a table
  return md_path


# --------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v.strip())


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
  out = []
  for part in text.split(","):
    k, _, n = part.partition("/")
    out.append((int(k), int(n)))
  return tuple(out)


def modes_arg(text: str) -> tuple[str, ...]:
  """argparse type of --modes: a clear one-line error for a bad value."""
  try:
    return parse_modes(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="Any --config.FIELD=VALUE flag is passed to every job.")
  ap.add_argument("--dry-run", action="store_true", help="print every job's command; run nothing")
  ap.add_argument("--backend", choices=("local", "slurm"), default="local")
  ap.add_argument("--root", default="sweep", help="parent folder of the jobs' workdirs")
  ap.add_argument("--groups", default=",".join(DEFAULT_GROUPS),
                  help=f"comma-separated subset of {','.join(GROUPS)}")
  ap.add_argument("--models", default="", help="comma-separated model names to keep")
  ap.add_argument("--seeds", type=_ints, default=SEEDS)
  ap.add_argument("--modes", type=modes_arg, default=MODES,
                  help="comma-separated fine-tuning modes, each grid point runs in each: "
                  f"{','.join(MODES)} (default: both; each job's workdir is named by its mode)")
  ap.add_argument("--cifar-ipc", type=_ints, default=CIFAR10_IPC)
  ap.add_argument("--imagenet-r", type=_pairs, default=IMAGENET_R_SETTINGS,
                  help="comma-separated #classes/#IPC pairs, e.g. 20/20,20/50,50/20")
  ap.add_argument("--group-seeds", action="store_true",
                  help="one job per grid point running all seeds (the CNNs' pre-training is "
                  "shared either way: --config.pretrain.cache_dir=ROOT/pretrain_cache)")
  ap.add_argument("--python", default=sys.executable, help="interpreter for --backend=local")
  ap.add_argument("--sbatch-args", default="", help="extra sbatch options, shell-quoted")
  ap.add_argument("--merge", nargs="+", metavar="DIR", help="merge results.json files under DIR")
  ap.add_argument("--out", default=None, help="folder for sweep.md/sweep.json "
                  "(default: --root for runs, the current folder for --merge)")
  args, rest = ap.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    ap.error(f"unrecognised arguments: {' '.join(bad)} (only --config.FIELD=VALUE flags "
             "are passed through to the jobs)")
  return args, rest


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, extra = parse_args(sys.argv[1:] if argv is None else argv)
  if args.merge:
    try:
      path = write_merged(args.merge, args.out or ".")
    except ValueError as e:
      print(f"sweep: error: {e}", file=sys.stderr)
      return 2
    print(open(path).read(), end="")
    print(f"Wrote {path} and {os.path.join(os.path.dirname(path), 'sweep.json')}")
    return 0
  jobs = grid([g for g in args.groups.split(",") if g], seeds=args.seeds,
              cifar_ipc=args.cifar_ipc, imagenet_r=args.imagenet_r,
              models=[m for m in args.models.split(",") if m] or None,
              group_seeds=args.group_seeds, modes=args.modes)
  sbatch_args = shlex.split(args.sbatch_args)
  # Absolute, because the jobs run from the repository root, not from here.
  root = os.path.abspath(args.root)
  waits = backbone_waits(jobs) if args.backend == "slurm" else [(False, None)] * len(jobs)
  var = lambda i: f"JOB_{jobs[i].model}"  # the dry run's shell variable of a first job's id

  def cmd_for(i, after=None):
    return command(jobs[i], backend=args.backend, root=root, python=args.python, extra=extra,
                   sbatch_args=sbatch_args, after=after, parsable=waits[i][0])

  if args.dry_run:
    print(f"cd {shlex.quote(REPO)}")
    for i in range(len(jobs)):
      first, wait = waits[i]
      line = shlex.join(cmd_for(i, after=None if wait is None else "@@"))
      if wait is not None:
        line = line.replace("afterany:@@", f"afterany:${{{var(wait)}}}")
      print(f"{var(i)}=$({line})" if first else line)
    return 0
  missing = sorted({j.config for j in jobs if not os.path.isfile(os.path.join(REPO, j.config))})
  if missing:
    print(f"sweep: error: config file(s) not found under {REPO}: {missing}", file=sys.stderr)
    return 2
  os.makedirs(root, exist_ok=True)
  failed = []
  ids: dict[int, str] = {}  # slurm: job ids of the first job of each backbone
  for i, job in enumerate(jobs):
    workdir = os.path.join(root, job.name)
    if args.backend == "local" and os.path.isfile(os.path.join(workdir, "results.json")):
      print(f"[skip] {job.name}: results.json exists")
      continue
    first, wait = waits[i]
    cmd = cmd_for(i, after=ids.get(wait) if wait is not None else None)
    print(f"[{args.backend}] {shlex.join(cmd)}", flush=True)
    if args.backend == "local":
      with open(os.path.join(root, f"{job.name}.log"), "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            check=False).returncode
    elif first:
      proc = subprocess.run(cmd, cwd=REPO, check=False, capture_output=True, text=True)
      rc = proc.returncode
      if not rc:
        ids[i] = proc.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
        print(f"Submitted batch job {ids[i]}")
    else:
      rc = subprocess.run(cmd, cwd=REPO, check=False).returncode
    if rc:
      failed.append(job.name)
      print(f"[failed] {job.name} (exit {rc})", file=sys.stderr)
  if args.backend == "local" and len(failed) < len(jobs):
    print(f"Wrote {write_merged([root], args.out or root)}")
  elif args.backend == "slurm":
    print(f"Submitted {len(jobs) - len(failed)} job(s); when they finish: "
          f"python launch/sweep.py --merge {shlex.quote(root)}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
