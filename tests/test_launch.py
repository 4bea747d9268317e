"""launch/: the SLURM and TPU-VM scripts parse and their dry runs print the exact commands;
the sweep enumerates the paper's grid, with config arguments the configs really accept; the
merge pools seeds of results.json files (in the format `report.build_results` writes).
"""

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
BASH = shutil.which("bash")


def _load_sweep():
  spec = importlib.util.spec_from_file_location("fastntk_sweep", os.path.join(LAUNCH, "sweep.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while decorating
  spec.loader.exec_module(module)
  return module


sweep = _load_sweep()


def _bash(script, *args, env=None):
  full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
  full_env.update(env or {})
  return subprocess.run([BASH, os.path.join(LAUNCH, script), *args], env=full_env,
                        capture_output=True, text=True, timeout=30, check=False)


# --------------------------------------------------------------------------------------
# Shell scripts.
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("script", ["slurm_gpu.sh", "tpu_vm.sh"])
def test_scripts_parse(script):
  proc = subprocess.run([BASH, "-n", os.path.join(LAUNCH, script)], capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr


SLURM_ENV = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_SUBMIT_DIR": "/shared/fastntk_jax",
             "GPUS_PER_NODE": "4", "PYTHON": "/venv/bin/python"}
MAIN_ARGS = ["--config=configs/resnet110_cifar10.py:ipc=100", "--config.seeds=(0,)",
             "--workdir=/shared/wd"]


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("how", ["flag", "env"])
def test_slurm_dry_run_prints_exact_commands(how):
  if how == "flag":
    proc = _bash("slurm_gpu.sh", "--dry-run", *MAIN_ARGS, env=SLURM_ENV)
  else:
    proc = _bash("slurm_gpu.sh", *MAIN_ARGS, env={**SLURM_ENV, "DRY_RUN": "1"})
  assert proc.returncode == 0, proc.stderr
  # 61440 + 1234 % 4096 = 62674 (JAX's own SLURM port rule); first node of gpu[003-004].
  assert proc.stdout.splitlines() == [
      "cd /shared/fastntk_jax",
      "export FASTNTK_DISTRIBUTED=1",
      "export JAX_COORDINATOR_ADDRESS=gpu003:62674",
      "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
      "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 /venv/bin/python "
      "-m fastntk_jax.main --config=configs/resnet110_cifar10.py:ipc=100 "
      "'--config.seeds=(0,)' --workdir=/shared/wd",
  ]


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_slurm_dry_run_outside_an_allocation_is_one_node():
  proc = _bash("slurm_gpu.sh", "--dry-run", "--workdir=wd", env={"COORDINATOR_PORT": "7777"})
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[2].startswith("export JAX_COORDINATOR_ADDRESS=") and lines[2].endswith(":7777")
  assert lines[3] == "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"
  assert lines[4] == ("srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --kill-on-bad-exit=1 "
                      "python -m fastntk_jax.main --workdir=wd")


TPU_ENV = {"TPU_NAME": "my-tpu", "ZONE": "us-central2-b", "DRY_RUN": "1", "TMPDIR": "/tmp"}


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_tpu_dry_run_prints_exact_commands_and_creates_nothing():
  proc = _bash("tpu_vm.sh", "all", "--config=configs/vit_small_imagenet_r.py:classes=20,ipc=50",
               "--config.seeds=(0,)", "--workdir=wd_vits", env=TPU_ENV)
  assert proc.returncode == 0, proc.stderr
  ssh = "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all --command="
  assert proc.stdout.splitlines() == [
      f"git -C {REPO} archive --format=tar.gz -o /tmp/fastntk_jax-src.tar.gz HEAD",
      "gcloud compute tpus tpu-vm scp /tmp/fastntk_jax-src.tar.gz my-tpu:fastntk_jax-src.tar.gz "
      "--zone=us-central2-b --worker=all",
      ssh + '"mkdir -p fastntk_jax && tar -xzf fastntk_jax-src.tar.gz -C fastntk_jax"',
      ssh + "\"cd fastntk_jax && PYTHON=python3 STACK=lean EXTRAS=tfds "
      "bash launch/install_accelerator.sh tpu\"",
      ssh + "\"cd fastntk_jax && FASTNTK_DISTRIBUTED=1 python3 -m fastntk_jax.main "
      "--config=configs/vit_small_imagenet_r.py:classes=20,ipc=50 '--config.seeds=(0,)' "
      "--workdir=wd_vits\"",
      "gcloud compute tpus tpu-vm scp --recurse my-tpu:fastntk_jax/wd_vits . "
      "--zone=us-central2-b --worker=0",
  ]
  assert "create" not in proc.stdout and "CREATE=1" in proc.stderr


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_tpu_create_only_when_asked():
  proc = _bash("tpu_vm.sh", "create", env={**TPU_ENV, "CREATE": "1", "PROJECT": "proj"})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
      "gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b --project=proj "
      "--accelerator-type=v4-8 --version=tpu-ubuntu2204-base"]


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_tpu_needs_name_and_zone():
  proc = _bash("tpu_vm.sh", "run", env={"DRY_RUN": "1"})
  assert proc.returncode == 2 and "TPU_NAME" in proc.stderr


# --------------------------------------------------------------------------------------
# The sweep.
# --------------------------------------------------------------------------------------


def test_grid_is_the_papers_tables():
  jobs = sweep.grid()
  points = {(j.model, j.dataset, j.num_classes, j.ipc) for j in jobs}
  assert points == {
      ("resnet110", "cifar10", 10, 100), ("resnet110", "cifar10", 10, 500),
      ("mobilenetv2", "cifar10", 10, 100), ("mobilenetv2", "cifar10", 10, 500),
      ("vit_s16", "imagenet_r", 20, 20), ("vit_s16", "imagenet_r", 20, 50),
      ("vit_s16", "imagenet_r", 50, 20),
      ("vit_b16", "imagenet_r", 20, 20), ("vit_b16", "imagenet_r", 20, 50),
      ("vit_b16", "imagenet_r", 50, 20)}
  # Both fine-tuning modes by default, each job in its own workdir named by its mode.
  assert len(jobs) == len(points) * 3 * 2 and {j.seeds for j in jobs} == {(0,), (1,), (2,)}
  assert {j.mode for j in jobs} == {"standard", "linearized"}
  assert len({j.name for j in jobs}) == len(jobs)  # every job has its own workdir
  grouped = sweep.grid(group_seeds=True, modes=("standard",))
  assert len(grouped) == len(points) and {j.seeds for j in grouped} == {(0, 1, 2)}
  assert {j.mode for j in sweep.grid(modes=("linearized",))} == {"linearized"}
  with pytest.raises(ValueError, match=r"unknown mode\(s\) \['exact'\]; choose a "
                     "comma-separated subset of standard,linearized"):
    sweep.grid(modes=("exact",))
  assert {(j.model, j.dataset) for j in sweep.grid(["appendix"])} == {("vit_b16", "cifar10")}
  with pytest.raises(ValueError, match="unknown group"):
    sweep.grid(["tabel1"])


@pytest.mark.parametrize("job", sweep.grid(["cifar10", "imagenet_r", "appendix"], seeds=(0,)),
                         ids=lambda j: j.name)
def test_each_job_config_is_the_grid_point(job):
  """The config file + argument each job passes really selects that model/setting/mode."""
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config_file(os.path.join(REPO, job.config) + ":" + job.config_arg)
  assert cfg.model.name == job.model
  assert cfg.data.name == job.dataset
  assert cfg.data.images_per_class == job.ipc
  assert cfg.finetune.mode == job.mode and f"_{job.mode}_" in job.name
  if job.dataset == "imagenet_r":
    assert cfg.data.num_classes == job.num_classes


def _run_sweep(*args):
  return subprocess.run([sys.executable, os.path.join(LAUNCH, "sweep.py"), *args],
                        capture_output=True, text=True, timeout=60, check=False)


def test_sweep_dry_run_prints_exact_commands(tmp_path):
  root = str(tmp_path / "sw")
  proc = _run_sweep("--dry-run", f"--root={root}", "--models=vit_s16", "--seeds=0,1",
                    "--imagenet-r=20/50", "--python=python", "--config.data.data_dir=/tfds")
  assert proc.returncode == 0, proc.stderr
  cmd = "python -m fastntk_jax.main --config=configs/vit_small_imagenet_r.py:classes=20,ipc=50"
  assert proc.stdout.splitlines() == [
      f"cd {shlex.quote(REPO)}",
      f"{cmd} '--config.seeds=(0,)' --workdir={root}/vit_s16_imagenet_r_c20_ipc50_standard_s0 "
      "--config.data.data_dir=/tfds",
      f"{cmd} '--config.seeds=(1,)' --workdir={root}/vit_s16_imagenet_r_c20_ipc50_standard_s1 "
      "--config.data.data_dir=/tfds",
      # the exact mode: the config file's `linearized` argument, its own workdir
      f"{cmd},linearized '--config.seeds=(0,)' "
      f"--workdir={root}/vit_s16_imagenet_r_c20_ipc50_linearized_s0 --config.data.data_dir=/tfds",
      f"{cmd},linearized '--config.seeds=(1,)' "
      f"--workdir={root}/vit_s16_imagenet_r_c20_ipc50_linearized_s1 --config.data.data_dir=/tfds",
  ]
  only = _run_sweep("--dry-run", f"--root={root}", "--models=vit_s16", "--seeds=0",
                    "--imagenet-r=20/50", "--python=python", "--modes=linearized")
  assert only.returncode == 0, only.stderr
  assert only.stdout.splitlines()[1:] == [
      f"{cmd},linearized '--config.seeds=(0,)' "
      f"--workdir={root}/vit_s16_imagenet_r_c20_ipc50_linearized_s0"]


@pytest.mark.parametrize("modes", ["exact", "standard,lin", ","])
def test_sweep_refuses_a_bad_mode_in_one_line(modes):
  proc = _run_sweep("--dry-run", f"--modes={modes}")
  assert proc.returncode == 2 and proc.stdout == ""
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("sweep.py: error: argument --modes: ") and "standard,linearized" in last


def test_sweep_slurm_dry_run_submits_the_slurm_script(tmp_path):
  root = str(tmp_path / "sw")
  proc = _run_sweep("--dry-run", "--backend=slurm", f"--root={root}", "--models=resnet110",
                    "--cifar-ipc=100,500", "--group-seeds", "--modes=standard",
                    "--sbatch-args=--nodes=2 --partition=gpu")
  assert proc.returncode == 0, proc.stderr
  first = "resnet110_cifar10_c10_ipc100_standard_s0-1-2"
  second = "resnet110_cifar10_c10_ipc500_standard_s0-1-2"
  cache = f"--config.pretrain.cache_dir={root}/pretrain_cache"
  # One CIFAR-100 pre-training for both #IPC: the first job trains it into the shared cache
  # (and prints its job id), the other waits for that job and finds it there.
  assert proc.stdout.splitlines()[1:] == [
      f"JOB_resnet110=$(sbatch --parsable --job-name=fastntk-{first} "
      f"--output={root}/{first}.%j.out --nodes=2 "
      "--partition=gpu launch/slurm_gpu.sh --config=configs/resnet110_cifar10.py:ipc=100 "
      f"'--config.seeds=(0,1,2)' --workdir={root}/{first} {cache})",
      f"sbatch --dependency=afterany:${{JOB_resnet110}} --job-name=fastntk-{second} "
      f"--output={root}/{second}.%j.out --nodes=2 "
      "--partition=gpu launch/slurm_gpu.sh --config=configs/resnet110_cifar10.py:ipc=500 "
      f"'--config.seeds=(0,1,2)' --workdir={root}/{second} {cache}"]


def test_sweep_local_jobs_share_one_pretraining(tmp_path):
  root = str(tmp_path / "sw")
  proc = _run_sweep("--dry-run", f"--root={root}", "--models=mobilenetv2,vit_s16",
                    "--seeds=0,1", "--imagenet-r=20/20", "--python=python",
                    "--config.pretrain.cache_dir=/mine")
  assert proc.returncode == 0, proc.stderr
  cnn = [l for l in proc.stdout.splitlines() if "mobilenetv2" in l]
  vit = [l for l in proc.stdout.splitlines() if "vit_small" in l]
  assert len(cnn) == 8 and len(vit) == 4  # both modes
  for line in cnn:  # the sweep's cache first, so that the user's own flag (later) wins
    assert f"--config.pretrain.cache_dir={root}/pretrain_cache --config.pretrain.cache_dir=/mine" in line
  assert not any(f"{root}/pretrain_cache" in line for line in vit)  # ViTs load AugReg files


def test_sweep_full_dry_run_has_one_line_per_job():
  proc = _run_sweep("--dry-run")
  assert proc.returncode == 0, proc.stderr
  assert len(proc.stdout.splitlines()) == 1 + len(sweep.grid())


def test_sweep_rejects_unknown_flags():
  proc = _run_sweep("--dry-run", "--nodes=2")
  assert proc.returncode == 2 and "--nodes=2" in proc.stderr


# --------------------------------------------------------------------------------------
# Merging results.json.
# --------------------------------------------------------------------------------------

_METRICS = ("acc_retain", "acc_forget", "acc_test_retain", "acc_test_forget", "relearn_epochs")


def _stat(values):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": list(values)}


def _results(model, dataset, num_classes, ipc, seeds, forget_acc):
  """A results.json shaped like `report.build_results` output (every top-level section)."""
  def method(offset):
    vals = {m: [90.0 + offset + s for s in seeds] for m in _METRICS}
    vals["acc_forget"] = [forget_acc + offset + s for s in seeds]
    entry = {m: _stat(v) for m, v in vals.items()}
    entry["relearn_protocol"] = "sgd(lr=0.01, momentum=0.9), batch 64, ce loss, BN frozen"
    entry["relearn_curves"] = [[1.0, 0.01] for _ in seeds]
    return entry
  methods = {"full": method(5.0), "retrain": method(0.0), "fastntk": method(1.0)}
  for name, label in (("full", "Full"), ("retrain", "Retrain"), ("fastntk", "Fast-NTK")):
    methods[name]["label"] = label
  methods["fastntk"].update(solver="primal", condition_number=_stat([10.0] * len(seeds)),
                            update_norm=_stat([1.0] * len(seeds)))
  return {
      "config": {"data": {"name": dataset, "images_per_class": ipc,
                          "num_classes": num_classes}, "model": {"name": model},
                 "seeds": list(seeds)},
      "data": {"counts": {"retain": 10, "forget": 2}, "num_classes": num_classes,
               "forget_classes": [0], "forget_mode": "class"},
      "model": {"name": model, "trainable_params": 10, "total_params": 100,
                "trainable_percent": 10.0},
      "seeds": list(seeds),
      "methods": methods,
      "linear_probe": {"pretrained": {"probe_acc_retain": _stat([50.0] * len(seeds)),
                                      "probe_acc_forget": _stat([40.0] * len(seeds))}},
      "protocol": {"finetune": {}, "unlearn": {"damping": 0.01}},
      "versions": {"jax": "0.5.3"},
      "timing": {"methods": {m: {"seconds": _stat([1.0] * len(seeds))} for m in methods},
                 "fastntk_diagnostics": {}},
      "machine": {"cpu": "x", "cores": 2, "backend": "cpu", "devices": ["cpu"]},
  }


def _write(path, results):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump(results, f)


def test_merge_pools_seeds_of_a_grid_point(tmp_path):
  _write(tmp_path / "a", _results("vit_s16", "imagenet_r", 20, 50, [0], forget_acc=2.0))
  _write(tmp_path / "b", _results("vit_s16", "imagenet_r", 20, 50, [1], forget_acc=2.0))
  _write(tmp_path / "c", _results("resnet110", "cifar10", 10, 100, [0, 1], forget_acc=0.0))
  merged = sweep.merge([str(tmp_path)])
  points = {(p["model"], p["num_classes"], p["ipc"]): p for p in merged["points"]}
  assert set(points) == {("vit_s16", 20, 50), ("resnet110", 10, 100)}
  vit = points[("vit_s16", 20, 50)]
  assert sorted(vit["seeds"]) == [0, 1] and len(vit["sources"]) == 2
  # Retrain's D_f accuracy per seed: 2.0 + 0 (seed 0), 2.0 + 1 (seed 1) -> 2.5 ± 0.5.
  f = vit["methods"]["retrain"]["acc_forget"]
  assert sorted(f["per_seed"]) == [2.0, 3.0] and f["mean"] == 2.5 and f["std"] == 0.5
  # The same pooling within one results.json (two seeds) and across two (one seed each).
  r = points[("resnet110", 10, 100)]["methods"]["fastntk"]["acc_retain"]
  assert r["mean"] == 91.5 and r["std"] == 0.5

  md = sweep.markdown(merged)
  assert ("| ViT-S/16 | ImageNet-R | 20/50 | standard | Retrain | 90.5 ± 0.5 | 2.5 ± 0.5 | "
          "90.5 ± 0.5 | 90.5 ± 0.5 | 90.5 ± 0.5 | – | 0,1 |") in md
  assert "| ResNet-110 | CIFAR-10 | 10/100 | standard | Fast-NTK | 91.5 ± 0.5 | 1.5 ± 0.5 |" in md
  rows = [l for l in md.splitlines() if l.startswith("| ") and "---" not in l][1:]
  assert len(rows) == 2 * 3  # one row per grid point and method


def test_merge_keeps_the_modes_of_a_grid_point_apart(tmp_path):
  """The same grid point and seed in both modes: two points (no seed clash), each with its
  mode; the field's metrics merged too."""
  lin = _results("resnet110", "cifar10", 10, 100, [0, 1], forget_acc=0.0)
  lin["config"]["finetune"] = {"mode": "linearized"}
  lin["methods"]["fastntk"]["avg_gap"] = _stat([0.0, 0.0])
  lin["methods"]["fastntk"]["relative_l2_to_retrain"] = _stat([1e-7, 3e-7])
  _write(tmp_path / "lin", lin)
  _write(tmp_path / "std", _results("resnet110", "cifar10", 10, 100, [0, 1], forget_acc=0.0))
  merged = sweep.merge([str(tmp_path)])
  by_mode = {p["mode"]: p for p in merged["points"]}
  assert set(by_mode) == {"standard", "linearized"}
  assert by_mode["linearized"]["methods"]["fastntk"]["relative_l2_to_retrain"]["mean"] == 2e-7
  assert by_mode["standard"]["methods"]["fastntk"]["avg_gap"]["mean"] is None
  md = sweep.markdown(merged)
  assert "| ResNet-110 | CIFAR-10 | 10/100 | linearised | Fast-NTK |" in md
  assert "| 0.00 ± 0.00 | 0,1 |" in md


def test_merge_cli_writes_table(tmp_path):
  _write(tmp_path / "runs" / "a", _results("vit_b16", "imagenet_r", 50, 20, [0], 1.0))
  _write(tmp_path / "runs" / "b", _results("vit_b16", "imagenet_r", 50, 20, [2], 1.0))
  out = tmp_path / "out"
  proc = _run_sweep("--merge", str(tmp_path / "runs"), f"--out={out}")
  assert proc.returncode == 0, proc.stderr
  md = (out / "sweep.md").read_text()
  assert "| ViT-B/16 | ImageNet-R | 50/20 | standard | Full |" in md and "| 0,2 |" in md
  assert json.loads((out / "sweep.json").read_text())["points"][0]["seeds"] == [0, 2]


def test_merge_refuses_the_same_seed_twice(tmp_path):
  _write(tmp_path / "a", _results("vit_s16", "imagenet_r", 20, 20, [0], 1.0))
  _write(tmp_path / "b", _results("vit_s16", "imagenet_r", 20, 20, [0], 1.0))
  with pytest.raises(ValueError, match=r"seed\(s\) \[0\]"):
    sweep.merge([str(tmp_path)])
  proc = _run_sweep("--merge", str(tmp_path / "nothing_here"))
  assert proc.returncode == 2 and "neither" in proc.stderr
