"""Host-side cost of the certificate's Gram basis (linearised closed form) at p."""
import sys, time, json
import numpy as np
from fastntk_jax.unlearn import certificate
from fastntk_jax import linalg
p = int(sys.argv[1]); m = int(sys.argv[2]); lam = 1e-2
rng = np.random.default_rng(0)
t = time.perf_counter()
J = rng.standard_normal((m, p)) / np.sqrt(p)
g = J.T @ J; b = J.T @ rng.standard_normal(m)
prep = time.perf_counter() - t
w_r = np.linalg.solve(g + lam * np.eye(p), b)
delta = w_r + 1e-7 * rng.standard_normal(p)
out = {"p": p, "m": m, "prep_s": prep}
t = time.perf_counter(); linalg.smallest_eigenvalue(certificate.model_gram(g)); out["eigvalsh_s"] = time.perf_counter() - t
t = time.perf_counter(); d, bound, steps = certificate.stats_witness(delta, g, b, lam); out["stats_witness_s"] = time.perf_counter() - t; out["refinements"] = steps
t = time.perf_counter(); linalg.reference_ridge_solve(g, b, lam); out["reference_ridge_solve_s"] = time.perf_counter() - t
print(json.dumps(out))
