"""Sharded (8 devices) == single-device results, for every computation in `sharding`.

Two set-ups: one process with 8 fake CPU devices, and two processes with 4 each, joined by
`jax.distributed` (exactly what a multi-host launch does, over gloo CPU collectives).

XLA fixes the number of fake CPU devices when JAX first starts, and other test files in the
same pytest process start JAX first, so the 8-device checks run in a child process
(`python tests/test_sharding.py --child`, with XLA_FLAGS set in its environment). The child
computes each quantity twice, with the sharded function on an 8-device "data" mesh and with
the plain single-device function from `ntk` / `unlearn` / `train`, in float64, and reports
the largest differences as JSON; the tests here assert on them. Row counts (13 retain, 5
forget) are deliberately not multiples of 8: padding and masking are exercised, and with 5
rows three devices hold nothing but padding.
"""

import json
import os
import re
import subprocess
import sys

import pytest

# Children with 8 virtual devices and two processes: the end-to-end tier.
pytestmark = pytest.mark.slow

NUM_DEVICES = 8
TOL = 1e-10  # float64; observed differences are ~1e-15 (summation order only)
_MARKER = "SHARDING_RESULTS="


# --------------------------------------------------------------------------------------
# The child process.
# --------------------------------------------------------------------------------------


def _setup():
  """The tiny model, data and helpers both children use (imports JAX: call it in a child)."""
  import types  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  class Tiny(nn.Module):
    """Dense -> BatchNorm -> tanh -> Dense: tiny, but with BN in both modes."""

    @nn.compact
    def __call__(self, x, train=False):
      h = nn.Dense(6, param_dtype=jnp.float64)(x.reshape(x.shape[0], -1))
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                       param_dtype=jnp.float64)(h)
      return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(h))

  def max_diff(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) and la, (len(la), len(lb))
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
               for u, v in zip(la, lb))

  def scale(a):
    return max(1.0, max(float(np.max(np.abs(np.asarray(u)))) for u in jax.tree_util.tree_leaves(a)))

  model = Tiny()
  num_classes = 3
  rng = np.random.default_rng(0)  # the same numbers in every process
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
  # Non-trivial running statistics, so inference-mode BN is not the identity.
  stats = jax.tree_util.tree_map(lambda a: a + rng.uniform(0.5, 1.0, size=a.shape),
                                 variables["batch_stats"])
  w0 = variables["params"]
  t = types.SimpleNamespace(
      model=model, num_classes=num_classes, stats=stats, w0=w0, max_diff=max_diff,
      scale=scale, apply_fn=lambda w, x: model.apply({"params": w, "batch_stats": stats}, x),
      x_r=rng.normal(size=(13, 5)), y_r=rng.integers(0, num_classes, 13),
      x_f=rng.normal(size=(5, 5)), y_f=rng.integers(0, num_classes, 5),
      params=jax.tree_util.tree_map(lambda a: a + 0.1 * rng.normal(size=a.shape), w0),
      xb=rng.normal(size=(16, 5)), yb=rng.integers(0, num_classes, 16),
      mb=np.concatenate([np.ones(13), np.zeros(3)]))
  return t


def _reference_update(t):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fastntk_jax import unlearn  # pylint: disable=g-import-not-at-top
  return unlearn.ntk_forget(t.apply_fn, t.w0, t.params,
                            retain=(jnp.asarray(t.x_r), jnp.asarray(t.y_r)),
                            forget=(jnp.asarray(t.x_f), jnp.asarray(t.y_f)),
                            num_classes=t.num_classes, damping=1e-2, solver="primal",
                            kernel_impl="jax")


