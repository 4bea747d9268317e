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


GRID = {("resnet110", 10, 100), ("resnet110", 10, 500), ("mobilenetv2", 10, 100),
        ("mobilenetv2", 10, 500), ("vit_s16", 20, 20), ("vit_s16", 20, 50), ("vit_s16", 50, 20),
        ("vit_b16", 20, 20), ("vit_b16", 20, 50), ("vit_b16", 50, 20)}


def test_plan_covers_the_grid_with_hours_per_row():
  rows, pretrains = repro.plan()
  # Both modes by default: each grid point twice.
  assert {(r.model, r.num_classes, r.ipc, r.mode) for r in rows} == {
      g + (m,) for g in GRID for m in ("standard", "linearized")}
  assert {p.model for p in pretrains} == {"resnet110", "mobilenetv2"}  # once per network
  for r in rows:
    assert r.seeds == 3 and r.seconds(repro.RATE_TFLOPS) > 0
    assert r.seconds(repro.RATE_TFLOPS / 4) >= r.seconds(repro.RATE_TFLOPS)
  by = {(r.model, r.ipc): r for r in rows if r.dataset == "cifar10" and r.mode == "standard"}
  # The one measured stage: ResNet-110's Fast-NTK on one H200 (0.85 s at 5,000 images).
  assert by[("resnet110", 500)].measured["fastntk"][0] == pytest.approx(3 * 0.85)
  assert "fastntk" not in by[("mobilenetv2", 500)].measured
  assert by[("resnet110", 500)].stages["full"] == pytest.approx(
      5 * by[("resnet110", 100)].stages["full"])
  # 160 epochs of CIFAR-100 at 3 forward passes per image, ResNet-110's 0.489 GFLOP each,
  # and the host's crop + flip of every image of every epoch.
  pre = next(p for p in pretrains if p.model == "resnet110")
  assert pre.stages["pretrain"] == pytest.approx((160 * 50_000 * 3 + 10_000) * 0.489e9 * 1e-12)
  assert pre.measured["pretrain_augment"][0] == pytest.approx(
      160 * 50_000 * repro.AUGMENT_SECONDS_PER_IMAGE)
  proc = _cli("plan")
  assert proc.returncode == 0, proc.stderr
  assert "| II | ViT-B/16 | ImageNet-R | 50/20 | standard | 3 |" in proc.stdout
  assert "| II | ViT-B/16 | ImageNet-R | 50/20 | linearised | 3 |" in proc.stdout
  assert "pre-training, CIFAR-100 (shared)" in proc.stdout and "**total**" in proc.stdout
  assert "Fast-NTK measured" not in proc.stdout  # the basis names the measured stages
  assert "estimated (measured: fastntk); fastntk: benchmarks/RESULTS.md §3 (1x H200)" in proc.stdout


