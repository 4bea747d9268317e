"""Fast-NTK: the paper's Eq. (1) on the trainable collection, by the run's Forgetter.

Reference: Li et al., "Fast-NTK: Parameter-Efficient Unlearning for Large-Scale Models"
(arXiv:2312.14923), with the sign of Eq. (1) as derived in docs/derivation.md. Config block:
`unlearn` (the Forgetter's options; the harness made the Forgetter from it).

How the update runs, all through the Forgetter (the kernel is taken at w0 with the
pre-trained BatchNorm statistics, docs/derivation.md §1):
  * `unlearn.serve`: a deletion request on the state of D (`Forgetter.init`/`serve`), the
    state built once and kept in the seed's folder (`fastntk_state_of_D.state`); results
    give the cold time and the request's latency apart.
  * Gram statistics shared with linearised fine-tuning (closed form at w0): the primal solve
    from them (`Forgetter.from_gram_stats`); their seconds count as the update's.
  * D's kernel statistics shared with linearised fine-tuning in the dual (at w0): Eq. (1)
    from them (`Forgetter.from_kernel_stats`); their seconds count as the update's.
  * primal: the Gram statistics summed in chunks of `unlearn.checkpoint_rows` samples
    (`Forgetter.accumulate`), each saved atomically, so a preempted run resumes
    mid-accumulation; with a mesh each chunk's rows are split over the devices.
  * dual or cg: one compiled program (`Forgetter.forget_with_diagnostics`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax import faults
from fastntk_jax import workdir as wd
from fastntk_jax.enums import LinearizationPoint, Solver
from fastntk_jax.experiment import methods

log = logging.getLogger(__name__)

STATE_OF_D = "fastntk_state_of_D.state"


def reference_model_plan(plan, reason: str, solver: Solver = Solver.PRIMAL):
  """The plan of a primal (or dual) update whose reference is the linearised model its own
  Gram (or kernel) statistics define (Full and Retrain solved from the same ones): the
  round-off of the network's narrower logits shapes that model alike for every method and is
  no error of the update; only the solve's precision is (the precision rule says so)."""
  return dataclasses.replace(plan, solver=solver, kernel=None,
                             keep_jacobian_rows=solver == Solver.DUAL, logits_dtype=None,
                             reason=reason)


def _from_shared_grams(ctx: methods.Context, plan, tag: str):
  if plan.solver != Solver.PRIMAL:  # auto: reusing them costs only the p×p solve
    reason = ("auto: primal, the solver whose Gram statistics the linearised Full/Retrain "
              "computed")
  else:
    reason = plan.reason
  plan = reference_model_plan(plan, reason + "; Gram statistics shared with the linearised "
                             "Full/Retrain")
  log.info("%s: solver=primal (%s)", tag, plan.reason)  # what runs, whatever the plan chose
  start = time.perf_counter()
  (stats_r, stats_f), (seconds_r, seconds_f), compile_seconds = ctx.grams()
  new, info = ctx.forgetter.from_gram_stats(ctx.full, stats_r, stats_f, plan)
  new = jax.block_until_ready(new)
  solve = time.perf_counter() - start
  # The Gram statistics of D (= D_r's + D_f's) are a one-time precompute, which Full's own
  # fine-tuning needed; a request then costs D_f's statistics (its Jacobian rows) and the solve.
  return new, ctx.forgetter.diagnostics(
      plan, info, params=ctx.full, new_params=new, seconds=solve + seconds_r + seconds_f,
      compile_seconds=compile_seconds,
      extra={"precompute_seconds": seconds_r + seconds_f,
             "per_request_seconds": solve + seconds_f})


def _from_shared_kernel(ctx: methods.Context, plan, tag: str):
  reason = (plan.reason if plan.solver == Solver.DUAL else
            "auto: dual, the solver whose kernel statistics the linearised Full/Retrain computed")
  plan = reference_model_plan(plan, reason + "; D's kernel statistics shared with the "
                              "linearised Full/Retrain", solver=Solver.DUAL)
  log.info("%s: solver=dual (%s)", tag, plan.reason)
  stats, num_retain, seconds_d = ctx.kernel()
  start = time.perf_counter()
  new, info = ctx.forgetter.from_kernel_stats(ctx.full, stats, num_retain, plan)
  new = jax.block_until_ready(new)
  solve = time.perf_counter() - start
  share_f = 1.0 - num_retain / ctx.data.train.size  # D_f's rows of D's statistics
  return new, ctx.forgetter.diagnostics(
      plan, info, params=ctx.full, new_params=new, seconds=solve + seconds_d,
      compile_seconds=0.0,
      extra={"precompute_seconds": seconds_d,
             "per_request_seconds": solve + share_f * seconds_d})


