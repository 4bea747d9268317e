"""Fast-NTK unlearning: the update (the paper's Eq. (1), docs/derivation.md), its solvers,
their plan, one set of input checks, the request stream and the certificate. Read top to
bottom:

  solvers.py      the update's three solvers (dual / primal / cg) and how Δ is applied
  plan.py         cost model, memory, solver choice -> a frozen `Plan`
  validate.py     every input check and the one damping rule
  api.py          `make_forgetter` (options validated once -> pure functions), `ntk_forget`,
                  `ntk_forget_with_diagnostics`
  stream.py       deletion requests served from a persisted Gram and Cholesky factor
  certificate.py  a bound on the distance to retraining, re-checkable without retraining
  linear.py       the linearised model the update is exact for, and its closed-form minimiser

The linear algebra all of them use (factorisations, the ridge solve, the precision rule) is
`fastntk_jax.linalg`; the network's Jacobians and Grams are `fastntk_jax.ntk`. This package
exports the names a user needs; everything else is importable from its module.
"""

from fastntk_jax.enums import KernelImplementation, LinearizationPoint, Solver
from fastntk_jax.linalg import PrecisionWarning, SolveError
from fastntk_jax.unlearn.api import (Diagnostics, Forgetter, make_forgetter, ntk_forget,
                                     ntk_forget_requests, ntk_forget_with_diagnostics)
from fastntk_jax.unlearn.certificate import Certificate, certify
from fastntk_jax.unlearn.plan import InsufficientMemoryError, Plan
from fastntk_jax.unlearn.stream import ForgetState

__all__ = [
    "Certificate", "Diagnostics", "ForgetState", "Forgetter", "InsufficientMemoryError",
    "KernelImplementation", "LinearizationPoint", "Plan", "PrecisionWarning", "SolveError",
    "Solver", "certify", "make_forgetter", "ntk_forget", "ntk_forget_requests",
    "ntk_forget_with_diagnostics",
]