def _sharded_update(t, mesh, *, block_size):
  """The pipeline's route: data-parallel Gram statistics, then `Forgetter.from_gram_stats`."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fastntk_jax import ntk  # pylint: disable=g-import-not-at-top
  from fastntk_jax import sharding as S  # pylint: disable=g-import-not-at-top
  from fastntk_jax import unlearn  # pylint: disable=g-import-not-at-top
  retain = (jnp.asarray(t.x_r), jnp.asarray(t.y_r))
  forget = (jnp.asarray(t.x_f), jnp.asarray(t.y_f))
  forgetter = unlearn.make_forgetter(t.apply_fn, num_classes=t.num_classes, damping=1e-2,
                                     solver="primal", batch_size=block_size)
  plan = forgetter.plan(t.w0, t.params, retain, forget)
  run = S.data_parallel_sum(
      lambda w, x, y, m: ntk.gram_stats(t.apply_fn, w, x, y, num_classes=t.num_classes,
                                            batch_size=block_size, dtype=plan.solve_dtype,
                                            row_weights=m), mesh, block_size=block_size)
  new, _ = forgetter.from_gram_stats(t.params, run(t.w0, t.x_r, t.y_r),
                                     run(t.w0, t.x_f, t.y_f), plan)
  return new


def _train_steps(t, mesh):
  """(single-device step output, sharded step output, the step, its inputs)."""
  from fastntk_jax import sharding as S  # pylint: disable=g-import-not-at-top
  from fastntk_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  spec = train_lib.TrainSpec(epochs=1, learning_rate=0.1, batch_size=16, bn_mode="train")
  tx = train_lib.make_optimizer("sgd", 0.1)
  step = train_lib.make_train_step(t.model, spec, t.num_classes, tx)
  trained = {"params": t.params}
  opt_state = tx.init(trained)
  single = step(trained, opt_state, t.stats, {}, t.xb, t.yb, t.mb)
  sharded = S.sharded_train_step(step, mesh)(trained, opt_state, t.stats, {}, t.xb, t.yb, t.mb)
  return single, sharded, step, (trained, opt_state)


def _child() -> dict:
  import time  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fastntk_jax import ntk  # pylint: disable=g-import-not-at-top
  from fastntk_jax import sharding as S  # pylint: disable=g-import-not-at-top
  from fastntk_jax import unlearn  # pylint: disable=g-import-not-at-top

  t = _setup()
  apply_fn, w0, max_diff, scale = t.apply_fn, t.w0, t.max_diff, t.scale
  num_classes, x_r, y_r = t.num_classes, t.x_r, t.y_r
  mesh = S.make_data_mesh()
  out = {"devices": jax.device_count(), "x64": bool(jax.config.read("jax_enable_x64"))}
  errors = {}
  out["p"] = p = ntk.num_params(w0)

  # Gram statistics (the primal solver's; the pipeline's chunks): the library's own
  # `gram_stats`, run over the mesh by `data_parallel_sum`, with several blocks per device
  # (block_size=1) and one block (None), and with row weights (a padded chunk).
  weights = (np.arange(13) < 10).astype(np.float32)
  stats = lambda bs: (lambda w, x, y, m: ntk.gram_stats(
      apply_fn, w, x, y, num_classes=num_classes, batch_size=bs, dtype=jnp.float64,
      row_weights=m))
  g0, b0 = stats(4)(w0, jnp.asarray(x_r), jnp.asarray(y_r), None)
  gw0, bw0 = stats(4)(w0, jnp.asarray(x_r), jnp.asarray(y_r), jnp.asarray(weights))
  for tag, bs in (("blocks", 1), ("one_block", None)):
    run = S.data_parallel_sum(stats(bs), mesh, block_size=bs)
    g, b = run(w0, x_r, y_r)
    errors[f"gram_G_{tag}"] = max_diff(g, g0) / scale(g0)
    errors[f"gram_b_{tag}"] = max_diff(b, b0) / scale(b0)
    gw, bw = run(w0, x_r, y_r, weights)
    errors[f"gram_weighted_G_{tag}"] = max_diff(gw, gw0) / scale(gw0)
    errors[f"gram_weighted_b_{tag}"] = max_diff(bw, bw0) / scale(bw0)
  out["gram_devices"] = len(g.sharding.device_set)
  out["gram_replicated"] = bool(g.sharding.is_fully_replicated)
  out["gram_stats_weights_matter"] = max_diff(gw, g0) > 1e-3

  # The compiled program: each device sums its own rows into one [1, p, p] block, and the
  # only collectives are the two final all-reduces.
  hlo = S.data_parallel_sum(stats(1), mesh, block_size=1).lower(w0, x_r, y_r).compile().as_text()
  out["hlo_all_reduce"] = len(re.findall(r"all-reduce(?:-start)?\(", hlo))
  out["hlo_all_gather"] = len(re.findall(r"all-gather(?:-start)?\(", hlo))
  # After partitioning, each device's program holds its own [p, p] block (its rows' sum),
  # never the stack of all devices' blocks.
  out["hlo_local_block"] = (f"f64[{p},{p}]" in hlo or f"f64[1,{p},{p}]" in hlo) and \
      f"f64[{NUM_DEVICES},{p},{p}]" not in hlo
  xs, mask = S.shard_rows(x_r, mesh, block_size=1)
  out["padded_rows"] = int(xs.shape[0])
  out["mask_sum"] = float(np.sum(np.asarray(mask)))

  # The Fast-NTK primal update from data-parallel statistics vs ntk_forget(solver="primal").
  params = t.params
  ref = _reference_update(t)
  new = _sharded_update(t, mesh, block_size=1)
  errors["update"] = max_diff(new, ref) / scale(ref)
  out["update_norm"] = max_diff(params, ref)  # the update is not trivially zero
  out["update_dtypes_match"] = all(
      a.dtype == b.dtype and a.shape == b.shape
      for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(params)))

  # One training step, BN in train mode (batch statistics) and a masked (padded) row.
  single, sharded, step, (trained, opt_state) = _train_steps(t, mesh)
  errors["train_step"] = max_diff(sharded, single) / scale(single)
  out["train_step_changed_params"] = max_diff(single[0], trained)
  xb, yb, mb, stats = t.xb, t.yb, t.mb, t.stats
  try:
    S.sharded_train_step(step, mesh)(trained, opt_state, stats, {}, xb[:12], yb[:12], mb[:12])
    out["uneven_batch_error"] = None
  except ValueError as e:
    out["uneven_batch_error"] = str(e)

  out["errors"] = errors
  out["seconds"] = time.perf_counter() - start
  return out


def _multiprocess_child() -> dict:
  """One of two processes (4 CPU devices each) joined by jax.distributed into 8 devices."""
  import jax  # pylint: disable=g-import-not-at-top
  # CPU collectives across processes go through gloo (GPUs/TPUs have their own).
  if os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from fastntk_jax import sharding as S  # pylint: disable=g-import-not-at-top
  initialized = S.maybe_initialize_distributed()  # FASTNTK_* from the parent
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fastntk_jax import ntk  # pylint: disable=g-import-not-at-top
  from fastntk_jax import unlearn  # pylint: disable=g-import-not-at-top

  t = _setup()
  mesh = S.make_data_mesh()
  out = {"initialized": initialized, "process": jax.process_index(),
         "processes": jax.process_count(), "devices": jax.device_count(),
         "local_devices": jax.local_device_count()}
  errors = {}
  stats = lambda w, x, y, m: ntk.gram_stats(
      t.apply_fn, w, x, y, num_classes=t.num_classes, batch_size=1, dtype=jnp.float64,
      row_weights=m)
  weights = (np.arange(13) < 10).astype(np.float32)
  g0, b0 = stats(t.w0, jnp.asarray(t.x_r), jnp.asarray(t.y_r), jnp.asarray(weights))
  g, b = S.data_parallel_sum(stats, mesh, block_size=1)(t.w0, t.x_r, t.y_r, weights)
  errors["gram_G"] = t.max_diff(g, g0) / t.scale(g0)
  errors["gram_b"] = t.max_diff(b, b0) / t.scale(b0)
  # The rows live on both processes' devices.
  out["rows_fully_addressable"] = bool(S.shard_rows(t.x_r, mesh)[0].is_fully_addressable)
  new = _sharded_update(t, mesh, block_size=1)
  ref = _reference_update(t)
  errors["update"] = t.max_diff(new, ref) / t.scale(ref)
  single, sharded, _, _ = _train_steps(t, mesh)
  errors["train_step"] = t.max_diff(sharded, single) / t.scale(single)
  out["errors"] = errors
  return out


# --------------------------------------------------------------------------------------
# The tests.
# --------------------------------------------------------------------------------------


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env(devices: int, **extra) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_ENABLE_X64"] = "1"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  for k in ("FASTNTK_DISTRIBUTED", "FASTNTK_NUM_PROCESSES", "FASTNTK_PROCESS_ID",
            "JAX_COORDINATOR_ADDRESS"):
    env.pop(k, None)
  env.update(extra)
  return env


def _parse(proc_stdout: str, proc_stderr: str, rc: int) -> dict:
  lines = [l for l in proc_stdout.splitlines() if l.startswith(_MARKER)]
  assert rc == 0 and lines, f"child failed (rc={rc}):\n{proc_stdout[-3000:]}\n{proc_stderr[-5000:]}"
  return json.loads(lines[-1][len(_MARKER):])


@pytest.fixture(scope="module")
def child():
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"],
                        env=_child_env(NUM_DEVICES), cwd=REPO, capture_output=True, text=True,
                        timeout=300, check=False)
  return _parse(proc.stdout, proc.stderr, proc.returncode)


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


@pytest.fixture(scope="module")
def multiprocess():
  """Two processes x 4 CPU devices, started the way a launcher would (env vars only)."""
  address = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "--child-multiprocess"],
      env=_child_env(NUM_DEVICES // 2, FASTNTK_DISTRIBUTED="1", FASTNTK_NUM_PROCESSES="2",
                     FASTNTK_PROCESS_ID=str(i), JAX_COORDINATOR_ADDRESS=address),
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  try:
    for proc in procs:
      stdout, stderr = proc.communicate(timeout=300)
      outs.append(_parse(stdout, stderr, proc.returncode))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  return outs


def test_child_runs_on_8_devices_in_float64(child):
  assert child["devices"] == NUM_DEVICES
  assert child["x64"]


@pytest.mark.parametrize("name", [
    "gram_G_blocks", "gram_b_blocks", "gram_G_one_block", "gram_b_one_block",
    "gram_weighted_G_blocks", "gram_weighted_b_blocks", "gram_weighted_G_one_block",
    "gram_weighted_b_one_block", "update", "train_step"])
def test_sharded_equals_single_device(child, name):
  assert child["errors"][name] < TOL, child["errors"]


def test_work_is_actually_split_over_devices(child):
  assert child["gram_devices"] == NUM_DEVICES and child["gram_replicated"]
  # 13 rows, 1 row per device per block: 8 devices x 2 blocks x 1 row, 13 of them real.
  assert child["padded_rows"] == 16 and child["mask_sum"] == 13.0
  # One local sum per device, then one all-reduce each for G and b; nothing gathered.
  assert child["hlo_local_block"]
  # One all-reduce each for G and b, or one for both where XLA combines them (jax >= 0.10).
  assert child["hlo_all_reduce"] in (1, 2) and child["hlo_all_gather"] == 0


def test_update_and_step_are_not_trivial(child):
  assert child["gram_stats_weights_matter"]
  assert child["update_norm"] > 1e-3
  assert child["update_dtypes_match"]
  assert child["train_step_changed_params"] > 1e-4


def test_uneven_batch_is_refused_with_the_fix(child):
  assert "multiple of 8" in child["uneven_batch_error"]


def test_two_processes_join_into_one_mesh(multiprocess):
  assert [o["process"] for o in multiprocess] == [0, 1]
  for o in multiprocess:
    assert o["initialized"] and o["processes"] == 2
    assert o["devices"] == NUM_DEVICES and o["local_devices"] == NUM_DEVICES // 2
    assert not o["rows_fully_addressable"]  # the rows really are split across processes


@pytest.mark.parametrize("name", ["gram_G", "gram_b", "update", "train_step"])
def test_multiprocess_equals_single_device(multiprocess, name):
  for o in multiprocess:
    assert o["errors"][name] < TOL, (o["process"], o["errors"])


# Single-process checks (the parent's devices; no subprocess needed).


@pytest.mark.parametrize("env,expected", [
    ({}, False),
    ({"FASTNTK_DISTRIBUTED": "1"}, True),
    ({"FASTNTK_DISTRIBUTED": "true"}, True),
    ({"FASTNTK_DISTRIBUTED": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1"}, False),
    ({"FASTNTK_DISTRIBUTED": "auto", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1"}, True),
    # The sbatch script itself (no srun step) is a single process.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, False),
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, True),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, False),
])
def test_should_initialize_distributed(env, expected):
  from fastntk_jax import sharding  # pylint: disable=g-import-not-at-top
  decision, reason = sharding.should_initialize_distributed(env)
  assert decision is expected, reason


def test_distributed_flag_typo_is_an_error():
  from fastntk_jax import sharding  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="FASTNTK_DISTRIBUTED='yes please'"):
    sharding.should_initialize_distributed({"FASTNTK_DISTRIBUTED": "yes please"})


def test_process_count_must_be_an_integer(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from fastntk_jax import sharding  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  with pytest.raises(ValueError, match="FASTNTK_NUM_PROCESSES='two'"):
    sharding.maybe_initialize_distributed({"FASTNTK_DISTRIBUTED": "1",
                                           "FASTNTK_NUM_PROCESSES": "two"})


def test_maybe_initialize_does_nothing_on_one_process(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from fastntk_jax import sharding  # pylint: disable=g-import-not-at-top

  def boom():
    raise AssertionError("jax.distributed.initialize must not be called")

  monkeypatch.setattr(jax.distributed, "initialize", boom)
  assert sharding.maybe_initialize_distributed({}) is False


def test_shard_rows_pads_with_row_zero_and_masks():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fastntk_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_data_mesh()
  d = mesh.shape["data"]
  x = np.arange(10, dtype=np.float32).reshape(5, 2) + 1
  xs, mask = sharding.shard_rows(x, mesh, block_size=2)
  n_pad = xs.shape[0]
  assert n_pad % d == 0 and n_pad >= 5
  np.testing.assert_array_equal(np.asarray(xs)[:5], x)
  np.testing.assert_array_equal(np.asarray(xs)[5:], np.repeat(x[:1], n_pad - 5, axis=0))
  np.testing.assert_array_equal(np.asarray(mask), (np.arange(n_pad) < 5).astype(np.float32))


if __name__ == "__main__":
  if sys.argv[1:] == ["--child"]:
    print(_MARKER + json.dumps(_child()))
  elif sys.argv[1:] == ["--child-multiprocess"]:
    print(_MARKER + json.dumps(_multiprocess_child()))
  else:
    sys.exit(f"usage: {sys.argv[0]} --child|--child-multiprocess (run the tests with pytest)")
