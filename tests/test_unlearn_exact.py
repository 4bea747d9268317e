"""Exactness of the Fast-NTK update on models linear in their parameters (docs/derivation.md §1).

For f(w, x) = Φ(x) w the linearisation is exact, so the update applied to the ridge
solution on D must return the ridge solution on D_r. The ridge solutions are computed here
independently, with numpy, from an explicitly built feature matrix Φ.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from x64 import enable_x64

from fastntk_jax import unlearn

SOLVERS = ["dual", "primal", "cg"]


class LinearModel:
  """f(w, x)_c = Σ_kj x_k A1[k,c,j] a_j + Σ_kj tanh(x)_k A2[k,c,j] w_j + bias_c.

  Every class shares every weight through A1/A2, so the per-sample C×C kernel blocks are
  dense (not diagonal); the params are a pytree of three leaves in two levels.
  """

  def __init__(self, d, num_classes, pa, pw, seed):
    rng = np.random.default_rng(seed)
    self.c = num_classes
    self.a1 = rng.normal(size=(d, num_classes, pa)) / np.sqrt(d * pa)
    self.a2 = rng.normal(size=(d, num_classes, pw)) / np.sqrt(d * pw)
    self.pa, self.pw = pa, pw

  def apply(self, params, x):
    return (jnp.einsum("nk,kcj,j->nc", x, self.a1, params["a"].reshape(-1))
            + jnp.einsum("nk,kcj,j->nc", jnp.tanh(x), self.a2, params["b"]["w"])
            + params["b"]["bias"])

  def features(self, x):
    """Φ: [n*C, p] in the ravel order of {'a', 'b': {'bias', 'w'}} (sorted dict keys)."""
    x = np.asarray(x)
    fa = np.einsum("nk,kcj->ncj", x, self.a1)
    fb = np.broadcast_to(np.eye(self.c), (x.shape[0], self.c, self.c))
    fw = np.einsum("nk,kcj->ncj", np.tanh(x), self.a2)
    return np.concatenate([fa, fb, fw], axis=-1).reshape(x.shape[0] * self.c, -1)

  def unravel(self, vec):
    pa, c = self.pa, self.c
    return {"a": jnp.asarray(vec[:pa]).reshape(2, pa // 2),
            "b": {"bias": jnp.asarray(vec[pa:pa + c]), "w": jnp.asarray(vec[pa + c:])}}

  @property
  def p(self):
    return self.pa + self.c + self.pw


def ridge(phi, w0, y_onehot, lam):
  """w0 + Φᵀ(ΦΦᵀ + λI)⁻¹(Y - Φ w0), solved with numpy in float64."""
  e = y_onehot.reshape(-1) - phi @ w0
  return w0 + phi.T @ np.linalg.solve(phi @ phi.T + lam * np.eye(phi.shape[0]), e)


def make_problem(n_r, n_f, num_classes, pa, pw, seed=0, d=5):
  rng = np.random.default_rng(seed + 100)
  model = LinearModel(d, num_classes, pa, pw, seed)
  x_r = rng.normal(size=(n_r, d))
  x_f = rng.normal(size=(n_f, d)) + 0.5
  y_r = rng.integers(0, num_classes, size=n_r)
  y_f = np.full(n_f, num_classes - 1)
  w0 = rng.normal(size=model.p) * 0.3
  return model, x_r, y_r, x_f, y_f, w0


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("regime,n_r,n_f,lam", [
    ("p>nC", 4, 2, 1e-3),   # p = 31 > n*C = 18: the kernel is invertible, λ tiny
    ("p<nC", 16, 6, 0.1),   # p = 31 < n*C = 66: Θ_rr singular, λ > 0 required
])
def test_update_maps_full_ridge_solution_to_retain_ridge_solution(solver, regime, n_r, n_f, lam):
  with enable_x64():
    c = 3
    model, x_r, y_r, x_f, y_f, w0 = make_problem(n_r, n_f, c, pa=12, pw=16)
    assert (model.p > (n_r + n_f) * c) == (regime == "p>nC")
    phi_r, phi_f = model.features(x_r), model.features(x_f)
    phi = np.concatenate([phi_r, phi_f])
    # Sanity of the independent feature matrix: Φ w equals the model's logits.
    np.testing.assert_allclose(phi_r @ w0, np.asarray(model.apply(model.unravel(w0), jnp.asarray(x_r))).reshape(-1), rtol=1e-12)
    onehot = lambda y: np.eye(c)[y]
    w_full = ridge(phi, w0, np.concatenate([onehot(y_r), onehot(y_f)]), lam)
    w_retrain = ridge(phi_r, w0, onehot(y_r), lam)
    assert np.linalg.norm(w_full - w_retrain) > 1e-2 * np.linalg.norm(w_retrain)  # non-trivial

    new = unlearn.ntk_forget(
        model.apply, model.unravel(w0), model.unravel(w_full),
        retain=(jnp.asarray(x_r), jnp.asarray(y_r)), forget=(jnp.asarray(x_f), jnp.asarray(y_f)),
        num_classes=c, damping=lam, solver=solver, batch_size=3)

    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(model.unravel(w0))
    got = np.concatenate([np.asarray(new["a"]).reshape(-1), np.asarray(new["b"]["bias"]),
                          np.asarray(new["b"]["w"])])
    rel = np.linalg.norm(got - w_retrain) / np.linalg.norm(w_retrain)
    assert rel < 1e-8, f"{solver} {regime}: relative error {rel:.2e}"


def test_printed_sign_of_eq1_does_not_reach_retrain():
  """The library's update is Eq. (1) with V = (f0 - Y_f) + ...; the commonly printed
  V = (Y_f - f0) + ... misses w_r. Both are written out here with NumPy; the library must
  equal the first (guards the sign)."""
  with enable_x64():
    c, lam = 3, 1e-3
    model, x_r, y_r, x_f, y_f, w0 = make_problem(4, 2, c, pa=12, pw=16)
    phi_r, phi_f = model.features(x_r), model.features(x_f)
    onehot = lambda y: np.eye(c)[y]
    w_full = ridge(np.concatenate([phi_r, phi_f]), w0,
                   np.concatenate([onehot(y_r), onehot(y_f)]), lam)
    w_retrain = ridge(phi_r, w0, onehot(y_r), lam)
    k = lambda a, b: a @ b.T
    kr = k(phi_r, phi_r) + lam * np.eye(len(phi_r))
    e_r = onehot(y_r).reshape(-1) - phi_r @ w0
    e_f = onehot(y_f).reshape(-1) - phi_f @ w0
    m = np.linalg.inv(k(phi_f, phi_f) + lam * np.eye(len(phi_f))
                      - k(phi_f, phi_r) @ np.linalg.solve(kr, k(phi_r, phi_f)))
    proj = np.eye(model.p) - phi_r.T @ np.linalg.solve(kr, phi_r)
    by_sign = {}
    for sign in (-1.0, +1.0):
      v = sign * e_f + k(phi_f, phi_r) @ np.linalg.solve(kr, e_r)
      by_sign[sign] = w_full + proj @ phi_f.T @ m @ v
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel(by_sign[-1.0], w_retrain) < 1e-10 and rel(by_sign[+1.0], w_retrain) > 0.1
    for solver in SOLVERS:
      new = unlearn.ntk_forget(model.apply, model.unravel(w0), model.unravel(w_full),
                               retain=(jnp.asarray(x_r), jnp.asarray(y_r)),
                               forget=(jnp.asarray(x_f), jnp.asarray(y_f)), num_classes=c,
                               damping=lam, solver=solver)
      got = np.concatenate([np.asarray(new["a"]).reshape(-1), np.asarray(new["b"]["bias"]),
                            np.asarray(new["b"]["w"])])
      assert rel(got, by_sign[-1.0]) < 1e-8 and rel(got, by_sign[+1.0]) > 0.1, solver


@pytest.mark.slow
@pytest.mark.parametrize("solver", SOLVERS)
def test_jit_of_a_function_calling_ntk_forget(solver):
  with enable_x64():
    c, lam = 3, 0.1
    model, x_r, y_r, x_f, y_f, w0 = make_problem(10, 4, c, pa=12, pw=16)
    w_d = w0 + 0.1
    args = (model.unravel(w0), model.unravel(w_d), jnp.asarray(x_r), jnp.asarray(y_r),
            jnp.asarray(x_f), jnp.asarray(y_f))

    def forget(w0, w, xr, yr, xf, yf):
      return unlearn.ntk_forget(model.apply, w0, w, retain=(xr, yr), forget=(xf, yf),
                                num_classes=c, damping=lam, solver=solver, batch_size=4)

    eager = forget(*args)
    jitted = jax.jit(forget)(*args)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # The update really moved the params (the test is not comparing two no-ops).
    moved = sum(float(jnp.sum(jnp.abs(a - b))) for a, b in
                zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(args[1])))
    assert moved > 1e-3


def test_sequence_of_requests_equals_one_update_with_their_union():
  """unlearn.ntk_forget_requests (incremental, downdated) == ntk_forget(union) in float64."""
  with enable_x64():
    c, lam = 3, 0.1
    model, x_r, y_r, x_f, y_f, w0 = make_problem(16, 6, c, pa=12, pw=16)
    x = np.concatenate([x_r, x_f])
    y = np.concatenate([y_r, y_f])
    phi = model.features(x)
    w_full = ridge(phi, w0, np.eye(c)[y], lam)
    requests = [np.array([3, 17]), np.array([20]), np.array([0, 9, 21])]
    union = np.concatenate(requests)
    keep = np.setdiff1d(np.arange(len(y)), union)
    new, state = unlearn.ntk_forget_requests(
        model.apply, model.unravel(w0), model.unravel(w_full),
        train=(jnp.asarray(x), jnp.asarray(y)), requests=requests, num_classes=c, damping=lam,
        batch_size=4)
    once = unlearn.ntk_forget(
        model.apply, model.unravel(w0), model.unravel(w_full),
        retain=(jnp.asarray(x[keep]), jnp.asarray(y[keep])),
        forget=(jnp.asarray(x[union]), jnp.asarray(y[union])), num_classes=c, damping=lam,
        solver="primal", batch_size=4)
    flat = lambda t: np.concatenate([np.asarray(l).reshape(-1) for l in jax.tree_util.tree_leaves(t)])
    w_retrain = ridge(model.features(x[keep]), w0, np.eye(c)[y[keep]], lam)
    assert np.linalg.norm(flat(new) - flat(once)) / np.linalg.norm(flat(once)) < 1e-8
    got = np.concatenate([np.asarray(new["a"]).reshape(-1), np.asarray(new["b"]["bias"]),
                          np.asarray(new["b"]["w"])])
    assert np.linalg.norm(got - w_retrain) / np.linalg.norm(w_retrain) < 1e-8
