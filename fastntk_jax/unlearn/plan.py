"""The plan of one update: which solver runs, at what predicted cost, in which dtype.

`make_plan` is what every entry point does before heavy work: it counts p and n·C, asks XLA
for the network's forward cost, predicts each solver's memory and FLOPs (`estimate_costs`),
and picks a solver (`choose_solver`) among those the damping and the iteration budget allow
(`validate.allowed_solvers`), or refuses with a message that names what would fit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax import linalg
from fastntk_jax import ntk
from fastntk_jax.enums import KernelImplementation, Solver
from fastntk_jax.unlearn import validate

PyTree = Any
ApplyFn = Callable[[PyTree, jnp.ndarray], jnp.ndarray]
log = logging.getLogger(__name__)


class InsufficientMemoryError(ValueError):
  """The predicted memory of the requested computation exceeds what is available."""


@dataclasses.dataclass(frozen=True)
class SolverCost:
  """Predicted cost of one solver. `bytes` is peak working memory, `flops` arithmetic."""
  solver: str
  bytes: int
  flops: float



@dataclasses.dataclass(frozen=True)
class NetworkCost:
  """What one forward pass of `apply_fn` costs per sample (XLA's cost analysis).

  Attributes:
    flops: floating-point operations of the forward pass of one sample.
    bytes_accessed: bytes the forward pass reads and writes for one sample (recorded; not
      used for memory, see `estimate_costs`).
  """
  flops: float
  bytes_accessed: float


def network_cost(apply_fn: ApplyFn, params: PyTree, x: jnp.ndarray) -> Optional[NetworkCost]:
  """XLA's cost analysis of `apply_fn` on one sample shaped like `x[0]` (lowered, not compiled:
  ~0.1 s for a ResNet-20; works under `jax.jit` tracing since only shapes are used).

  Returns:
    NetworkCost, or None when the backend gives no analysis.
  """
  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  try:
    analysis = jax.jit(apply_fn).lower(
        jax.tree_util.tree_map(spec, params),
        jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), x.dtype)).cost_analysis()
  except Exception as e:  # pylint: disable=broad-except  # a cost model must never fail a run
    log.info("network_cost: no cost analysis (%s); using the linear-model proxy", e)
    return None
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
    analysis = analysis[0] if analysis else None
  if not analysis or not analysis.get("flops"):
    return None
  return NetworkCost(float(analysis["flops"]), float(analysis.get("bytes accessed", 0.0)))


def blocked_kernel_jacobians(num_retain: int, num_forget: int, *, batch_size: int,
                             traced: bool) -> int:
  """How many per-sample Jacobians the dual's three blocked kernels take (`estimate_costs`).

  With one block per set, or under `jax.jit` with at most `ntk.MAX_UNROLLED_BLOCKS` blocks,
  XLA shares each sample's Jacobian (n); a rolled loop takes both blocks of every block pair;
  an eager host loop takes its row block once per row and each column block once per pair.
  """
  def blocks(k):
    return math.ceil(k / min(batch_size, k)) if k else 0

  def kernel_jacobians(n1, n2):  # samples whose Jacobian one blocked kernel call computes
    if n1 == 0 or n2 == 0:
      return 0
    b1, b2 = min(batch_size, n1), min(batch_size, n2)
    nb1, nb2 = blocks(n1), blocks(n2)
    if traced:  # a rolled lax.scan: no sharing across iterations
      return nb1 * nb2 * (b1 + b2)
    return nb1 * b1 + nb1 * nb2 * b2  # host loop over row blocks, one compiled row step

  n_r, n_f = num_retain, num_forget
  most_blocks = max(blocks(n_r), blocks(n_f))
  if most_blocks <= 1 or (traced and most_blocks <= ntk.MAX_UNROLLED_BLOCKS):
    return n_r + n_f  # one program in which XLA shares each sample's Jacobian
  return kernel_jacobians(n_r, n_r) + kernel_jacobians(n_r, n_f) + kernel_jacobians(n_f, n_f)


def estimate_costs(num_params: int, num_retain: int, num_forget: int, num_classes: int,
                   *, batch_size: int = 256, dtype_bytes: int = 4,
                   cg_maxiter: Optional[int] = None,
                   network: Optional[NetworkCost] = None,
                   traced: bool = True,
                   dual_rows_bytes: Optional[int] = None) -> dict[str, SolverCost]:
  """Predicted peak memory and FLOPs of each solver (a model, not a measurement).

  FLOPs count the network passes each solver makes as well as its linear algebra: the
  network's Jacobians dominate at Fast-NTK sizes (benchmarks/RESULTS.md, roofline). Per sample,
  with F the forward FLOPs and only the trainable collection differentiated (frozen layers
  need the gradient of their input only, ~F per cotangent): a Jacobian (one forward, C reverse
  passes) ~ (1 + C)·F, a jvp ~ 2F, a vjp ~ 2F.

  * primal: one Jacobian per sample, G = JᵀJ (2·n·C·p²), two p×p Cholesky solves.
  * dual: how often it computes a sample's Jacobian depends on how the kernel blocks run
    (measured on CPU, benchmarks/RESULTS.md §1): with one block per set, or under `jax.jit`
    with at most `ntk.MAX_UNROLLED_BLOCKS` blocks (an unrolled program), XLA computes each
    sample's Jacobian once for all three kernels (common subexpressions: ResNet-8 x4, n = 160
    in 3 blocks, ran as fast as the primal); in a rolled loop (more blocks under jit) every
    block pair computes both blocks (nb₁·nb₂·(b₁+b₂) samples per kernel); called eagerly,
    the host loop over row blocks computes its block once per row and the column blocks once
    per pair (nb₁·b₁ + nb₁·nb₂·b₂). Plus the contractions (2·(n·C)²·p), the Cholesky/Schur
    solves, and one vjp over D_f and a jvp and a vjp over D_r to apply P J_fᵀ. With the
    Jacobian rows of D kept (`dual_rows_bytes`), each sample's Jacobian is taken once, P J_fᵀ
    is three products with the rows, and the rows (n·C·p) add to the memory.
  * cg: per iteration a jvp and a vjp over the samples of each of its two solves.

  Memory is the solvers' linear-algebra working set (kernels, Grams, factors, one or two
  Jacobian blocks). It excludes the network's activations that reverse mode keeps per block
  (roughly batch_size x the saved activations of one sample): XLA's "bytes accessed" overstates
  them ~15x on ResNet-110 (56 GiB predicted vs ~4 GiB measured at batch 64), too far off to
  refuse a run on. Lower `batch_size` if XLA runs out of memory.

  Args:
    num_params: p.
    num_retain, num_forget: n_r, n_f (samples).
    num_classes: C.
    batch_size: rows per streamed block.
    dtype_bytes: bytes per number in the solve (4 or 8).
    cg_maxiter: cg iteration cap (default `cg_iteration_budget`).
    network: the network's per-sample forward cost (`network_cost`); None uses a linear
      model's (F = 2p FLOPs), which undercounts every network pass.
    traced: whether the update runs under `jax.jit` (True) or eagerly (see the dual above).
    dual_rows_bytes: bytes per number of the kept Jacobian rows (the network's dtype), or
      None for the blocked kernel.

  Returns:
    {"dual" | "primal" | "cg": SolverCost}.
  """
  p, c, b = num_params, num_classes, dtype_bytes
  n_r, n_f = num_retain, num_forget
  n = n_r + n_f
  mr, mf = n_r * c, n_f * c
  m = mr + mf
  fwd = network.flops if network is not None else 2.0 * p
  jac, jvp, vjp = (1 + c) * fwd, 2 * fwd, 2 * fwd
  bs = min(batch_size, n)
  jac_block = bs * c * p  # one block's Jacobian

  # dual: Θ_rr, Θ_rf, Θ_ff, the Cholesky factor of Θ_rr, Θ_rr⁻¹Θ_rf and the Schur block,
  # plus the two Jacobian blocks neural-tangents contracts at a time.
  dual_bytes = b * (2 * mr * mr + 2 * mr * mf + 2 * mf * mf + 2 * jac_block + (bs * c) ** 2)
  if dual_rows_bytes is not None:
    dual_jacobians = n
    # the rows; while Θ is formed from them, a second [m, m] (the product's loop carry, as
    # compiled) and one column chunk of each side widened to the solve dtype
    dual_bytes += (dual_rows_bytes * m * p + b * m * m
                   + 2 * b * m * min(p, linalg.ROW_PRODUCT_COLUMNS))
  else:
    dual_jacobians = blocked_kernel_jacobians(n_r, n_f, batch_size=batch_size, traced=traced)
  apply_p = (4.0 * m * p if dual_rows_bytes is not None  # J_fᵀz, J_r u, J_rᵀ(...) from rows
             else n_f * vjp + n_r * (jvp + vjp))
  dual_flops = (dual_jacobians * jac + 2.0 * m * m * p
                + mr ** 3 / 3 + 2.0 * mr * mr * mf + 2.0 * mr * mf * mf + mf ** 3 / 3
                + apply_p)
  # primal: G_r, G_f, one Cholesky factor at a time plus a copy, and one Jacobian block.
  primal_bytes = b * (4 * p * p + jac_block)
  primal_flops = n * jac + 2.0 * m * p * p + 2 * p ** 3 / 3 + 2.0 * m * p
  # cg: a handful of vectors in the smaller space, plus one block's vjp/jvp working set
  # (proxied by a per-sample gradient per row of the block).
  dim = min(p, m)
  iters = cg_iteration_budget(dim, cg_maxiter)
  cg_bytes = b * (8 * (p + m) + bs * p)
  cg_flops = iters * ((n_r + n) * (jvp + vjp) + 16.0 * (p + m))
  return {
      "dual": SolverCost("dual", int(dual_bytes), float(dual_flops)),
      "primal": SolverCost("primal", int(primal_bytes), float(primal_flops)),
      "cg": SolverCost("cg", int(cg_bytes), float(cg_flops)),
  }


def available_memory_bytes() -> int:
  """Memory the solve may use: free accelerator memory, or the host's available RAM."""
  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  import psutil  # pylint: disable=g-import-not-at-top
  return int(psutil.virtual_memory().available)


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def cg_iteration_budget(dim: int, cg_maxiter: Optional[int]) -> int:
  """cg's iteration cap for a system of dimension `dim`: `cg_maxiter`, default 2·dim + 200 (in
  exact arithmetic cg converges in dim iterations; with round-off an ill-conditioned system
  needs more, which matters most for small dim)."""
  return int(cg_maxiter) if cg_maxiter is not None else 2 * int(dim) + 200


def choose_solver(costs: dict[str, SolverCost], memory_budget: int,
                  requested: Solver | str = Solver.AUTO,
                  excluded: Optional[dict[str, str]] = None) -> tuple[str, str]:
  """Picks a solver, or refuses with a message naming one that fits.

  `auto` takes the cheapest (fewest predicted FLOPs) of the solvers that fit in memory and
  are not `excluded`.

  Args:
    costs: from `estimate_costs`.
    memory_budget: bytes.
    requested: a Solver (or its value).
    excluded: {solver value: why auto must not pick it} (`validate.allowed_solvers`; a
      solver named explicitly has already been refused there).

  Returns:
    (solver value, human-readable reason).

  Raises:
    InsufficientMemoryError: the requested (or every allowed) solver is predicted not to fit.
  """
  requested = Solver(requested)
  excluded = excluded or {}
  fitting = {k: v for k, v in costs.items() if v.bytes <= memory_budget and k not in excluded}
  summary = ", ".join(f"{k}: {_gib(v.bytes)}, {v.flops:.2e} FLOP" for k, v in costs.items())
  if requested != Solver.AUTO:
    cost = costs[requested.value]
    if cost.bytes > memory_budget:
      alternatives = (
          "solver=" + " or ".join(f"'{k}' ({_gib(v.bytes)})" for k, v in fitting.items())
          + " fits" if fitting else "no solver fits at this batch size; lower batch_size")
      raise InsufficientMemoryError(
          f"solver='{requested.value}' needs about {_gib(cost.bytes)} but only "
          f"{_gib(memory_budget)} is available; {alternatives}.")
    return requested.value, "requested"
  if not fitting:
    why = "".join(f"; {k} is excluded: {v}" for k, v in excluded.items())
    raise InsufficientMemoryError(
        f"no solver fits in {_gib(memory_budget)} (predicted {summary}){why}; lower "
        "batch_size or the number of samples, or use a machine with more memory.")
  best = min(fitting.values(), key=lambda v: v.flops)
  reason = (f"auto: '{best.solver}' has the fewest predicted FLOPs among those fitting in "
            f"{_gib(memory_budget)} ({summary})")
  if excluded:
    reason += "".join(f"; not {k}: {v}" for k, v in excluded.items())
  return best.solver, reason


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one update will do, decided before any heavy work (`make_plan`).

  Attributes:
    solver: the solver that will run (never AUTO).
    reason: why (the auto rule with every solver's predicted cost, or "requested").
    num_params: p. num_retain, num_forget: n_r, n_f. num_classes: C.
    solve_dtype: dtype of kernels, Grams and solves.
    kernel: the dual's kernel implementation as resolved (None for primal and cg).
    cg_maxiter: cg's iteration cap for the largest of its systems.
    costs: {solver value: SolverCost}, predicted.
    logits_dtype: dtype of apply_fn's logits (when narrower than the solve dtype, the
      Jacobians carry its round-off: `linalg.precision_warning`); with kept Jacobian rows, the
      narrowest of it and the params' floating dtypes (the rows are taken in those).
    keep_jacobian_rows: dual only: the Jacobian rows of D are computed once, block by block,
      and kept (n·C·p numbers in the params' dtype), because a set spans several blocks
      (where the blocked kernel recomputes Jacobians or unrolls one program per block pair)
      and the rows fit. The kernel is then the built-in one (`kernel` is JAX).
  """
  solver: Solver
  reason: str
  num_params: int
  num_retain: int
  num_forget: int
  num_classes: int
  solve_dtype: Any
  kernel: Optional[KernelImplementation]
  cg_maxiter: int
  costs: dict
  logits_dtype: Any = None
  keep_jacobian_rows: bool = False

  @property
  def num_outputs(self) -> int:
    """n·C over D = D_r ∪ D_f (the dual dimension)."""
    return (self.num_retain + self.num_forget) * self.num_classes


def round_off_dtype(logits_dtype, w_lin, *, keep_rows: bool):
  """The dtype whose round-off the kernel carries: the logits'; with kept Jacobian rows,
  taken with the params in their own dtypes, at least float32 (`ntk.rows_params`, not
  widened to the solve dtype), the narrowest of those leaves' as well."""
  source = jnp.dtype(logits_dtype)
  if keep_rows:
    for leaf in jax.tree_util.tree_leaves(ntk.rows_params(w_lin)):
      dt = jnp.dtype(getattr(leaf, "dtype", jnp.float32))
      if jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).eps > jnp.finfo(source).eps:
        source = dt
  return source


def make_plan(apply_fn: ApplyFn, w_lin: PyTree, retain, forget, *, options,
              solve_dtype, traced: bool) -> Plan:
  """Chooses the solver for validated inputs (`validate.check_split` / `check_params` done).

  Args:
    apply_fn, w_lin: the network and its linearisation point.
    retain, forget: (x, y) pairs.
    options: `validate.Options`.
    solve_dtype: the resolved solve dtype.
    traced: whether the update runs under `jax.jit` (for the dual's cost, see
      `estimate_costs`).

  Returns:
    Plan.

  Raises:
    ValueError: a solver excluded by the damping rule was named.
    InsufficientMemoryError: nothing allowed fits (names what would).
  """
  (x_r, _), (x_f, _) = retain, forget
  c = options.num_classes
  p, n_r, n_f = ntk.num_params(w_lin), int(x_r.shape[0]), int(x_f.shape[0])
  cg_dim = min(p, (n_r + n_f) * c)  # parameter space (p) or output space (n·C)
  cg_budget = cg_iteration_budget(cg_dim, options.cg_maxiter)
  excluded = validate.allowed_solvers(options.solver, options.damping, num_params=p,
                                      num_outputs=(n_r + n_f) * c, cg_budget=cg_budget,
                                      cg_dim=cg_dim)
  cost_args = dict(batch_size=options.batch_size or (n_r + n_f),
                   dtype_bytes=jnp.dtype(solve_dtype).itemsize, cg_maxiter=cg_budget,
                   network=network_cost(apply_fn, w_lin, x_r), traced=traced)
  costs = estimate_costs(p, n_r, n_f, c, **cost_args)
  budget = int(options.memory_limit_bytes if options.memory_limit_bytes is not None
               else 0.8 * available_memory_bytes())
  keep_rows = False
  if KernelImplementation(options.kernel_impl) in (KernelImplementation.AUTO,
                                                   KernelImplementation.JAX):
    # The built-in kernel on rows kept in memory wherever a set spans several blocks: the
    # blocked kernel then takes column blocks' Jacobians once per row block (eagerly, or in
    # a rolled loop under jit), or unrolls a Jacobian program per block pair (a ViT-S/16 at
    # 160 images in 5 blocks passed 8 GiB compiling it). An explicitly named
    # neural-tangents kernel is kept.
    rows_leaves = jax.tree_util.tree_leaves(ntk.rows_params(w_lin))
    rows_dtype = jnp.result_type(*rows_leaves) if p else jnp.float32
    with_rows = estimate_costs(p, n_r, n_f, c, **cost_args,
                               dual_rows_bytes=jnp.dtype(rows_dtype).itemsize)
    dual = Solver.DUAL.value
    bs = cost_args["batch_size"]
    if max(n_r, n_f) > bs and with_rows[dual].bytes <= budget:
      costs, keep_rows = with_rows, True
  if (options.solver == Solver.AUTO and p > n_r * c and jnp.dtype(solve_dtype).itemsize < 8
      and costs[Solver.DUAL.value].bytes <= budget and Solver.DUAL.value not in excluded):
    # G_r + λI then has eigenvalues λ (G_r has rank <= n_r·C < p): κ >= ‖G‖/λ, which a
    # float32 solve may not survive, while the dual inverts the full-rank Θ_rr + λI.
    excluded[Solver.PRIMAL.value] = (f"p={p} > n_r*C={n_r * c} makes its Gram rank-deficient "
                                     f"(condition number >= |G|/damping) in "
                                     f"{jnp.dtype(solve_dtype).name}")
  name, reason = choose_solver(costs, budget, options.solver, excluded)
  solver = Solver(name)
  keep_rows = keep_rows and solver == Solver.DUAL
  if keep_rows:
    kernel = KernelImplementation.JAX
    reason += (f"; the dual keeps the Jacobian rows of D ({_gib(with_rows[dual].bytes)} "
               "working set with them): each sample's Jacobian taken once")
  elif solver == Solver.DUAL:
    kernel = ntk.resolve_implementation(options.kernel_impl)
  else:
    kernel = None
  logits = validate.check_logits(apply_fn, w_lin, x_r, c)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"apply_fn returns {logits.dtype} logits: they must be floating point "
                    "(an integer output has no derivative)")
  logits_dtype = round_off_dtype(logits.dtype, w_lin, keep_rows=keep_rows)
  log.info("ntk_forget: solver=%s (%s); p=%d, n*C=%d", name, reason, p, (n_r + n_f) * c)
  return Plan(solver=solver, reason=reason, num_params=p, num_retain=n_r, num_forget=n_f,
              num_classes=c, solve_dtype=jnp.dtype(solve_dtype), kernel=kernel,
              cg_maxiter=cg_budget, costs=costs, logits_dtype=logits_dtype,
              keep_jacobian_rows=keep_rows)
