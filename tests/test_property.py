"""Property-based: random shapes, class counts and damping on linear models give the exact
retain ridge solution or a clean refusal — never a silent wrong answer."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st
from x64 import enable_x64

from fastntk_jax import unlearn
from test_unlearn_exact import make_problem, ridge


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_r=st.integers(1, 12), n_f=st.integers(1, 5), c=st.integers(2, 4),
       pa=st.sampled_from([2, 4, 8]), pw=st.integers(1, 10),
       damping=st.sampled_from([0.0, 1e-3, 1e-1, 1.0]),
       solver=st.sampled_from(["dual", "primal", "cg", "auto"]), seed=st.integers(0, 1000))
def test_exact_or_clean_refusal(n_r, n_f, c, pa, pw, damping, solver, seed):
  with enable_x64():
    model, x_r, y_r, x_f, y_f, w0 = make_problem(n_r, n_f, c, pa=pa, pw=pw, seed=seed)
    y_f = np.minimum(y_f, c - 1)
    phi_r, phi_f = model.features(x_r), model.features(x_f)
    onehot = lambda y: np.eye(c)[y]
    n_out = (n_r + n_f) * c
    # Which refusals are legitimate is decided here independently of the library.
    singular = damping == 0.0 and model.p < n_out
    primal_singular = damping == 0.0 and solver == "primal" and model.p > n_r * c
    if damping == 0.0 and not singular:
      # The full kernel must really be invertible for an exactness claim at λ = 0.
      phi = np.concatenate([phi_r, phi_f])
      if np.linalg.cond(phi @ phi.T) > 1e8 or np.linalg.cond(phi_r @ phi_r.T) > 1e8:
        return
    lam = damping
    w_full = ridge(np.concatenate([phi_r, phi_f]), w0,
                   np.concatenate([onehot(y_r), onehot(y_f)]), lam) if not singular else w0
    kwargs = dict(retain=(jnp.asarray(x_r), jnp.asarray(y_r)),
                  forget=(jnp.asarray(x_f), jnp.asarray(y_f)), num_classes=c, damping=lam,
                  solver=solver, batch_size=4)
    if singular or primal_singular:
      try:
        unlearn.ntk_forget(model.apply, model.unravel(w0), model.unravel(w_full), **kwargs)
      except ValueError as e:
        assert "damping" in str(e)
        return
      raise AssertionError("a singular system was not refused")
    new = unlearn.ntk_forget(model.apply, model.unravel(w0), model.unravel(w_full), **kwargs)
    got = np.concatenate([np.asarray(new["a"]).reshape(-1), np.asarray(new["b"]["bias"]),
                          np.asarray(new["b"]["w"])])
    w_retrain = ridge(phi_r, w0, onehot(y_r), lam)
    scale = max(np.linalg.norm(w_retrain), 1e-12)
    assert np.linalg.norm(got - w_retrain) / scale < 1e-6, (solver, lam)
