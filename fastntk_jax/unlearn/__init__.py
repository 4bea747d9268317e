"""Fast-NTK unlearning: the update (the paper's Eq. (1), docs/derivation.md), its solvers,
their plan, one set of input checks, and the request stream. Read top to bottom:

  solvers.py   the math: residuals, Gram statistics, the dual / primal / cg deltas, apply
  plan.py      cost model, memory, solver choice -> a frozen `Plan`
  validate.py  every input check, the one damping rule, run-time checks under jit
  api.py       `make_forgetter` (options validated once -> pure functions), `ntk_forget`,
               `ntk_forget_with_diagnostics`
  stream.py    deletion requests served from a persisted Gram and Cholesky factor
  certificate.py  a bound on the distance to retraining, re-checkable without retraining
  linear.py    the linearised model the update is exact for, and its closed-form minimiser
"""

from fastntk_jax.enums import KernelImplementation, LinearizationPoint, Solver
from fastntk_jax.unlearn import certificate
from fastntk_jax.unlearn import linear
from fastntk_jax.unlearn import stream
from fastntk_jax.unlearn.api import (Diagnostics, Forgetter, make_diagnostics, make_forgetter,
                                     ntk_forget, ntk_forget_requests,
                                     ntk_forget_with_diagnostics, peak_memory_probe)
from fastntk_jax.unlearn.certificate import Certificate, certify, logit_bound, retain_gradient
from fastntk_jax.unlearn.linear import Linearized, linearize, ridge_solution
from fastntk_jax.unlearn.plan import (PRECISION_WARNING_THRESHOLD, InsufficientMemoryError,
                                      NetworkCost, Plan, SolverCost, available_memory_bytes,
                                      cg_iteration_budget, choose_solver, estimate_costs,
                                      network_cost, precision_warning)
from fastntk_jax.unlearn.solvers import (SolveInfo, accumulate_chunks, apply_delta, gram_stats,
                                         primal_solve, ridge_update)
from fastntk_jax.unlearn.validate import PrecisionWarning, SolveError

__all__ = [
    "Certificate", "certificate", "certify", "logit_bound", "retain_gradient",
    "Diagnostics", "Forgetter", "Linearized", "linear", "linearize", "ridge_solution", "InsufficientMemoryError", "KernelImplementation",
    "LinearizationPoint", "NetworkCost", "PRECISION_WARNING_THRESHOLD", "Plan", "PrecisionWarning", "SolveError",
    "SolveInfo", "Solver", "SolverCost", "accumulate_chunks", "apply_delta",
    "available_memory_bytes", "cg_iteration_budget", "choose_solver", "estimate_costs",
    "gram_stats", "make_diagnostics", "make_forgetter", "network_cost", "ntk_forget",
    "ntk_forget_requests", "ntk_forget_with_diagnostics", "peak_memory_probe",
    "precision_warning", "primal_solve", "ridge_update", "stream",
]
