"""The two supported stacks stay consistent: setup.cfg's requirements and extras, the pinned
constraints files, the README's two install commands and what .ci/run installs."""

import configparser
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("tensorflow", "tf2jax", "neural-tangents", "tensorflow-datasets")


def _name(requirement: str) -> str:
  return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _setup_cfg():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  lines = lambda text: [l.strip() for l in text.splitlines()
                        if l.strip() and not l.strip().startswith("#")]
  requires = lines(cfg["options"]["install_requires"])
  extras = {k: lines(v) for k, v in cfg["options.extras_require"].items()}
  return requires, extras


def _constraints(stack: str) -> dict:
  with open(os.path.join(ROOT, "constraints", f"{stack}.txt")) as f:
    pins = [l.strip() for l in f if l.strip() and not l.startswith("#")]
  assert all("==" in p for p in pins), pins
  return {_name(p): p.split("==", 1)[1] for p in pins}


def test_core_requirements_hold_no_tensorflow_or_neural_tangents():
  requires, extras = _setup_cfg()
  assert not [r for r in requires if _name(r) in HEAVY], requires
  assert {"nt", "tfds", "test"} <= set(extras)
  assert {_name(r) for r in extras["tfds"]} >= {"tensorflow-datasets", "tensorflow"}
  assert "neural-tangents==0.6.5" in extras["nt"]


def test_lean_constraints_pin_every_requirement_and_no_heavy_package():
  requires, extras = _setup_cfg()
  lean = _constraints("lean")
  assert not [p for p in lean if p in HEAVY], sorted(lean)
  missing = [r for r in requires + extras["test"] if _name(r) not in lean]
  assert not missing, missing
  assert lean["jax"] == lean["jaxlib"]


def test_nt_constraints_match_the_nt_extras_pins():
  requires, extras = _setup_cfg()
  nt = _constraints("nt")
  for requirement in extras["nt"]:
    name, _, version = requirement.partition("==")
    assert nt[_name(name)] == version, (requirement, nt.get(_name(name)))
  missing = [r for r in requires + extras["tfds"] + extras["test"] if _name(r) not in nt]
  assert not missing, missing


def test_readme_commands_and_ci_install_the_same_stacks():
  readme = open(os.path.join(ROOT, "README.md")).read()
  first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
  commands = [l for l in first_block.splitlines() if l and not l.startswith("#")]
  assert "pip install -e . -c constraints/lean.txt &&" in commands[0]
  assert "pip install -e '.[nt,tfds,test]' -c constraints/nt.txt &&" in commands[1]
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert 'run_stack lean ".[test]" constraints/lean.txt' in ci
  assert 'run_stack nt ".[nt,tfds,test]" constraints/nt.txt' in ci
  assert "python -m pytest -q tests" in ci


def test_ci_venvs_and_logs_are_ignored():
  ignored = open(os.path.join(ROOT, ".gitignore")).read().split()
  assert {"/.ci-venv-*/", "/.ci-*.log", ".venv/", ".venv-*/"} <= set(ignored)


def test_constraints_say_which_pythons_they_install_on():
  # setup.cfg allows Python 3.10, but numpy 2.4.6 (both files) and jax 0.10.2 (lean) have no
  # 3.10 wheels: the README's commands fail there with pip's bare "No matching distribution".
  cfg = open(os.path.join(ROOT, "setup.cfg")).read()
  assert "python_requires = >=3.10," in cfg
  for stack in ("lean", "nt"):
    assert _constraints(stack)["numpy"] == "2.4.6"
    with open(os.path.join(ROOT, "constraints", f"{stack}.txt")) as f:
      header = " ".join(l for l in f if l.startswith("#"))
    assert "Installs on Python 3.11 and 3.12 only" in header and "on 3.10" in header, header
  build = open(os.path.join(ROOT, "BUILD.md")).read()
  assert "install on Python 3.11 and 3.12 only" in build and "on Python 3.10" in build
