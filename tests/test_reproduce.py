"""launch/reproduce.py: the paper's grid with GPU hours per row, the runs (the sweep with the
shared pre-training), and Tables I-III shaped like the paper's with its surviving numbers."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from test_launch import _results, _stat, _write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = "/work/shared/paper/fast-ntk-2312.14923.txt"


def _load():
  spec = importlib.util.spec_from_file_location(
      "fastntk_reproduce", os.path.join(REPO, "launch", "reproduce.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


repro = _load()


def _cli(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", "reproduce.py"), *args],
                        capture_output=True, text=True, timeout=120, check=False, cwd=REPO)


def test_plan_covers_the_grid_with_hours_per_row():
  rows, pretrains = repro.plan()
  assert {(r.model, r.num_classes, r.ipc) for r in rows} == {
      ("resnet110", 10, 100), ("resnet110", 10, 500), ("mobilenetv2", 10, 100),
      ("mobilenetv2", 10, 500), ("vit_s16", 20, 20), ("vit_s16", 20, 50), ("vit_s16", 50, 20),
      ("vit_b16", 20, 20), ("vit_b16", 20, 50), ("vit_b16", 50, 20)}
  assert {p.model for p in pretrains} == {"resnet110", "mobilenetv2"}  # once per network
  for r in rows:
    assert r.seeds == 3 and r.seconds(repro.RATE_TFLOPS) > 0
    assert r.seconds(repro.RATE_TFLOPS / 4) >= r.seconds(repro.RATE_TFLOPS)
  by = {(r.model, r.ipc): r for r in rows if r.dataset == "cifar10"}
  # The one measured stage: ResNet-110's Fast-NTK on one H200 (0.85 s at 5,000 images).
  assert by[("resnet110", 500)].measured["fastntk"][0] == pytest.approx(3 * 0.85)
  assert "fastntk" not in by[("mobilenetv2", 500)].measured
  assert by[("resnet110", 500)].stages["full"] == pytest.approx(
      5 * by[("resnet110", 100)].stages["full"])
  # 160 epochs of CIFAR-100 at 3 forward passes per image, ResNet-110's 0.489 GFLOP each.
  pre = next(p for p in pretrains if p.model == "resnet110")
  assert pre.stages["pretrain"] == pytest.approx((160 * 50_000 * 3 + 10_000) * 0.489e9 * 1e-12)
  proc = _cli("plan")
  assert proc.returncode == 0, proc.stderr
  assert "| II | ViT-B/16 | ImageNet-R | 50/20 | 3 |" in proc.stdout
  assert "pre-training, CIFAR-100 (shared)" in proc.stdout and "**total**" in proc.stdout
  assert "Fast-NTK measured (benchmarks/RESULTS.md §3 (1x H200)" in proc.stdout


@pytest.mark.skipif(not os.path.exists(PAPER), reason="the paper's text is not here")
def test_paper_numbers_are_the_papers_surviving_table3():
  text = open(PAPER).read()
  flat = re.sub(r"\s", "", text)
  for key, rows in repro.PAPER_TABLE3.items():
    for kind, (retain, forget) in rows.items():
      for mean, std in (retain, forget):
        assert f"{mean:.2f}{std:.2f}" in flat, (key, kind, mean, std)


def _with_probes(results, shift):
  seeds = results["seeds"]
  for kind, (r, f) in (("pretrained", (58.0, 70.0)), ("random_init", (30.0, 40.0)),
                       ("fastntk", (55.0, 0.0))):
    results["linear_probe"][kind] = {"probe_acc_retain": _stat([r + shift + s for s in seeds]),
                                     "probe_acc_forget": _stat([f + s for s in seeds])}
  return results


def test_tables_are_shaped_like_the_papers_with_its_numbers_beside_ours(tmp_path):
  runs = tmp_path / "runs"
  for s in (0, 1):
    _write(runs / f"vits_{s}", _with_probes(_results("vit_s16", "imagenet_r", 20, 20, [s], 0.0), 0))
  _write(runs / "r110", _results("resnet110", "cifar10", 10, 100, [0, 1, 2], 0.0))
  res = json.load(open(runs / "r110" / "results.json"))
  res["pretrain"] = {"dataset": "cifar100", "test_accuracy": 71.25, "test_split": "cifar100/test"}
  _write(runs / "r110", res)
  proc = _cli("tables", str(runs), f"--out={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr
  md = (tmp_path / "out" / "tables.md").read_text()
  assert "## Table I: CNNs on CIFAR-10" in md and "## Table II: ViTs on ImageNet-R" in md
  # Table III: our mean ± std over the two seeds, the paper's value beside it; the paper's
  # columns are there even without runs.
  assert ("| D_r | Pre-Trained | 58.50 ± 0.50 (paper 60.39 ± 1.27) | – (paper 58.24 ± 1.49) |"
          in md)
  assert "| D_f | Fast-NTK | 0.50 ± 0.50 (paper 0.00 ± 0.00) |" in md
  assert "ViT-B/16 50/20" in md and "(paper 87.24 ± 0.00)" in md
  # Table I: a row group per metric, a row per method, a column per network and setting.
  assert "| Metric | | ResNet-110 10/100 |" in md
  assert "| Acc on D_f | Fast-NTK | 2.00 ± 0.82 |" in md  # 1.0 + seeds 0,1,2
  assert "| Pre-training test acc (CIFAR-100) | | 71.25 |" in md
  assert "| #Params (trainable) | | 10 (10.00%) |" in md
  data = json.loads((tmp_path / "out" / "tables.json").read_text())
  assert data["paper_table3"]["vit_s16_20_20"]["pretrained"] == [[60.39, 1.27], [72.5, 9.01]]


def test_run_is_the_sweep_with_the_shared_pretraining(tmp_path):
  proc = _cli("run", "--dry-run", f"--root={tmp_path}", "--models=resnet110", "--seeds=0,1",
              "--cifar-ipc=100", "--python=python")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()[1:]
  assert len(lines) == 2
  for line in lines:
    assert f"--config.pretrain.cache_dir={tmp_path}/pretrain_cache" in line
