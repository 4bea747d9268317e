"""The device check (`python -m fastntk_jax.devices`) and the accelerator install script.

On this project's CPU machines the check must say clearly that there is no accelerator and,
with --require-accelerator, exit non-zero; the install script's commands are checked in its
--dry-run mode (no GPU or TPU was available where these tests were written).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fastntk_jax import devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASH = shutil.which("bash")


def check(*args):
  return subprocess.run([sys.executable, "-m", "fastntk_jax.devices", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cpu_report():
  proc = check("--json")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout)
  if report["accelerator"]:
    pytest.skip(f"this machine has an accelerator: {report['platforms']}")
  return report


def test_json_report_on_cpu(cpu_report):
  assert cpu_report["platforms"] == ["cpu"] and cpu_report["backend"] == "cpu"
  assert cpu_report["devices"][0]["platform"] == "cpu"
  assert cpu_report["check"].startswith("512x512 matmul on cpu:0: 512 (expected 512)")
  assert cpu_report["diagnosis"][0] == "No accelerator: JAX sees only cpu devices."
  assert cpu_report["jax"] and cpu_report["jaxlib"]


def test_text_report_says_no_accelerator_and_exits_0(cpu_report):
  proc = check()
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "cpu:0" in proc.stdout and "No accelerator: JAX sees only cpu devices." in proc.stdout
  assert proc.stdout.startswith("jax ")


@pytest.mark.parametrize("flag", ["--require-accelerator", "--require-platform=gpu",
                                  "--require-platform=tpu"])
def test_require_accelerator_fails_clearly_on_cpu(cpu_report, flag):
  proc = check(flag)
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  errors = proc.stderr.strip().splitlines()
  assert len(errors) == 1 and errors[0].startswith("fastntk_jax.devices: error: no "), errors
  assert "JAX sees: cpu" in errors[0]


def test_require_cpu_passes(cpu_report):
  assert check("--require-platform=cpu").returncode == 0


def _report(**kw):
  base = dict(jax="0.10.2", jaxlib="0.10.2", plugins={}, backend="cpu",
              devices=[{"id": 0, "platform": "cpu", "kind": "cpu", "process": 0}],
              platforms=["cpu"], backend_messages=[], nvidia_driver=False, check="ok")
  return devices.Report(**{**base, **kw})


def test_diagnosis_names_the_likely_cause():
  no_plugin = devices.diagnosis(_report(nvidia_driver=True))
  assert "No JAX accelerator plugin is installed" in no_plugin[1]
  assert any("NVIDIA driver is present" in l for l in no_plugin)
  assert any("install_accelerator.sh cuda12" in l for l in no_plugin)
  no_driver = devices.diagnosis(_report(plugins={"jax-cuda12-plugin": "0.10.2"}))
  assert "no NVIDIA driver was found" in no_driver[1]
  not_started = devices.diagnosis(_report(
      plugins={"jax-cuda12-plugin": "0.5.2"}, nvidia_driver=True,
      backend_messages=["Unable to initialize backend 'cuda': version mismatch"]))
  assert "must match jaxlib 0.10.2" in not_started[1]
  assert not_started[-1] == "JAX: Unable to initialize backend 'cuda': version mismatch"
  gpu = _report(platforms=["gpu"], devices=[{"id": 0, "platform": "gpu", "kind": "H200",
                                             "process": 0, "memory_gib": 139.0}])
  assert gpu.accelerator and devices.diagnosis(gpu) == []
  assert "gpu:0  H200  (process 0, 139.0 GiB)" in devices.format_report(gpu)
  assert devices.format_report(gpu).endswith("Accelerator found: gpu.")


def test_importing_the_module_does_not_start_jax():
  code = "import sys, fastntk_jax.devices; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.stdout.strip() == "False", out.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# launch/install_accelerator.sh
# --------------------------------------------------------------------------------------------


def pinned_jax(stack: str) -> str:
  with open(os.path.join(ROOT, "constraints", f"{stack}.txt")) as f:
    return next(l.split("==")[1].strip() for l in f if l.startswith("jax=="))


def install(*args, **env):
  return subprocess.run([BASH, "launch/install_accelerator.sh", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60,
                        env={k: v for k, v in {**os.environ, **env}.items() if v is not None})


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("kind,stack,extras,expected_install,platform", [
    ("cuda12", "lean", None, "-e . 'jax[cuda12]=={v}' -c constraints/lean.txt", "gpu"),
    ("cuda13", "lean", None, "-e . 'jax[cuda13]=={v}' -c constraints/lean.txt", "gpu"),
    ("cuda12", "lean", "tfds", "-e '.[tfds]' 'jax[cuda12]=={v}' -c constraints/lean.txt", "gpu"),
    ("cuda12", "nt", None, "-e '.[nt,tfds]' 'jax[cuda12]=={v}' -c constraints/nt.txt", "gpu"),
    ("tpu", "lean", None, "-e . 'jax[tpu]=={v}' -c constraints/lean.txt", "tpu"),
])
def test_install_script_upgrades_pip_installs_the_stacks_jax_build_and_checks(
    kind, stack, extras, expected_install, platform):
  proc = install(kind, "--dry-run", STACK=stack, EXTRAS=extras, PYTHON="python")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
      "python -m pip install --upgrade pip",
      "python -m pip install " + expected_install.format(v=pinned_jax(stack)),
      f"python -m fastntk_jax.devices --require-platform={platform}",
  ]


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("args,env,message", [
    ([], {}, "name the accelerator"),
    (["rocm"], {}, "unknown argument 'rocm'"),
    (["cuda13"], {"STACK": "nt"}, "has no cuda13 build"),
    (["tpu"], {"STACK": "gpu"}, "STACK=gpu has no constraints/gpu.txt"),
    (["cuda12", "tpu"], {}, "one accelerator at a time, got cuda12 and tpu"),
], ids=["no-kind", "unknown-kind", "nt-cuda13", "unknown-stack", "two-kinds"])
def test_install_script_refuses_clearly(args, env, message):
  proc = install(*args, "--dry-run", **env)
  assert proc.returncode == 2 and message in proc.stderr and not proc.stdout, proc.stderr


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_install_script_help_is_its_header_comment():
  proc = install("--help")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("# Installs fastntk_jax") and all(l.startswith("#") for l in lines)
