"""The Fast-NTK unlearning update (the paper's Eq. (1), sign as in DESIGN.md §1).

The model is linearised at `w0` (trainable params before fine-tuning). With
`J_a = d f(w0, X_a) / d w` (sample-major rows), `Θ_ab = J_a J_bᵀ`, `E_a = Y_a - f(w0, X_a)` and
damping λ, kernel ridge regression gives `w_D = w0 + Jᵀ(Θ+λI)⁻¹E` on D = D_r ∪ D_f and
`w_r = w0 + J_rᵀ(Θ_rr+λI)⁻¹E_r` on D_r alone. The update is their difference,

    Δ = w_r - w_D = P J_fᵀ M V,
    P = I - J_rᵀ(Θ_rr+λI)⁻¹J_r,   M = (Θ_ff+λI - Θ_fr(Θ_rr+λI)⁻¹Θ_rf)⁻¹,
    V = (f(w0, X_f) - Y_f) + Θ_fr(Θ_rr+λI)⁻¹E_r,

added to the fine-tuned params. Three solvers compute the same Δ:

  * dual:   Eq. (1) literally: neural-tangents kernel blocks, Cholesky, Schur complement;
            P and J_fᵀ applied matrix-free with jvp/vjp. Memory ~ (n·C)².
  * primal: push-through identity Jᵀ(JJᵀ+λI)⁻¹ = (JᵀJ+λI)⁻¹Jᵀ, so
            Δ = (G_r+λI)⁻¹ J_rᵀE_r - (G_r+G_f+λI)⁻¹ (J_rᵀE_r + J_fᵀE_f), G_a = J_aᵀJ_a
            streamed in row blocks. Memory ~ p².
  * cg:     the same two ridge solves by conjugate gradients with jvp/vjp matvecs, in
            whichever space (parameters or outputs) is smaller. Memory ~ p + n·C.

Public API: `ntk_forget` (pure, jit-able), `ntk_forget_with_diagnostics` (eager, timed,
returns a `Diagnostics`), and `ntk_forget_requests` for a stream of per-sample deletion
requests served incrementally (`fastntk_jax.stream`). Inputs are validated before any heavy
work.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax import ntk
from fastntk_jax.checks import check_finite as _check_finite
from fastntk_jax.checks import is_concrete as _is_concrete

PyTree = Any
ApplyFn = Callable[[PyTree, jnp.ndarray], jnp.ndarray]

log = logging.getLogger(__name__)

__all__ = [
    "Solver",
    "Diagnostics",
    "InsufficientMemoryError",
    "SolverCost",
    "precision_warning",
    "NetworkCost",
    "network_cost",
    "estimate_costs",
    "choose_solver",
    "available_memory_bytes",
    "ntk_forget",
    "ntk_forget_with_diagnostics",
    "ridge_update",
    "primal_solve",
    "prepare",
    "ntk_forget_requests",
]


class Solver(str, enum.Enum):
  """Which linear-algebra route computes Δ (all give the same result up to round-off)."""
  DUAL = "dual"
  PRIMAL = "primal"
  CG = "cg"
  AUTO = "auto"


class LinearizationPoint(str, enum.Enum):
  """Where the model is linearised.

  INIT (default, DESIGN.md §1): at `params_init` (w0), where the residuals are non-zero.
  TRAINED: at the fine-tuned `params`. For an interpolating model the residuals are then ~0
    and the update nearly vanishes; the public reference code compensates with a heuristic
    step scale (`step_scale`). Offered for comparison only.
  """
  INIT = "init"
  TRAINED = "trained"


class InsufficientMemoryError(ValueError):
  """The predicted memory of the requested computation exceeds what is available."""


@dataclasses.dataclass(frozen=True)
class SolverCost:
  """Predicted cost of one solver. `bytes` is peak working memory, `flops` arithmetic."""
  solver: str
  bytes: int
  flops: float


@dataclasses.dataclass
class Diagnostics:
  """What `ntk_forget_with_diagnostics` measured.

  Attributes:
    solver: the solver that ran ("dual" | "primal" | "cg").
    reason: why it was chosen (the auto rule, or "requested").
    num_params: p, scalars in the trainable pytree.
    num_outputs: n·C over D (retain + forget), the dual dimension.
    condition_number: 2-norm condition number of the matrix the solver inverts
      (dual: Θ_rr+λI; primal: G+λI over D); None for cg.
    cg_relative_residual: cg only: ||A x - b|| / ||b|| of the last solve.
    estimated_bytes: predicted peak working memory of the chosen solver.
    measured_bytes: peak device memory (accelerators) or growth of the process's peak
      resident memory (CPU) during the call; None where it cannot be read.
    seconds: wall-clock seconds of running the compiled update (compilation excluded).
    compile_seconds: seconds spent tracing and compiling it (XLA), paid once per shape.
    update_norm: ||Δ||₂ of the (scaled) update.
    costs: predicted cost of every solver, for the record.
    precision_warning: set when condition_number x the solve dtype's epsilon exceeds
      `PRECISION_WARNING_THRESHOLD` (see `precision_warning`).
  """
  solver: str
  reason: str
  num_params: int
  num_outputs: int
  condition_number: Optional[float]
  cg_relative_residual: Optional[float]
  estimated_bytes: int
  measured_bytes: Optional[int]
  seconds: float
  compile_seconds: float
  update_norm: float
  costs: dict
  precision_warning: Optional[str] = None

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Cost model and solver choice.
# --------------------------------------------------------------------------------------

_CG_DEFAULT_MAXITER_CAP = 2000


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


def estimate_costs(num_params: int, num_retain: int, num_forget: int, num_classes: int,
                   *, batch_size: int = 256, dtype_bytes: int = 4,
                   cg_maxiter: Optional[int] = None,
                   network: Optional[NetworkCost] = None,
                   traced: bool = True) -> dict[str, SolverCost]:
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
    solves, and one vjp over D_f and a jvp and a vjp over D_r to apply P J_fᵀ.
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
    cg_maxiter: cg iteration cap (default min(2·dim, 2000)).
    network: the network's per-sample forward cost (`network_cost`); None uses a linear
      model's (F = 2p FLOPs), which undercounts every network pass.
    traced: whether the update runs under `jax.jit` (True) or eagerly (see the dual above).

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

  # dual: Θ_rr, Θ_rf, Θ_ff, the Cholesky factor of Θ_rr, Θ_rr⁻¹Θ_rf and the Schur block,
  # plus the two Jacobian blocks neural-tangents contracts at a time.
  dual_bytes = b * (2 * mr * mr + 2 * mr * mf + 2 * mf * mf + 2 * jac_block + (bs * c) ** 2)
  most_blocks = max(blocks(n_r), blocks(n_f))
  if most_blocks == 1 or (traced and most_blocks <= ntk.MAX_UNROLLED_BLOCKS):
    dual_jacobians = n  # one program in which XLA shares each sample's Jacobian
  else:
    dual_jacobians = (kernel_jacobians(n_r, n_r) + kernel_jacobians(n_r, n_f)
                      + kernel_jacobians(n_f, n_f))
  dual_flops = (dual_jacobians * jac + 2.0 * m * m * p
                + mr ** 3 / 3 + 2.0 * mr * mr * mf + 2.0 * mr * mf * mf + mf ** 3 / 3
                + n_f * vjp + n_r * (jvp + vjp))
  # primal: G_r, G_f, one Cholesky factor at a time plus a copy, and one Jacobian block.
  primal_bytes = b * (4 * p * p + jac_block)
  primal_flops = n * jac + 2.0 * m * p * p + 2 * p ** 3 / 3 + 2.0 * m * p
  # cg: a handful of vectors in the smaller space, plus one block's vjp/jvp working set
  # (proxied by a per-sample gradient per row of the block).
  dim = min(p, m)
  iters = cg_maxiter or min(2 * dim, _CG_DEFAULT_MAXITER_CAP)
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


# κ·ε above which the solve may carry no correct digit. The bound is pessimistic below it:
# the embedded digits default has κ·ε ≈ 0.3 in float32 (κ ≈ 2.8e6) and its float32 update
# matches Retrain; ResNet-110 at 5,000 images, where a float32 solve differed from the
# float64 one by 71% (benchmarks/RESULTS.md §7), is far above it.
PRECISION_WARNING_THRESHOLD = 1.0


def precision_warning(condition_number: Optional[float], dtype) -> Optional[str]:
  """A message when the solve's round-off bound κ·ε exceeds `PRECISION_WARNING_THRESHOLD`.

  A Cholesky solve in a dtype with machine epsilon ε loses up to κ·ε of relative accuracy
  (κ = condition number of the matrix it inverts).

  Args:
    condition_number: κ of the matrix the solver inverts (None: nothing to say).
    dtype: dtype of the solve.

  Returns:
    The message, or None.
  """
  if condition_number is None or np.isnan(condition_number):
    return None
  eps = float(jnp.finfo(jnp.dtype(dtype)).eps)
  bound = condition_number * eps
  if bound <= PRECISION_WARNING_THRESHOLD:
    return None
  remedy = ("pass solve_dtype=jnp.float64 (with JAX_ENABLE_X64=1) or increase damping"
            if jnp.dtype(dtype) != jnp.float64 else "increase damping")
  if np.isinf(condition_number):
    return (f"the matrix the solver inverts is numerically singular in {jnp.dtype(dtype).name} "
            f"(an eigenvalue <= 0 after round-off): the update may be meaningless; {remedy}")
  return (f"condition number {condition_number:.3g} x {jnp.dtype(dtype).name} epsilon "
          f"{eps:.2g} = {bound:.2g}: the update may be inaccurate by up to that relative "
          f"amount; {remedy}")


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def choose_solver(costs: dict[str, SolverCost], memory_budget: int,
                  requested: Solver | str = Solver.AUTO) -> tuple[str, str]:
  """Picks a solver, or refuses with a message naming one that fits.

  `auto` takes the cheapest (fewest predicted FLOPs) of the solvers that fit in memory.

  Returns:
    (solver name, human-readable reason).

  Raises:
    InsufficientMemoryError: the requested (or every) solver is predicted not to fit.
  """
  requested = Solver(requested)
  fitting = {k: v for k, v in costs.items() if v.bytes <= memory_budget}
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
    raise InsufficientMemoryError(
        f"no solver fits in {_gib(memory_budget)} (predicted {summary}); lower batch_size "
        "or the number of samples, or use a machine with more memory.")
  best = min(fitting.values(), key=lambda v: v.flops)
  reason = (f"auto: '{best.solver}' has the fewest predicted FLOPs among those fitting in "
            f"{_gib(memory_budget)} ({summary})")
  return best.solver, reason


# --------------------------------------------------------------------------------------
# Validation (before any heavy work).
# --------------------------------------------------------------------------------------


def _check_split(name: str, split) -> tuple[jnp.ndarray, jnp.ndarray]:
  if not isinstance(split, (tuple, list)) or len(split) != 2:
    raise TypeError(f"{name} must be a pair (x, y) of inputs and integer labels, "
                    f"got {type(split).__name__}")
  x, y = split
  if not hasattr(x, "shape") or not hasattr(y, "shape"):
    raise TypeError(f"{name}: x and y must be arrays, got {type(x).__name__}, "
                    f"{type(y).__name__}")
  if y.ndim != 1:
    raise ValueError(f"{name}: labels y must be 1-D integer class ids, got shape {y.shape}")
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise TypeError(f"{name}: labels y must be integers (class ids), got dtype {y.dtype}")
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"{name}: x has {x.shape[0]} samples but y has {y.shape[0]} labels")
  if x.shape[0] == 0:
    raise ValueError(f"{name} set is empty: nothing to "
                     + ("forget" if name == "forget" else "retain (forget set = all data?)"))
  return x, y


def _check_params_match(params_init: PyTree, params: PyTree) -> None:
  s_init, s_trained = jax.tree_util.tree_structure(params_init), jax.tree_util.tree_structure(params)
  if s_init != s_trained:
    raise ValueError("params and params_init have different pytree structure:\n"
                     f"  params_init: {s_init}\n  params:      {s_trained}")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params_init),
                          jax.tree_util.tree_leaves(params)):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(f"params and params_init differ in shape at "
                       f"{jax.tree_util.keystr(path)}: {jnp.shape(b)} vs {jnp.shape(a)}")
  if not jax.tree_util.tree_leaves(params):
    raise ValueError("params is an empty pytree: there is nothing trainable to update")


def _validate(apply_fn, params_init, params, retain, forget, num_classes, damping, solver,
              solve_dtype) -> tuple:
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable (params, x) -> logits, got {type(apply_fn)}")
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  try:
    solver = Solver(solver)
  except ValueError:
    raise ValueError(f"unknown solver {solver!r}; choose one of "
                     f"{[s.value for s in Solver]}") from None
  if _is_concrete(damping):
    if not np.isfinite(float(damping)) or float(damping) < 0:
      raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
  x_r, y_r = _check_split("retain", retain)
  x_f, y_f = _check_split("forget", forget)
  if x_r.shape[1:] != x_f.shape[1:]:
    raise ValueError(f"retain and forget inputs differ in per-sample shape: "
                     f"{x_r.shape[1:]} vs {x_f.shape[1:]}")
  for name, y in (("retain", y_r), ("forget", y_f)):
    if _is_concrete(y) and y.size:
      lo, hi = int(jnp.min(y)), int(jnp.max(y))
      if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} labels must lie in [0, {num_classes}), found range "
                         f"[{lo}, {hi}]")
  _check_params_match(params_init, params)
  _check_finite("params", params)
  _check_finite("params_init", params_init)
  _check_finite("retain inputs", x_r)
  _check_finite("forget inputs", x_f)
  if solve_dtype is not None:
    solve_dtype = jnp.dtype(solve_dtype)
    if solve_dtype == jnp.float64 and not jax.config.read("jax_enable_x64"):
      raise ValueError("solve_dtype=float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 or "
                       "jax.config.update('jax_enable_x64', True) before creating arrays")
  out = jax.eval_shape(apply_fn, params_init, jax.ShapeDtypeStruct((1,) + x_r.shape[1:], x_r.dtype))
  if out.shape != (1, num_classes):
    raise ValueError(f"apply_fn(params, x[:1]) returned shape {out.shape}; expected "
                     f"(1, num_classes={num_classes}): logits must be [n, C]")
  p = ntk.num_params(params)
  n = x_r.shape[0] + x_f.shape[0]
  if _is_concrete(damping) and float(damping) == 0.0:
    if p < n * num_classes:
      raise ValueError(
          f"damping=0 makes the system singular: p={p} trainable parameters < "
          f"n*C={n * num_classes} outputs, so the kernel has rank <= p; use damping > 0")
    if solver == Solver.PRIMAL and p > x_r.shape[0] * num_classes:
      raise ValueError(f"solver='primal' with damping=0 needs p <= n_r*C but p={p} > "
                       f"{x_r.shape[0] * num_classes} (J_rᵀJ_r is singular); use "
                       "solver='dual' or damping > 0")
  return solver, x_r, y_r, x_f, y_f, solve_dtype


# --------------------------------------------------------------------------------------
# The three solvers. Each returns (Δ pytree like params, aux dict of jnp scalars).
# --------------------------------------------------------------------------------------


def _chol_solve(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  factor = jax.scipy.linalg.cho_factor(a, lower=True)
  return jax.scipy.linalg.cho_solve(factor, b)


def _cond(a: jnp.ndarray) -> jnp.ndarray:
  """2-norm condition number of a symmetric matrix meant to be positive definite; inf when
  round-off makes its smallest eigenvalue non-positive (numerically singular)."""
  eig = jnp.linalg.eigvalsh(a)
  return jnp.where(eig[0] > 0, eig[-1] / eig[0], jnp.inf)


def _delta_dual(apply_fn, w_lin, x_r, e_r, x_f, e_f, lam, *, batch_size, kernel_impl,
                solve_dtype, with_aux):
  c = e_r.shape[1]
  kern = lambda a, b: ntk.kernel_to_matrix(ntk.empirical_kernel(
      apply_fn, w_lin, a, b, batch_size=batch_size, implementation=kernel_impl)).astype(solve_dtype)
  k_rr = kern(x_r, x_r)
  k_rf = kern(x_r, x_f)
  k_ff = kern(x_f, x_f)
  mr, mf = k_rr.shape[0], k_ff.shape[0]
  k_rr = k_rr + lam * jnp.eye(mr, dtype=solve_dtype)
  k_ff = k_ff + lam * jnp.eye(mf, dtype=solve_dtype)
  er = e_r.reshape(-1).astype(solve_dtype)
  ef = e_f.reshape(-1).astype(solve_dtype)
  rr_factor = jax.scipy.linalg.cho_factor(k_rr, lower=True)
  a = jax.scipy.linalg.cho_solve(rr_factor, k_rf)            # (Θ_rr+λI)⁻¹ Θ_rf
  schur = k_ff - k_rf.T @ a                                  # M⁻¹
  schur = 0.5 * (schur + schur.T)
  v = -ef + a.T @ er                                         # (f0_f - Y_f) + Θ_fr(Θ_rr+λI)⁻¹E_r
  z = _chol_solve(schur, v)                                  # M V
  u = ntk.vjp_rows(apply_fn, w_lin, x_f, z.reshape(-1, c), batch_size=batch_size)  # J_fᵀ M V
  ju = ntk.jvp_rows(apply_fn, w_lin, x_r, u, batch_size=batch_size).reshape(-1)
  s = jax.scipy.linalg.cho_solve(rr_factor, ju.astype(solve_dtype))
  back = ntk.vjp_rows(apply_fn, w_lin, x_r, s.reshape(-1, c), batch_size=batch_size)
  delta = jax.tree_util.tree_map(lambda x, y: x - y, u, back)  # P J_fᵀ M V
  aux = {"condition_number": _cond(k_rr)} if with_aux else {}
  return delta, aux


def _delta_primal(apply_fn, w_lin, x_r, e_r, x_f, e_f, lam, *, batch_size, solve_dtype,
                  with_aux):
  _, unravel = ravel_pytree(w_lin)
  g_r, b_r = ntk.gram(apply_fn, w_lin, x_r, e_r, batch_size=batch_size, dtype=solve_dtype)
  g_f, b_f = ntk.gram(apply_fn, w_lin, x_f, e_f, batch_size=batch_size, dtype=solve_dtype)
  delta, cond = primal_solve(g_r, b_r, g_f, b_f, lam, with_condition=with_aux)
  aux = {"condition_number": cond} if with_aux else {}
  return unravel(delta), aux


def primal_solve(g_r, b_r, g_f, b_f, damping, *, with_condition: bool = False):
  """The primal update from the Gram statistics of D_r and D_f.

  Args:
    g_r, g_f: J_rᵀJ_r and J_fᵀJ_f, [p, p].
    b_r, b_f: J_rᵀE_r and J_fᵀE_f, [p].
    damping: λ.
    with_condition: also return the condition number of G+λI (an O(p³) eigensolve).

  Returns:
    (Δ = (G_r+λI)⁻¹b_r - (G_r+G_f+λI)⁻¹(b_r+b_f) as a flat [p] vector, condition or None).
  """
  eye = damping * jnp.eye(g_r.shape[0], dtype=g_r.dtype)
  g_all = g_r + g_f + eye
  w_retrain = _chol_solve(g_r + eye, b_r)        # (G_r+λI)⁻¹ J_rᵀE_r   = w_r - w0
  w_full = _chol_solve(g_all, b_r + b_f)         # (G+λI)⁻¹ JᵀE         = w_D - w0
  return w_retrain - w_full, (_cond(g_all) if with_condition else None)


def _delta_cg(apply_fn, w_lin, x_r, e_r, x_f, e_f, lam, *, batch_size, solve_dtype, tol,
              maxiter, with_aux):
  flat, unravel = ravel_pytree(w_lin)
  p, c = flat.shape[0], e_r.shape[1]
  n_r, n_f = x_r.shape[0], x_f.shape[0]
  cast = lambda t: jax.tree_util.tree_map(lambda l: l.astype(solve_dtype), t)
  ravel = lambda t: ravel_pytree(cast(t))[0]
  jv = lambda x, v: ntk.jvp_rows(apply_fn, w_lin, x, unravel(v.astype(flat.dtype)),
                                 batch_size=batch_size).astype(solve_dtype)
  jtu = lambda x, u: ravel(ntk.vjp_rows(apply_fn, w_lin, x, u, batch_size=batch_size))
  er, ef = e_r.astype(solve_dtype), e_f.astype(solve_dtype)
  residuals = []

  def solve(matvec, rhs):
    dim = rhs.size
    iters = maxiter or min(2 * dim, _CG_DEFAULT_MAXITER_CAP)
    x, _ = jax.scipy.sparse.linalg.cg(matvec, rhs, tol=tol, maxiter=iters)
    if with_aux:
      residuals.append(jnp.linalg.norm(matvec(x) - rhs) / jnp.maximum(jnp.linalg.norm(rhs), 1e-300))
    return x

  if p <= (n_r + n_f) * c:
    # Parameter space: (J_rᵀJ_r + λI) x = J_rᵀE_r and (JᵀJ + λI) x = JᵀE.
    gr = lambda v: jtu(x_r, jv(x_r, v))
    gf = lambda v: jtu(x_f, jv(x_f, v))
    b_r, b_f = jtu(x_r, er), jtu(x_f, ef)
    w_retrain = solve(lambda v: gr(v) + lam * v, b_r)
    w_full = solve(lambda v: gr(v) + gf(v) + lam * v, b_r + b_f)
    delta = w_retrain - w_full
  else:
    # Output space: (Θ_rr + λI) α_r = E_r and (Θ + λI) α = E; Δ = J_rᵀα_r - Jᵀα.
    def theta(u):  # u: [n_r + n_f, C] -> Θ u
      v = jtu(x_r, u[:n_r]) + jtu(x_f, u[n_r:])
      return jnp.concatenate([jv(x_r, v), jv(x_f, v)], axis=0)
    alpha_r = solve(lambda u: jv(x_r, jtu(x_r, u)) + lam * u, er)
    alpha = solve(lambda u: theta(u) + lam * u, jnp.concatenate([er, ef], axis=0))
    delta = jtu(x_r, alpha_r) - jtu(x_r, alpha[:n_r]) - jtu(x_f, alpha[n_r:])
  aux = {"cg_relative_residual": jnp.max(jnp.stack(residuals))} if with_aux else {}
  return unravel(delta.astype(flat.dtype)), aux


def _one_hot_residuals(apply_fn, w_lin, x, y, num_classes, batch_size):
  logits = ntk.apply_rows(apply_fn, w_lin, x, batch_size=batch_size)
  return jax.nn.one_hot(y, num_classes, dtype=logits.dtype) - logits


def ridge_update(apply_fn: ApplyFn, w_lin: PyTree, retain, forget, *, num_classes: int,
                 damping: float, solver: str, batch_size: Optional[int] = 256,
                 kernel_impl: str = "auto", solve_dtype=None,
                 cg_tol: Optional[float] = None, cg_maxiter: Optional[int] = None,
                 with_aux: bool = False) -> tuple[PyTree, dict]:
  """Δ = w_r - w_D of kernel ridge regression linearised at `w_lin` (no validation).

  The building block of `ntk_forget`; `solver` must be a concrete "dual"|"primal"|"cg".

  Returns:
    (Δ pytree like `w_lin`, aux dict of scalar diagnostics when `with_aux`).
  """
  # Kernels, Grams and solves at full float32 (or float64) precision: on GPUs the default
  # float32 matmul uses TF32 (10-bit mantissa), which measured on an H200 made the dual and
  # primal updates differ by 67-85% (benchmarks/RESULTS.md); on CPUs this changes nothing.
  with jax.default_matmul_precision("highest"):
    return _ridge_update(apply_fn, w_lin, retain, forget, num_classes=num_classes,
                         damping=damping, solver=solver, batch_size=batch_size,
                         kernel_impl=kernel_impl, solve_dtype=solve_dtype, cg_tol=cg_tol,
                         cg_maxiter=cg_maxiter, with_aux=with_aux)


def _ridge_update(apply_fn, w_lin, retain, forget, *, num_classes, damping, solver, batch_size,
                  kernel_impl, solve_dtype, cg_tol, cg_maxiter, with_aux):
  (x_r, y_r), (x_f, y_f) = retain, forget
  leaves = jax.tree_util.tree_leaves(w_lin)
  sdtype = jnp.dtype(solve_dtype) if solve_dtype is not None else jnp.result_type(*leaves)
  e_r = _one_hot_residuals(apply_fn, w_lin, x_r, y_r, num_classes, batch_size)
  e_f = _one_hot_residuals(apply_fn, w_lin, x_f, y_f, num_classes, batch_size)
  lam = jnp.asarray(damping, sdtype)
  if solver == "dual":
    return _delta_dual(apply_fn, w_lin, x_r, e_r, x_f, e_f, lam, batch_size=batch_size,
                       kernel_impl=kernel_impl, solve_dtype=sdtype, with_aux=with_aux)
  if solver == "primal":
    return _delta_primal(apply_fn, w_lin, x_r, e_r, x_f, e_f, lam, batch_size=batch_size,
                         solve_dtype=sdtype, with_aux=with_aux)
  if solver == "cg":
    tol = cg_tol if cg_tol is not None else (1e-12 if sdtype == jnp.float64 else 1e-6)
    return _delta_cg(apply_fn, w_lin, x_r, e_r, x_f, e_f, lam, batch_size=batch_size,
                     solve_dtype=sdtype, tol=tol, maxiter=cg_maxiter, with_aux=with_aux)
  raise ValueError(f"ridge_update needs a concrete solver, got {solver!r}")


# --------------------------------------------------------------------------------------
# Public entry points.
# --------------------------------------------------------------------------------------


def prepare(apply_fn, params_init, params, retain, forget, num_classes, damping, solver,
             batch_size, solve_dtype, memory_limit_bytes, cg_maxiter, linearize_at,
             kernel_impl, traced: Optional[bool] = None):
  """Validates the inputs and picks the solver (what `ntk_forget` does before any work).

  `traced`: whether the update will run under `jax.jit` (for the cost model); None infers it
  from the inputs (tracers or not).

  Returns:
    (solver name, reason, costs, linearisation params, retain, forget, solve dtype).
  """
  solver, x_r, y_r, x_f, y_f, solve_dtype = _validate(
      apply_fn, params_init, params, retain, forget, num_classes, damping, solver, solve_dtype)
  try:
    linearize_at = LinearizationPoint(linearize_at)
  except ValueError:
    raise ValueError(f"unknown linearize_at {linearize_at!r}; choose 'init' or 'trained'") from None
  ntk.resolve_implementation(kernel_impl)  # unknown names fail here, before heavy work
  if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
    raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
  p = ntk.num_params(params)
  leaves_dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
  dtype_bytes = jnp.dtype(solve_dtype or leaves_dtype).itemsize
  costs = estimate_costs(p, x_r.shape[0], x_f.shape[0], num_classes,
                         batch_size=batch_size or (x_r.shape[0] + x_f.shape[0]),
                         dtype_bytes=dtype_bytes, cg_maxiter=cg_maxiter,
                         network=network_cost(apply_fn, params, x_r),
                         traced=(not _is_concrete(x_r)) if traced is None else traced)
  budget = int(memory_limit_bytes if memory_limit_bytes is not None
               else 0.8 * available_memory_bytes())
  name, reason = choose_solver(costs, budget, solver)
  log.info("ntk_forget: solver=%s (%s); p=%d, n*C=%d", name, reason, p,
           (x_r.shape[0] + x_f.shape[0]) * num_classes)
  w_lin = params_init if linearize_at == LinearizationPoint.INIT else params
  return name, reason, costs, w_lin, (x_r, y_r), (x_f, y_f), solve_dtype


def ntk_forget(apply_fn: ApplyFn, params_init: PyTree, params: PyTree, *, retain, forget,
               num_classes: int, damping: float = 1e-2, solver: str = "auto",
               batch_size: Optional[int] = 256, kernel_impl: str = "auto",
               solve_dtype=None, linearize_at: str = "init", step_scale: float = 1.0,
               cg_tol: Optional[float] = None, cg_maxiter: Optional[int] = None,
               memory_limit_bytes: Optional[int] = None) -> PyTree:
  """Forgets `forget` from `params` with the Fast-NTK update (Eq. (1), DESIGN.md §1).

  Pure and jit-able (shapes drive every choice; value checks run when inputs are concrete).

  Args:
    apply_fn: `(params, x) -> logits [n, C]`; params is the trainable pytree only, frozen
      weights and BatchNorm statistics closed over, BatchNorm in inference mode.
    params_init: w0, the trainable params before fine-tuning (the linearisation point).
    params: w_D, the trainable params after fine-tuning on D = D_r ∪ D_f.
    retain: (x_r [n_r, ...], y_r [n_r] int labels in [0, C)).
    forget: (x_f [n_f, ...], y_f [n_f] int labels in [0, C)).
    num_classes: C; targets are one_hot(y, C).
    damping: λ >= 0 added to the diagonal of every inverted kernel block (0 only when
      p >= n·C).
    solver: "dual" | "primal" | "cg" | "auto" (cheapest that fits in memory; logged).
    batch_size: rows per streamed block (bounds memory; None = all at once).
    kernel_impl: "auto" (default: neural-tangents when it imports, else "jax") |
      "neural_tangents" | "neural_tangents_ntk_vector_products" | "jax" (the dual solver's
      kernel; see `ntk.KernelImplementation`).
    solve_dtype: dtype of kernels/Grams in the solve (e.g. jnp.float64, needs x64);
      default: the params' dtype.
    linearize_at: "init" (default, w0) | "trained" (w_D; see `LinearizationPoint`).
    step_scale: multiplies Δ (1.0 = the exact update; other values are a heuristic).
    cg_tol, cg_maxiter: cg relative tolerance (default 1e-12 in float64, 1e-6 otherwise)
      and iteration cap (default min(2·dim, 2000)).
    memory_limit_bytes: memory budget for the solver choice/refusal (default 80% of the
      available device or host memory).

  Returns:
    Pytree with exactly the structure, shapes and dtypes of `params`: w_D + step_scale·Δ.

  Raises:
    ValueError / TypeError: bad input (named in the message), before any heavy work.
    InsufficientMemoryError: predicted memory beyond the budget (names what would fit).
  """
  name, _, _, w_lin, retain, forget, solve_dtype = prepare(
      apply_fn, params_init, params, retain, forget, num_classes, damping, solver,
      batch_size, solve_dtype, memory_limit_bytes, cg_maxiter, linearize_at, kernel_impl)
  delta, _ = ridge_update(apply_fn, w_lin, retain, forget, num_classes=num_classes,
                          damping=damping, solver=name, batch_size=batch_size,
                          kernel_impl=kernel_impl, solve_dtype=solve_dtype, cg_tol=cg_tol,
                          cg_maxiter=cg_maxiter)
  return _apply_delta(params, delta, step_scale)


def _apply_delta(params, delta, step_scale):
  return jax.tree_util.tree_map(
      lambda w, d: (w + step_scale * d.astype(w.dtype)).astype(w.dtype), params, delta)


def _peak_memory_probe():
  """Returns a function giving the peak memory growth (bytes) since this call, or None."""
  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      base = stats.get("bytes_in_use", 0)
      return lambda: int((device.memory_stats() or {}).get("peak_bytes_in_use", 0) - base)
    return lambda: None
  import resource  # pylint: disable=g-import-not-at-top
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
  return lambda: int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)


def ntk_forget_with_diagnostics(apply_fn: ApplyFn, params_init: PyTree, params: PyTree, *,
                                retain, forget, num_classes: int, damping: float = 1e-2,
                                solver: str = "auto", batch_size: Optional[int] = 256,
                                kernel_impl: str = "auto", solve_dtype=None,
                                linearize_at: str = "init", step_scale: float = 1.0,
                                cg_tol: Optional[float] = None,
                                cg_maxiter: Optional[int] = None,
                                memory_limit_bytes: Optional[int] = None,
                                check_finite: bool = True) -> tuple[PyTree, Diagnostics]:
  """`ntk_forget` run eagerly (jitted inside), timed, with a `Diagnostics` record.

  Same arguments as `ntk_forget`; additionally `check_finite` raises a ValueError naming the
  remedy if the update comes out non-finite (an ill-conditioned or singular system).

  Returns:
    (new params like `params`, Diagnostics).
  """
  name, reason, costs, w_lin, retain, forget, solve_dtype = prepare(
      apply_fn, params_init, params, retain, forget, num_classes, damping, solver,
      batch_size, solve_dtype, memory_limit_bytes, cg_maxiter, linearize_at, kernel_impl,
      traced=True)  # `run` below is jitted
  probe = _peak_memory_probe()

  def run(w_lin, params, retain, forget, damping):
    delta, aux = ridge_update(apply_fn, w_lin, retain, forget, num_classes=num_classes,
                              damping=damping, solver=name, batch_size=batch_size,
                              kernel_impl=kernel_impl, solve_dtype=solve_dtype,
                              cg_tol=cg_tol, cg_maxiter=cg_maxiter, with_aux=True)
    new = _apply_delta(params, delta, step_scale)
    norm = step_scale * jnp.sqrt(sum(jnp.vdot(d, d) for d in jax.tree_util.tree_leaves(delta)))
    return new, aux, norm

  args = (w_lin, params, retain, forget, damping)
  start = time.perf_counter()
  compiled = jax.jit(run).lower(*args).compile()
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  new, aux, norm = jax.block_until_ready(compiled(*args))
  seconds = time.perf_counter() - start
  measured = probe()
  norm = float(norm)
  if check_finite and not np.isfinite(norm):
    raise ValueError(
        f"the Fast-NTK update is non-finite (solver={name}, damping={damping}): the system "
        "is singular or too ill-conditioned in this precision; increase damping or pass "
        "solve_dtype=jnp.float64 (with JAX_ENABLE_X64=1)")
  cond = aux.get("condition_number")
  resid = aux.get("cg_relative_residual")
  warning = precision_warning(None if cond is None else float(cond),
                              solve_dtype or jnp.result_type(*jax.tree_util.tree_leaves(w_lin)))
  if warning:
    log.warning("ntk_forget: %s", warning)
  diag = Diagnostics(
      solver=name, reason=reason, num_params=ntk.num_params(params),
      num_outputs=(retain[0].shape[0] + forget[0].shape[0]) * num_classes,
      condition_number=None if cond is None else float(cond),
      cg_relative_residual=None if resid is None else float(resid),
      estimated_bytes=costs[name].bytes, measured_bytes=measured, seconds=seconds,
      compile_seconds=compile_seconds,
      update_norm=norm, costs={k: dataclasses.asdict(v) for k, v in costs.items()},
      precision_warning=warning)
  log.info("ntk_forget: %s", diag)
  return new, diag


def ntk_forget_requests(apply_fn: ApplyFn, params_init: PyTree, params: PyTree, *, train,
                        requests: Sequence, num_classes: int, damping: float = 1e-2,
                        **stream_options):
  """Serves a sequence of forget requests one after another, each incrementally.

  The Gram matrix of D and its Cholesky factor are computed once at w0 and *downdated* per
  request (`fastntk_jax.stream`), so a later request costs a small fraction of the first.
  After k requests the params equal `ntk_forget` with the union of the k forget sets.

  Args:
    apply_fn, params_init, params: as for `ntk_forget` (params = w_D, fine-tuned on D).
    train: (x [n, ...], y [n]) the whole fine-tuning set D; requests index into it.
    requests: a sequence of integer index arrays, one per deletion request.
    num_classes, damping: as for `ntk_forget` (damping > 0).
    **stream_options: passed to `stream.init_forget_state` (batch_size, solve_dtype, ...).

  Returns:
    (params after the last request, the final `stream.ForgetState`; serve further requests
     with `stream.forget_request(state, params, indices)`).
  """
  from fastntk_jax import stream  # pylint: disable=g-import-not-at-top
  state = stream.init_forget_state(apply_fn, params_init, train=train, num_classes=num_classes,
                                   damping=damping, **stream_options)
  return stream.forget_requests(state, params, requests)
