"""The main job end to end (the end-to-end tier): the shared tiny run's outputs, resumption,
a sample-level run, a served request, and the embedded default's forgetting."""

import json
import os

import pytest
from conftest import DEFAULT, copy_run, shared_tiny_config, tiny_config

from fastntk_jax import config as config_lib
from fastntk_jax import workdir as wd
from fastntk_jax.experiment import run as run_lib
from fastntk_jax.experiment.methods import fastntk

pytestmark = pytest.mark.slow


def tiny():
  return tiny_config()


def test_outputs_exist_and_hold_sane_values(tiny_run):
  workdir, results = tiny_run
  for name in ("results.json", "results.md", "accuracy.png", "relearn.png", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert os.listdir(os.path.join(workdir, "tb")), "no TensorBoard logs"
  with open(os.path.join(workdir, "results.json")) as f:
    stored = json.load(f)
  assert set(stored["methods"]) == set(config_lib.DEFAULT_METHODS)
  counts = stored["data"]["counts"]
  splits = {"acc_retain": "retain", "acc_forget": "forget", "acc_test_retain": "test_retain",
            "acc_test_forget": "test_forget"}
  for name, entry in stored["methods"].items():
    for key, split in splits.items():
      # An accuracy over a split of n images is k/n for an integer k (padded rows excluded).
      for seed, value in entry["per_seed"].items():
        correct = value[key] * counts[split] / 100.0
        assert abs(correct - round(correct)) < 1e-6 and 0 <= round(correct) <= counts[split], (
            name, key, seed, value[key])
    assert 1 <= entry["relearn_epochs"]["mean"] <= 3  # the tiny config's cap
    assert "sgd(lr=0.01" in entry["relearn_protocol"]
  # Retrain never saw the forget class: it cannot predict it (the head has no signal for it).
  assert stored["methods"]["retrain"]["acc_forget"]["mean"] == 0.0
  m = stored["model"]
  assert m["trainable_params"] == 156 and 0 < m["trainable_percent"] < 100
  assert set(stored["linear_probe"]) == {"pretrained", "random_init", "fastntk"}
  from importlib import metadata
  from fastntk_jax import ntk
  expected = metadata.version("neural-tangents") if ntk.neural_tangents_available() else None
  assert stored["versions"]["neural-tangents"] == expected
  assert stored["seeds"] == [0, 1]
  assert [stored["methods"][m]["label"] for m in ("fastntk", "max_loss", "random_label")] == [
      "Fast-NTK", "Max Loss", "Random Label"]
  diag = stored["timing"]["fastntk_diagnostics"]["0"]
  assert diag["solver"] in ("dual", "primal", "cg") and diag["num_params"] == 156
  # The first seed compiles the Gram statistics it shares with Full/Retrain: reported apart
  # from the update's time (results.md says the time excludes compilation; it was 0.0).
  assert diag["compile_seconds"] > 0 and diag["seconds"] > 0
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| Fast-NTK |" in table and "Linear probing" in table
  # The plug-in example (docs/plugins.md): in every table, from its module and block alone.
  assert table.count("| FT |") >= 3 and stored["methods"]["ft"]["label"] == "FT"


def test_sample_level_run_with_a_single_forget_sample(tmp_path):
  """`:tiny,samples` forgets 1 sample: the loss attack (it cross-validates over >= 2 per side)
  is left out (None) instead of stopping the run; Fast-NTK still equals Retrain."""
  cfg = config_lib.load_config_file(DEFAULT + ":tiny,samples")
  with cfg.unlocked():
    cfg.methods = ("full", "retrain", "fastntk")
  out = run_lib.run(cfg, str(tmp_path), show_progress=False)
  assert out["data"]["counts"]["forget"] == 1
  res = out["methods"]
  assert res["fastntk"]["mia_accuracy"]["mean"] is None
  assert res["fastntk"]["ua"]["mean"] == res["retrain"]["ua"]["mean"]
  assert res["fastntk"]["relative_l2_to_retrain"]["mean"] < 1e-6


def test_served_request_equals_the_one_shot_update(tiny_run, tmp_path):
  """unlearn.serve: D_f forgotten as a request on the persisted state of D gives the one-shot
  update's parameters (float64); the diagnostics give the cold time and the latency apart."""
  # The one-shot side is the shared :tiny run's seed 0 (same data, model, seed and update; its
  # baselines and longer relearn/probe protocols do not touch Fast-NTK's metrics below).
  results = {False: tiny_run[1]}
  cfg = tiny()
  with cfg.unlocked():
    cfg.methods = ("full", "retrain", "fastntk")
    cfg.eval.relearn.epochs = 1
    cfg.eval.probe.epochs = 1
    cfg.unlearn.serve = True
  results[True] = run_lib.run(cfg, str(tmp_path / "serve_True"), show_progress=False)
  served = results[True]["methods"]["fastntk"]
  # The state's Gram is recomputed through the float32 network (the one-shot update reuses
  # the closed-form fine-tuning's): float32 Jacobian rounding x κ, measured 1.1e-6.
  assert served["relative_l2_to_retrain"]["mean"] < 1e-5
  for key in ("ua", "ra", "ta", "mia_efficacy"):
    assert served[key]["mean"] == results[False]["methods"]["fastntk"]["per_seed"]["0"][key], key
  diag = results[True]["timing"]["fastntk_diagnostics"]["0"]
  assert "state of D" in diag["reason"]
  assert diag["cold_seconds"] > 0 and diag["request_seconds"] > 0
  # The cold time's compilation is reported apart (AOT block steps and factorisation).
  assert 0 < diag["cold_compile_seconds"] < diag["cold_seconds"]
  assert diag["jacobian_cache"] is True  # D's rows fit unlearn.jacobian_cache_gib
  assert os.path.exists(tmp_path / "serve_True" / "seed_0" / fastntk.STATE_OF_D)
  text = (tmp_path / "serve_True" / "results.md").read_text()
  assert "Served as a request on the state of D" in text
  # κ of the same matrices as the one-shot primal's (G + λI of D and G_r + λI; its precision
  # warning depends on it), not the stream's lower-bound estimate, which is kept apart (29x
  # below κ on :tiny,standard). G_r + λI's alone was 28% below the one-shot's.
  one_shot = results[False]["timing"]["fastntk_diagnostics"]["0"]
  assert one_shot["solver"] == "primal"
  # The state's G comes from the float32 network, the one-shot's from the fine-tuning's Grams.
  assert diag["condition_number"] == pytest.approx(one_shot["condition_number"], rel=1e-2)
  assert diag["condition_estimate"] * 10 < diag["condition_number"]
  assert "condition number ≥" not in text


def test_fastntk_forgets_what_full_fine_tuning_learned(tmp_path):
  """On the embedded default (one seed, baselines off), Full has learned the forget class and
  Fast-NTK removes it as Retrain does, keeping the retained classes."""
  cfg = config_lib.load_config_file(DEFAULT)
  with cfg.unlocked():
    cfg.seeds = (0,)
    cfg.methods = ("full", "retrain", "fastntk")
    cfg.eval.relearn.epochs = 1
    cfg.eval.probe.epochs = 1
    cfg.pretrain.train.epochs = 5
    cfg.eval.population_seeds = 0  # KLoM runs in the shared tiny run (test_linearized.py)
  m = run_lib.run(cfg, str(tmp_path), show_progress=False)["methods"]
  acc = lambda name, key: m[name][key]["mean"]
  assert acc("full", "acc_forget") >= 90.0
  assert acc("retrain", "acc_forget") <= 10.0
  assert acc("fastntk", "acc_forget") <= acc("retrain", "acc_forget") + 10.0
  for key in ("acc_retain", "acc_test_retain"):
    assert abs(acc("fastntk", key) - acc("retrain", key)) <= 3.0, key


def test_rerun_resumes_and_gives_identical_results(tiny_run, tmp_path):
  workdir, results = copy_run(tiny_run, tmp_path / "again"), tiny_run[1]
  again = run_lib.run(shared_tiny_config(), workdir, show_progress=False)  # all restored
  strip = lambda r: {k: v for k, v in r.items() if k not in ("timing", "machine")}
  assert json.dumps(strip(again), sort_keys=True) == json.dumps(strip(results), sort_keys=True)


def test_workdir_of_another_config_is_refused(tiny_run):
  workdir, _ = tiny_run
  other = shared_tiny_config()
  other.unlearn.damping = 0.5
  before = open(os.path.join(workdir, "results.json")).read()
  with pytest.raises(wd.WorkdirConflictError, match="unlearn.damping"):
    run_lib.run(other, workdir, show_progress=False)
  assert open(os.path.join(workdir, "results.json")).read() == before


@pytest.mark.parametrize("solver", ["cg", "dual"])
def test_linearized_fine_tuning_by_cg_or_the_dual_equals_the_closed_form(tiny_run, tmp_path,
                                                                          solver):
  """`finetune.linearized_solver='cg'` (matrix-free) and `'dual'` (the kernel over the set),
  for collections whose p² does not fit, reach the ridge minimisers the closed form solves
  for, and Fast-NTK lands on Retrain."""
  cfg = tiny()
  with cfg.unlocked():
    cfg.finetune.linearized_solver = solver
    cfg.methods = ("full", "retrain", "fastntk")
    cfg.eval.relearn.epochs = 1
    cfg.eval.probe.epochs = 1
  results = run_lib.run(cfg, str(tmp_path), show_progress=False)
  out = results["methods"]
  # cg stops at its tolerance (1e-12 on the recursive residual in float64, the true one at
  # most its square root), and the update's Grams come through the float32 network: 2e-5.
  # The dual's Full, Retrain and update share D's kernel statistics: one linearised model,
  # apart to the float32 params' rounding.
  bound = {"cg": 1e-4, "dual": 1e-6}[solver]
  assert out["fastntk"]["relative_l2_to_retrain"]["mean"] < bound
  reason = results["timing"]["fastntk_diagnostics"]["0"]["reason"]
  assert ("kernel statistics shared" in reason) == (solver == "dual"), reason
  closed = tiny_run[1]["methods"]
  for key in ("ua", "ra", "ta"):  # seed 0 of the shared (closed-form) run
    assert out["fastntk"][key]["mean"] == closed["fastntk"]["per_seed"]["0"][key], key


def test_results_md_states_a_precision_warning_a_capped_relearn_and_the_kernel(tiny_run):
  """What the log said about the solve's precision is in results.md too, for each seed."""
  import copy  # pylint: disable=g-import-not-at-top
  from fastntk_jax.experiment import report  # pylint: disable=g-import-not-at-top
  _, results = tiny_run
  results = copy.deepcopy(results)
  warning = "the primal solve: condition number 1e+12 x float64 epsilon 2.2e-16 = 0.00022"
  results["timing"]["fastntk_diagnostics"]["1"]["precision_warning"] = warning
  results["timing"]["fastntk_diagnostics"]["1"]["certified"] = False
  results["versions"]["neural-tangents"] = None
  text = report.markdown(results)
  assert "Certified (bound ≤ 0.001 of ‖w_r − w0‖): 1 of 2 seed(s)." in text
  assert f"**Precision (seed 1)**: {warning}" in text
  assert "Precision (seed 0)" not in text
  assert "a relearn time equal to the cap is a lower bound" in text
  assert "neural-tangents not installed (the kernel by JAX)" in text


def test_a_certified_release_is_deployed_reported_and_audited(tmp_path, capsys):
  """unlearn.certified: the deployed Fast-NTK model is the noised one, results.md gives the
  accuracy cost per ε, and the audit re-derives σ and the noise and finds the deployed model."""
  from fastntk_jax import audit  # pylint: disable=g-import-not-at-top
  from fastntk_jax.unlearn import release  # pylint: disable=g-import-not-at-top
  cfg = tiny()
  with cfg.unlocked():
    cfg.unlearn.certified = True
    cfg.unlearn.epsilon = 10.0
  workdir = str(tmp_path / "w")
  results = run_lib.run(cfg, workdir, show_progress=False)
  diag = results["timing"]["fastntk_diagnostics"]["0"]
  assert diag["certified"] and diag["release"]["epsilon"] == 10.0
  assert diag["release"]["sigma"] == pytest.approx(release.analytic_sigma(
      diag["certificate"]["distance_bound"], 10.0, 1e-5), rel=1e-12)
  assert set(diag["release_cost"]["by_epsilon"]) == {"0.1", "1", "10"}
  text = open(os.path.join(workdir, "results.md")).read()
  assert "certified release of Fast-NTK" in text and "| ε = 0.1 |" in text
  assert "is the noised one at ε = 10" in text
  assert audit.main(["--workdir", workdir]) == 0
  out = capsys.readouterr().out
  assert "certified, released at (ε = 10, δ = 1e-05)" in out, out
