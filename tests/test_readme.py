"""The README's commands and its API example stay true."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_command():
  first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
  commands = [l for l in first_block.splitlines() if l and not l.startswith("#")]
  assert len(commands) == 2
  assert "python -m fastntk_jax.main" in commands[0]
  test_command = commands[1].split("&&")[-1].strip()
  assert test_command == "python -m pytest -q tests"
  assert test_command in open(os.path.join(ROOT, ".ci", "run")).read()


@pytest.mark.slow
def test_readme_api_example_runs():
  code = re.search(r"## The Python API\n\n```python\n(.*?)```", README, re.S).group(1)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  solver, p, n_out = proc.stdout.split()[:3]
  assert solver == "primal" and int(p) == 147 and int(n_out) == 180
