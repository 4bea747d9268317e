"""The main job end to end in its tiny mode, resumption, and config refusals."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastntk_jax import config as config_lib
from fastntk_jax import pipeline
from fastntk_jax import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.py")


def tiny():
  return config_lib.load_config_file(DEFAULT + ":tiny")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny"))
  results = pipeline.run(tiny(), workdir, show_progress=False)
  return workdir, results


def test_outputs_exist_and_hold_sane_values(tiny_run):
  workdir, results = tiny_run
  for name in ("results.json", "results.md", "accuracy.png", "relearn.png", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert os.listdir(os.path.join(workdir, "tb")), "no TensorBoard logs"
  with open(os.path.join(workdir, "results.json")) as f:
    stored = json.load(f)
  assert set(stored["methods"]) == {"full", "retrain", "fastntk", "max_loss", "random_label"}
  for name, entry in stored["methods"].items():
    for key in ("acc_retain", "acc_forget", "acc_test_retain", "acc_test_forget"):
      assert 0.0 <= entry[key]["mean"] <= 100.0, (name, key)
    assert 1 <= entry["relearn_epochs"]["mean"] <= 3  # the tiny config's cap
    assert "sgd(lr=0.01" in entry["relearn_protocol"]
  # Retrain never saw the forget class: it cannot predict it (the head has no signal for it).
  assert stored["methods"]["retrain"]["acc_forget"]["mean"] == 0.0
  m = stored["model"]
  assert m["trainable_params"] == 156 and 0 < m["trainable_percent"] < 100
  assert set(stored["linear_probe"]) == {"pretrained", "random_init", "fastntk"}
  assert stored["versions"]["neural-tangents"] == "0.6.5"
  diag = stored["timing"]["fastntk_diagnostics"]["0"]
  assert diag["solver"] in ("dual", "primal", "cg") and diag["num_params"] == 156
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| Fast-NTK |" in table and "Linear probing" in table


def test_rerun_resumes_and_gives_identical_results(tiny_run):
  workdir, results = tiny_run
  again = pipeline.run(tiny(), workdir, show_progress=False)  # every stage restored from disk
  strip = lambda r: {k: v for k, v in r.items() if k not in ("timing", "machine")}
  assert json.dumps(strip(again), sort_keys=True) == json.dumps(strip(results), sort_keys=True)


def test_workdir_of_another_config_is_refused(tiny_run):
  workdir, _ = tiny_run
  other = tiny()
  other.unlearn.damping = 0.5
  before = open(os.path.join(workdir, "results.json")).read()
  with pytest.raises(wd.WorkdirConflictError, match="unlearn.damping"):
    pipeline.run(other, workdir, show_progress=False)
  assert open(os.path.join(workdir, "results.json")).read() == before


@pytest.mark.parametrize("mutate,message", [
    (lambda c: setattr(c.unlearn, "solver", "svd"), "config.unlearn.solver='svd'"),
    (lambda c: setattr(c.finetune, "loss", "hinge"), "config.finetune.loss='hinge'"),
    (lambda c: setattr(c.finetune, "epochs", -1), "config.finetune.epochs=-1"),
    (lambda c: setattr(c.model, "name", "resnet7"), "config.model.name='resnet7'"),
    (lambda c: setattr(c, "seeds", ()), "config.seeds"),
    (lambda c: setattr(c.unlearn, "damping", -1.0), "config.unlearn.damping=-1.0"),
    (lambda c: setattr(c.data, "forget_classes", [7]), "forget_classes"),
])
def test_invalid_config_values_are_rejected(mutate, message):
  cfg = tiny()
  cfg.unlock()
  mutate(cfg)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
    config_lib.validate(cfg)


def test_wrong_type_is_rejected_at_assignment():
  cfg = tiny()
  with pytest.raises(TypeError, match="damping"):
    cfg.unlearn.damping = "big"  # ConfigDict keeps each field's type


def test_unknown_config_key_is_rejected():
  cfg = tiny()
  with pytest.raises(AttributeError, match="damp"):
    cfg.unlearn.damp = 1.0  # locked: a typo fails at assignment
  cfg.unlock()
  cfg.unlearn.damp = 1.0
  with pytest.raises(ValueError, match="unknown config key 'unlearn.damp'"):
    config_lib.validate(cfg)


def test_cli_bad_config_gives_one_line_error_and_nonzero_exit(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from fastntk_jax.config import base_config\n"
                 "def get_config():\n  c = base_config()\n  c.unlock()\n"
                 "  c.unlearn.solver = 'svd'\n  return c\n")
  proc = subprocess.run([sys.executable, "-m", "fastntk_jax.main", f"--config={bad}",
                         f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)
  assert proc.returncode == 2
  assert "fastntk_jax: error: config.unlearn.solver='svd'" in proc.stderr
  assert "Traceback" not in proc.stderr