def _chunked_primal(ctx: methods.Context, block, plan, tag: str):
  forgetter, data = ctx.forgetter, ctx.data
  w_lin = ctx.w0 if LinearizationPoint(block.linearize_at) == LinearizationPoint.INIT else ctx.full
  rows = int(block.checkpoint_rows)
  stats, compile_seconds = {}, 0.0
  start = time.perf_counter()
  # Each chunk's checkpoint (p×p) is written while the next chunk computes.
  with wd.BackgroundSaver() as saver:
    for part, split in (("retain", data.retain), ("forget", data.forget)):
      path = (None if ctx.folder is None
              else os.path.join(ctx.folder, f"fastntk_gram_{part}.state"))

      def save(state, path=path, part=part):
        if path is not None:
          point = f"{tag}:gram_{part}_chunk{state['next'] // rows - 1}"
          saver.submit(path, state, then=lambda: faults.maybe_kill(point))

      resumed = None
      if path is not None:
        p, dtype = plan.num_params, plan.solve_dtype
        resumed = wd.load_state(path, {"g": np.zeros((p, p), dtype),
                                       "b": np.zeros((p,), dtype), "next": 0})
      state, compiled = forgetter.accumulate(w_lin, split.x, split.y, chunk_rows=rows,
                                             state=resumed, on_chunk=save, mesh=ctx.mesh)
      compile_seconds += compiled
      stats[part] = (state["g"], state["b"])
  new, info = forgetter.from_gram_stats(ctx.full, stats["retain"], stats["forget"], plan)
  new = jax.block_until_ready(new)
  seconds = time.perf_counter() - start - compile_seconds
  diag = forgetter.diagnostics(plan, info, params=ctx.full, new_params=new, seconds=seconds,
                               compile_seconds=compile_seconds,
                               reason_suffix="; chunked Gram accumulation, resumable",
                               extra={"checkpoint_wait_seconds": saver.wait_seconds})
  return new, diag


def _served(ctx: methods.Context, tag: str):
  """D_f (the last rows of D) forgotten as one request on the state of D; the state is built
  once per seed and kept in the seed's folder, and refused (rebuilt) when it was built for
  another w0, damping, solve dtype or data, or has served requests."""
  forgetter, train = ctx.forgetter, ctx.data.train
  x, y = jnp.asarray(train.x), jnp.asarray(train.y)
  path = None if ctx.folder is None else os.path.join(ctx.folder, STATE_OF_D)
  state = None
  stored = None if path is None else wd.load_state(path, None)
  if stored is not None:
    try:
      state = forgetter.restore(stored, ctx.w0, (x, y))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
      log.warning("%s: %s cannot be used (%s); building it again", tag, path, e)
  cold = {"cold_seconds": None, "cold_compile_seconds": None}
  if state is None:
    timings = {}
    state = jax.block_until_ready(forgetter.init(ctx.w0, (x, y), timings=timings))
    cold = {"cold_seconds": timings["seconds"], "cold_compile_seconds": timings["compile_seconds"]}
    if path is not None:
      wd.save_state(path, state.arrays())
      faults.maybe_kill(f"{tag}:state_of_D_saved")
  indices = np.arange(ctx.data.retain.size, train.size)
  new, _, diag = forgetter.serve_with_diagnostics(state, ctx.full, indices)
  diag.extra.update(cold)
  log.info("%s: state of D %s; request of %d samples served in %.3f s", tag,
           "read back from the workdir" if cold["cold_seconds"] is None else
           f"built in {cold['cold_seconds']:.2f} s", indices.size, diag.seconds)
  return new, diag


def run(ctx: methods.Context, block) -> methods.Result:
  tag = f"seed{ctx.seed}/fastntk"
  data = ctx.data
  retain = (jnp.asarray(data.retain.x), jnp.asarray(data.retain.y))
  forget = (jnp.asarray(data.forget.x), jnp.asarray(data.forget.y))
  if block.serve:
    new, diag = _served(ctx, tag)
    return methods.Result(new, diag.seconds, diag.as_dict())
  plan = ctx.forgetter.plan(ctx.w0, ctx.full, retain, forget, traced=True)
  shared = ctx.grams is not None and (plan.solver == Solver.PRIMAL
                                      or Solver(block.solver) == Solver.AUTO)
  shared_kernel = ctx.kernel is not None and (plan.solver == Solver.DUAL
                                              or Solver(block.solver) == Solver.AUTO)
  if shared:
    new, diag = _from_shared_grams(ctx, plan, tag)
  elif shared_kernel:
    new, diag = _from_shared_kernel(ctx, plan, tag)
  elif plan.solver == Solver.PRIMAL:
    new, diag = _chunked_primal(ctx, block, plan, tag)
  else:
    new, diag = ctx.forgetter.forget_with_diagnostics(ctx.w0, ctx.full, retain, forget,
                                                      plan=plan)
  return methods.Result(new, diag.seconds, diag.as_dict())


METHOD = methods.Method(
    name="fastntk", label="Fast-NTK", run=run, config_group="unlearn",
    reference="Li et al., Fast-NTK (arXiv:2312.14923), Eq. (1) with the corrected sign",
    search_space=lambda cfg: search_space(cfg))


def search_space(cfg) -> dict:
  """λ under the tuning's rule where it is free. In linearised fine-tuning λ is the ridge
  penalty of Full and Retrain themselves (the model Eq. (1) is exact for): tuning it would
  change what every method is measured against, so there is nothing to tune."""
  if cfg.finetune.mode == "linearized":
    return {}
  return {"damping": (1e-3, 1e-2, 1e-1, 1.0)}
