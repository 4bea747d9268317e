"""A run stopped in the middle of every stage resumes and ends bit-identical (the end-to-end
tier).

`faults.maybe_kill(<point>)` marks the points. In-process, `faults.raise_at(<point>)` stops a
run there (`faults.Killed`); one workdir is stopped at successively later points — mid
pre-training, mid Full fine-tuning, mid Retrain, mid Gram accumulation of the Fast-NTK update,
mid Max Loss, mid Random Label, during evaluation — and restarted each time; the final
results.json must equal an uninterrupted run's (timing and machine fields aside). One real
preemption, a SIGKILL of the CLI in a subprocess (`FASTNTK_KILL_AT`, no cleanup of any kind,
a checkpoint write in flight), resumes to the same numbers too, its log our own lines.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_config
from optional import HAS_NEURAL_TANGENTS
from test_cli import assert_our_own_log

from fastntk_jax import faults
from fastntk_jax.experiment import run as run_lib

pytestmark = pytest.mark.slow

# SGD fine-tuning (its epochs are kill points) and the chunked, resumable Gram path.
FIELDS = {("unlearn", "solver"): "primal",
          ("unlearn", "checkpoint_rows"): 8,     # 18 retain samples -> 3 chunks
          ("pretrain", "train", "epochs"): 3,
          ("finetune", "epochs"): 3,
          ("baselines", "max_loss", "epochs"): 2,
          ("baselines", "random_label", "epochs"): 2,
          # neural-tangents named where it is installed (the nt stack): TensorFlow is imported,
          # and the command line's log must stay free of its chatter (the primal ignores it).
          ("unlearn", "kernel_impl"): "neural_tangents" if HAS_NEURAL_TANGENTS else "auto"}
KILL_POINTS = [
    "pretrain:epoch1",
    "seed0/full:epoch1",
    "seed0/retrain:epoch0",
    "seed0/fastntk:gram_retain_chunk1",
    "seed0/max_loss:epoch0",
    "seed0/random_label:epoch0",
    "seed0/eval:fastntk",
]
EVIDENCE = {  # the periodic checkpoint each restart resumes from is there
    "pretrain:epoch1": "pretrain.partial",
    "seed0/full:epoch1": "seed_0/full.partial",
    "seed0/fastntk:gram_retain_chunk1": "seed_0/fastntk_gram_retain.state",
}
SNAPSHOT_AT = "seed0/full:epoch1"  # the corrupt-checkpoint test starts from a copy made here


def config():
  cfg = tiny_config("tiny,standard")
  with cfg.unlocked():
    for path, value in FIELDS.items():
      node = cfg
      for key in path[:-1]:
        node = node[key]
      node[path[-1]] = value
  return cfg


def comparable(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  res.pop("timing")
  res.pop("machine")
  return json.dumps(res, sort_keys=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  run_lib.run(config(), workdir, show_progress=False)
  return comparable(workdir)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
  """One workdir stopped at every point in turn, then run to the end; what each stop left,
  and a copy of the workdir as the stop at SNAPSHOT_AT left it."""
  base = tmp_path_factory.mktemp("killed")
  workdir, snapshot = str(base / "killed"), str(base / "snapshot")
  stops = []
  for point in KILL_POINTS:
    with faults.raise_at(point), pytest.raises(faults.Killed) as e:
      run_lib.run(config(), workdir, show_progress=False)
    stops.append((point, str(e.value), os.path.exists(os.path.join(workdir, "results.json")),
                  point not in EVIDENCE or os.path.exists(os.path.join(workdir, EVIDENCE[point]))))
    if point == SNAPSHOT_AT:
      shutil.copytree(workdir, snapshot)
  run_lib.run(config(), workdir, show_progress=False)
  return workdir, stops, snapshot


def test_stopped_at_every_stage_resumes_to_identical_results(reference, killed):
  workdir, stops, _ = killed
  assert [s[0] for s in stops] == KILL_POINTS
  for point, where, has_results, has_evidence in stops:
    assert where == point
    assert not has_results, point
    assert has_evidence, point
  assert comparable(workdir) == reference
  # Completed stages cleaned up their periodic checkpoints.
  leftovers = [f for f in os.listdir(os.path.join(workdir, "seed_0"))
               if f.endswith((".partial", ".state"))]
  assert not leftovers, leftovers


def test_corrupt_periodic_checkpoint_is_discarded_not_trusted(reference, killed, tmp_path,
                                                              caplog):
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(killed[2], workdir)  # as the stop at seed0/full:epoch1 left it
  with open(os.path.join(workdir, "seed_0", "full.partial"), "r+b") as f:
    f.seek(100)  # flip bytes in the payload: the checksum must catch it
    f.write(b"\x00\xff" * 8)
  with caplog.at_level(logging.WARNING, logger="fastntk_jax.workdir"):
    run_lib.run(config(), workdir, show_progress=False)
  assert "failed checksum verification" in caplog.text
  assert comparable(workdir) == reference


def test_a_sigkilled_cli_run_resumes_to_identical_results(reference, tmp_path):
  """A real preemption: SIGKILL while the Gram chunk's checkpoint is written in the
  background, then the same command again."""
  workdir = str(tmp_path / "w")
  flags = ["--config=configs/default.py:tiny,standard", "--noprogress", f"--workdir={workdir}"]
  flags += [f"--config.{'.'.join(path)}={value}" for path, value in FIELDS.items()]
  env = {**os.environ, faults.ENV: "seed0/fastntk:gram_retain_chunk1"}
  proc = subprocess.run([sys.executable, "-m", "fastntk_jax.main", *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, "seed_0", "fastntk_gram_retain.state"))
  env.pop(faults.ENV)
  proc = subprocess.run([sys.executable, "-m", "fastntk_jax.main", *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert comparable(workdir) == reference
  assert_our_own_log(proc.stderr, "configs/default.py:tiny,standard")
  assert "| Fast-NTK |" in proc.stdout
