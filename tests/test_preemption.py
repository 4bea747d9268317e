"""A run SIGKILLed in the middle of every stage resumes and ends bit-identical.

The main job runs as a real subprocess (the CLI); `FASTNTK_KILL_AT=<point>` makes it
SIGKILL itself at that point (fastntk_jax/faults.py), exactly like a preempted batch job.
One workdir is killed at successively later points — mid pre-training, mid Full
fine-tuning, mid Retrain, mid Gram accumulation of the Fast-NTK update, mid Max Loss, mid
Random Label, during evaluation — and restarted with the same command each time; the final
results.json must equal an uninterrupted run's (timing and machine fields aside).
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    "--config=configs/default.py:tiny,standard",  # SGD fine-tuning: its epochs are kill points
    "--config.unlearn.solver=primal",        # the chunked, resumable Gram path
    "--config.unlearn.checkpoint_rows=8",    # 18 retain samples -> 3 chunks
    "--config.pretrain.train.epochs=3",
    "--config.finetune.epochs=3",
    "--config.baselines.max_loss.epochs=2",
    "--config.baselines.random_label.epochs=2",
    "--noprogress",
]
KILL_POINTS = [
    "pretrain:epoch1",
    "seed0/full:epoch1",
    "seed0/retrain:epoch0",
    "seed0/fastntk:gram_retain_chunk1",
    "seed0/max_loss:epoch0",
    "seed0/random_label:epoch0",
    "seed0/eval:fastntk",
]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent XLA cache shared by the runs: restarts skip recompilation (58 s -> 16 s
  per tiny run here); the compiled programs, hence the numbers, are the same."""
  return str(tmp_path_factory.mktemp("xla_cache"))


def run_cli(workdir, kill_at=None, cache=None):
  env = dict(os.environ)
  env.pop("FASTNTK_KILL_AT", None)
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  if kill_at:
    env["FASTNTK_KILL_AT"] = kill_at
  return subprocess.run([sys.executable, "-m", "fastntk_jax.main", f"--workdir={workdir}",
                         *FLAGS], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)



def comparable(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  res.pop("timing")
  res.pop("machine")
  return res


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compile_cache):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  proc = run_cli(workdir, cache=compile_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return comparable(workdir)


EVIDENCE = {  # the periodic checkpoint each restart resumes from is there
    "pretrain:epoch1": "pretrain.partial",
    "seed0/full:epoch1": "seed_0/full.partial",
    "seed0/fastntk:gram_retain_chunk1": "seed_0/fastntk_gram_retain.state",
}
SNAPSHOT_AT = "seed0/full:epoch1"  # the corrupt-checkpoint test starts from a copy made here


@pytest.fixture(scope="module")
def killed(tmp_path_factory, compile_cache):
  """One workdir killed at every point in turn, then run to the end; what each run did, and a
  copy of the workdir as the kill at SNAPSHOT_AT left it (the corrupt-checkpoint test resumes
  from it instead of running pre-training and Full's first epoch again)."""
  base = tmp_path_factory.mktemp("killed")
  workdir, snapshot = str(base / "killed"), str(base / "snapshot")
  kills = []
  for point in KILL_POINTS:
    proc = run_cli(workdir, kill_at=point, cache=compile_cache)
    kills.append((point, proc.returncode, proc.stderr[-2000:],
                  os.path.exists(os.path.join(workdir, "results.json")),
                  point not in EVIDENCE or os.path.exists(os.path.join(workdir, EVIDENCE[point]))))
    if point == SNAPSHOT_AT:
      shutil.copytree(workdir, snapshot)
  final = run_cli(workdir, cache=compile_cache)
  return workdir, kills, final, snapshot


def test_killed_at_every_stage_resumes_to_identical_results(reference, killed):
  workdir, kills, final, _ = killed
  assert [k[0] for k in kills] == KILL_POINTS
  for point, returncode, stderr, has_results, has_evidence in kills:
    assert returncode == -signal.SIGKILL, (point, returncode, stderr)
    assert not has_results, point
    assert has_evidence, point
  assert final.returncode == 0, final.stderr[-3000:]
  assert json.dumps(comparable(workdir), sort_keys=True) == json.dumps(reference, sort_keys=True)
  # Completed stages cleaned up their periodic checkpoints.
  leftovers = [f for f in os.listdir(os.path.join(workdir, "seed_0"))
               if f.endswith((".partial", ".state"))]
  assert not leftovers, leftovers


def test_corrupt_periodic_checkpoint_is_discarded_not_trusted(reference, killed, compile_cache,
                                                              tmp_path):
  _, kills, _, snapshot = killed
  assert dict((k[0], k[1]) for k in kills)[SNAPSHOT_AT] == -signal.SIGKILL
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(snapshot, workdir)  # as the SIGKILL at seed0/full:epoch1 left it
  partial = os.path.join(workdir, "seed_0", "full.partial")
  with open(partial, "r+b") as f:  # flip bytes in the payload: the checksum must catch it
    f.seek(100)
    f.write(b"\x00\xff" * 8)
  proc = run_cli(workdir, cache=compile_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "failed checksum verification" in proc.stderr
  assert json.dumps(comparable(workdir), sort_keys=True) == json.dumps(reference, sort_keys=True)