def test_plan_of_both_modes_counts_every_stage(tmp_path):
  """`plan --modes=standard,linearized` lists every grid point in both modes, with hours that
  are the sum of every stage (the certificate's, and pre-training's host augmentation,
  included), each row labelled measured or estimated."""
  proc = _cli("plan", "--modes=standard,linearized", "--json")
  assert proc.returncode == 0, proc.stderr
  rows = json.loads(proc.stdout)
  runs = [r for r in rows if r["jobs"]]
  assert {(r["model"], r["num_classes"], r["ipc"], r["mode"]) for r in runs} == {
      g + (m,) for g in GRID for m in ("standard", "linearized")}
  every = {"full", "retrain", "fastntk", "certificate", "max_loss", "random_label",
           "evaluation", "linear_probe"}
  for r in rows:
    row = repro.Row(**{k: r[k] for k in ("table", "model", "dataset", "num_classes", "ipc",
                                        "seeds", "jobs", "stages", "measured", "mode")})
    # The hours are every stage's measured seconds or its TFLOP at the rate, plus compilation.
    expect = r["jobs"] * repro.COMPILE_SECONDS + sum(
        r["measured"][s][0] if s in r["measured"] else v / repro.RATE_TFLOPS
        for s, v in r["stages"].items())
    assert r["hours_low"] * 3600 == pytest.approx(expect)
    assert row.seconds(repro.RATE_TFLOPS) == pytest.approx(expect)
    assert set(r["measured"]) <= set(r["stages"])
    assert r["basis"] == ("measured" if set(r["measured"]) == set(r["stages"]) else
                          "estimated" + (f" (measured: {', '.join(s for s in r['stages'] if s in r['measured'])})"
                                         if r["measured"] else ""))
    if r["jobs"]:
      assert every <= set(r["stages"]), r
    else:  # the shared pre-training: its device work and its host augmentation
      assert set(r["stages"]) == {"pretrain", "pretrain_augment"}
      assert r["measured"]["pretrain_augment"][0] > 0
  by = {(r["model"], r["ipc"], r["mode"]): r for r in runs if r["dataset"] == "cifar10"}
  # ResNet-110 linearised: the closed form, whose certificate's exact bound runs on the host
  # (measured at its p); MobileNetV2 linearised: the dual (no host stage).
  lin = by[("resnet110", 100, "linearized")]
  assert lin["measured"]["certificate_host"][0] == pytest.approx(3 * repro.CERTIFICATE_HOST[1])
  assert "certificate_host" not in by[("resnet110", 100, "standard")]["stages"]
  assert "certificate_host" not in by[("mobilenetv2", 100, "linearized")]["stages"]
  mbv2 = by[("mobilenetv2", 100, "linearized")]
  f = 0.181e9 * 1e-12
  p = repro.TRAINABLE["mobilenetv2"](10)
  # The dual on D (1,000 images, n·C = 10,000): D's kernel statistics once, residuals and
  # Jacobian rows (C + 2 forward passes an image) and the kernel's products 2(n·C)²p, and
  # its (n·C)³/3 factorisation; Retrain factorises D_r's block of that kernel, Fast-NTK
  # D_r's and the Schur complement's.
  assert mbv2["stages"]["full"] == pytest.approx(
      3 * (1000 * 12 * 0.181e9 + 2 * 10_000 ** 2 * p + 10_000 ** 3 / 3) * 1e-12)
  assert mbv2["stages"]["retrain"] == pytest.approx(3 * 9_000 ** 3 / 3 * 1e-12)
  assert mbv2["stages"]["fastntk"] == pytest.approx(
      3 * (9_000 ** 3 / 3 + 1_000 ** 3 / 3) * 1e-12)
  # The certificate: matrix-free in the standard mode (5 + 4·31 forward passes per D_r
  # image), and the release's 4 evaluations of D and the test split in both.
  std = by[("mobilenetv2", 100, "standard")]
  assert std["stages"]["certificate"] == pytest.approx(3 * (900 * 129 + 4 * 11_000) * f)
  text = _cli("plan", "--modes=standard,linearized").stdout
  assert "| I | ResNet-110 | CIFAR-10 | 10/100 | standard | 3 |" in text
  assert "| I | ResNet-110 | CIFAR-10 | 10/100 | linearised | 3 |" in text
  assert "certificate_host: host certificate measured at p = 8,746" in text
  assert "- `certificate_host`:" in text and "- `pretrain_augment`:" in text
  only = _cli("plan", "--modes=linearized", "--groups=cifar10").stdout
  assert "| linearised |" in only and "| standard |" not in only


def test_plan_counts_cg_at_its_cap_or_the_iterations_given(monkeypatch):
  """A linearised job set to cg counts cg's iteration cap 2·min(p, n·C) + 200 (an upper
  bound) of a jvp and a vjp (~4 forward passes) per image of D, or `cg_iters`."""
  job = next(j for j in repro.sweep.grid(("cifar10",), seeds=(0,), modes=("linearized",))
             if j.model == "mobilenetv2" and j.ipc == 100)
  load = repro._cfg  # pylint: disable=protected-access

  def with_cg(j):
    cfg = load(j)
    cfg.finetune.linearized_solver = "cg"
    return cfg

  monkeypatch.setattr(repro, "_cfg", with_cg)
  f = 0.181e9 * 1e-12
  cap = 2 * min(repro.TRAINABLE["mobilenetv2"](10), 1000 * 10) + 200
  assert repro.job_stages(job)[0]["full"] == pytest.approx(cap * 1000 * 4 * f)
  assert repro.job_stages(job, cg_iters=100)[0]["full"] == pytest.approx(100 * 1000 * 4 * f)


@pytest.mark.parametrize("command", ["plan", "tables"])
@pytest.mark.parametrize("modes", ["exact", "standard,linear", ""])
def test_a_bad_mode_is_one_line_naming_the_modes(command, modes, tmp_path):
  args = [command, f"--modes={modes}"] + ([str(tmp_path)] if command == "tables" else [])
  proc = _cli(*args)
  assert proc.returncode == 2 and proc.stdout == ""
  last = proc.stderr.strip().splitlines()[-1]
  assert "argument --modes: " in last and "standard,linearized" in last, last


def test_trainable_counts_are_the_models():
  """The plan's p per network (configs' docstrings) against the models' own counts."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fastntk_jax.models import get_model  # pylint: disable=g-import-not-at-top
  from fastntk_jax.models import trainable as tr  # pylint: disable=g-import-not-at-top
  for name, options, size, classes in (("resnet110", {"shortcut": "A"}, 32, 10),
                                       ("mobilenetv2", {}, 32, 10),
                                       ("vit_s16", {"prompt_length": 4}, 224, 20),
                                       ("vit_b16", {"prompt_length": 4}, 224, 20)):
    model = get_model(name, classes, **options)
    variables = jax.eval_shape(lambda m=model, s=size: m.init(jax.random.PRNGKey(0),
                                                              jnp.zeros((1, s, s, 3))))
    assert tr.count_params(tr.split(variables)[0]) == repro.TRAINABLE[name](classes), name


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
  assert "| Metric | | ResNet-110 10/100 standard |" in md
  assert "| Acc on D_f | Fast-NTK | 2.00 ± 0.82 |" in md  # 1.0 + seeds 0,1,2
  assert "| Pre-training test acc (CIFAR-100) | | 71.25 |" in md
  assert "| #Params (trainable) | | 10 (10.00%) |" in md
  data = json.loads((tmp_path / "out" / "tables.json").read_text())
  assert data["paper_table3"]["vit_s16_20_20"]["pretrained"] == [[60.39, 1.27], [72.5, 9.01]]


def _in_mode(results, mode, gap, distance):
  results["config"]["finetune"] = {"mode": mode}
  seeds = results["seeds"]
  for name in ("full", "fastntk"):
    results["methods"][name]["avg_gap"] = _stat([gap + s for s in seeds])
    results["methods"][name]["relative_l2_to_retrain"] = _stat([distance] * len(seeds))
  return results


def test_tables_put_the_modes_side_by_side(tmp_path):
  """Both modes of a grid point from fake results.json files: a column each, side by side,
  with the field's Avg. Gap and distance to Retrain; Table III with the paper's numbers
  beside each mode; --modes keeps one; a mode without results is a one-line error."""
  runs = tmp_path / "runs"
  for mode, gap, dist in (("standard", 12.0, 0.3), ("linearized", 0.0, 2e-7)):
    _write(runs / f"r110_{mode}",
           _in_mode(_results("resnet110", "cifar10", 10, 100, [0, 1, 2], 0.0), mode, gap, dist))
    _write(runs / f"vits_{mode}",
           _in_mode(_with_probes(_results("vit_s16", "imagenet_r", 20, 20, [0], 0.0),
                                 0 if mode == "standard" else 10), mode, gap, dist))
  proc = _cli("tables", str(runs), f"--out={tmp_path / 'both'}")
  assert proc.returncode == 0, proc.stderr
  md = (tmp_path / "both" / "tables.md").read_text()
  assert "| Metric | | ResNet-110 10/100 standard | ResNet-110 10/100 linearised |" in md
  assert ("| Avg. Gap to Retrain (UA, RA, TA, MIA-Efficacy) | Fast-NTK | 13.00 ± 0.82 | "
          "1.00 ± 0.82 |") in md
  assert "| ‖w − w_r‖ / ‖w_r − w0‖ | Fast-NTK | 0.3 ± 0 | 2e-07 ± 0 |" in md
  assert "| ‖w − w_r‖ / ‖w_r − w0‖ | Retrain |" not in md  # zero by definition
  # Table III: a column per setting and mode, the paper's value beside each.
  assert "| Acc on | Backbone | ViT-S/16 20/20 standard | ViT-S/16 20/20 linearised |" in md
  assert ("| D_r | Pre-Trained | 58.00 ± 0.00 (paper 60.39 ± 1.27) | 68.00 ± 0.00 (paper 60.39 ± 1.27) |"
          in md)
  merged = json.loads((tmp_path / "both" / "tables.json").read_text())
  assert merged["modes"] == ["standard", "linearized"]
  assert sorted(p["mode"] for p in merged["points"]) == ["linearized"] * 2 + ["standard"] * 2
  one = _cli("tables", str(runs), f"--out={tmp_path / 'lin'}", "--modes=linearized")
  assert one.returncode == 0, one.stderr
  md = (tmp_path / "lin" / "tables.md").read_text()
  assert "ResNet-110 10/100 linearised" in md and "ResNet-110 10/100 standard" not in md
  _write(tmp_path / "only_lin",
         _in_mode(_results("resnet110", "cifar10", 10, 100, [0], 0.0), "linearized", 0.0, 1e-7))
  none = _cli("tables", str(tmp_path / "only_lin"), "--modes=standard")
  assert none.returncode == 2 and none.stdout == ""
  assert none.stderr.strip() == (
      f"reproduce: error: no results in mode(s) ['standard'] under ['{tmp_path / 'only_lin'}'] "
      "(found: ['linearized']); pass --modes=linearized")


def test_run_is_the_sweep_with_the_shared_pretraining(tmp_path):
  proc = _cli("run", "--dry-run", f"--root={tmp_path}", "--models=resnet110", "--seeds=0,1",
              "--cifar-ipc=100", "--python=python")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()[1:]
  assert len(lines) == 4  # both modes by default, one backbone for all
  for line in lines:
    assert f"--config.pretrain.cache_dir={tmp_path}/pretrain_cache" in line
  assert [l.split("--workdir=")[1].split()[0] for l in lines] == [
      f"{tmp_path}/resnet110_cifar10_c10_ipc100_{m}_s{s}"
      for m in ("standard", "linearized") for s in (0, 1)]
  assert sum(":ipc=100,linearized " in l for l in lines) == 2
  one = _cli("run", "--dry-run", f"--root={tmp_path}", "--models=resnet110", "--seeds=0",
             "--cifar-ipc=100", "--python=python", "--modes=standard")
  assert len(one.stdout.splitlines()[1:]) == 1 and "_standard_s0" in one.stdout


def test_the_plan_counts_the_released_models_bn_recomputation_in_standard_mode():
  """In standard mode with train-mode BN (the CNN configs) every released model's running
  statistics are recomputed (`finetune.release_bn_stats`): a stage of the plan; none in
  linearised mode, whose models keep the pre-trained statistics."""
  jobs = repro.sweep.grid(("cifar10",), seeds=(0,), cifar_ipc=(100,),
                          models=("resnet110",), modes=("standard", "linearized"))
  by_mode = {job.mode: repro.job_stages(job)[0] for job in jobs}
  assert by_mode["standard"]["bn_recompute"] > 0
  assert "bn_recompute" not in by_mode["linearized"]
  assert "bn_recompute" in repro.STAGES


def test_tables_name_the_results_they_leave_out(tmp_path):
  """Results of no paper table (e.g. the paper's configs on digits) are named, not dropped
  silently: listed at the end of tables.md beside the placed ones, an error when none has
  a place."""
  runs = tmp_path / "runs"
  _write(runs / "r110_digits_standard",
         _in_mode(_results("resnet110", "digits", 10, 100, [0], 0.0), "standard", 1.0, 0.1))
  proc = _cli("tables", str(runs), f"--out={tmp_path / 'out'}")
  assert proc.returncode == 2 and "resnet110 on digits" in proc.stderr, proc.stderr
  _write(runs / "r110_cifar_standard",
         _in_mode(_results("resnet110", "cifar10", 10, 100, [0], 0.0), "standard", 1.0, 0.1))
  proc = _cli("tables", str(runs), f"--out={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr
  assert "resnet110 on digits" in proc.stderr
  md = (tmp_path / "out" / "tables.md").read_text()
  assert "## Results in no table of the paper" in md and "r110_digits_standard" in md
