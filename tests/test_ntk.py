"""neural-tangents' kernel vs an independent reference, and the streamed helpers vs full J."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from optional import needs_neural_tangents
from x64 import enable_x64

from fastntk_jax import ntk


class TinyBNCNN(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), param_dtype=jnp.float64)(x)
    x = nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64)(x)
    x = nn.relu(x)
    x = nn.Conv(4, (3, 3), strides=2, param_dtype=jnp.float64)(x)
    x = nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(self.num_classes, param_dtype=jnp.float64)(x)


class TinyBNMLP(nn.Module):
  """Dense + BatchNorm + tanh: nonlinear in its trainable BN/head params, and free of the
  convolutions whose float64 results XLA:CPU changes by ~1e-7 between jit and eager."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in (6, 5):
      x = nn.Dense(width, param_dtype=jnp.float64)(x)
      x = nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64)(x)
      x = jnp.tanh(x)
    return nn.Dense(self.num_classes, param_dtype=jnp.float64)(x)


class TinyAttention(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    tokens = x.reshape(x.shape[0], -1, x.shape[-1] * 4)  # 2x2 "patches" of 4 pixels each
    tokens = nn.Dense(8, param_dtype=jnp.float64)(tokens)
    tokens = tokens + nn.MultiHeadDotProductAttention(
        num_heads=2, param_dtype=jnp.float64)(tokens, tokens)
    return nn.Dense(self.num_classes, param_dtype=jnp.float64)(tokens.mean(axis=1))


def split_apply(model, x, trainable_prefixes, rng=0):
  """Builds apply_fn(trainable, x) closing over the other params and random BN statistics."""
  variables = model.init(jax.random.PRNGKey(rng), x)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  is_trainable = lambda k: any(k.startswith(p) for p in trainable_prefixes)
  trainable = {k: v for k, v in flat.items() if is_trainable(k)}
  frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
  stats = variables.get("batch_stats")
  if stats is not None:  # non-trivial running statistics, so inference-mode BN matters
    keys = iter(jax.random.split(jax.random.PRNGKey(rng + 1), 64))
    stats = jax.tree_util.tree_map(
        lambda s: jnp.abs(s + jax.random.normal(next(keys), s.shape, s.dtype)), stats)

  def apply_fn(trainable, x):
    params = traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")
    v = {"params": params} if stats is None else {"params": params, "batch_stats": stats}
    return model.apply(v, x)

  return apply_fn, trainable


@pytest.mark.parametrize("model,prefixes", [
    (TinyBNCNN(), ("BatchNorm_", "Dense_")),
    (TinyAttention(), ("MultiHeadDotProductAttention_0/query", "Dense_1")),
], ids=["bn_cnn", "attention"])
@pytest.mark.parametrize("impl", ["neural_tangents", "neural_tangents_ntk_vector_products"])
@needs_neural_tangents
def test_neural_tangents_kernel_equals_reference(model, prefixes, impl):
  with enable_x64():
    x1 = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 2), jnp.float64)
    x2 = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 2), jnp.float64)
    apply_fn, params = split_apply(model, x1, prefixes)
    ref = ntk.reference_kernel(apply_fn, params, x1, x2)
    assert ref.shape == (5, 3, 3, 3)
    # Cross-class entries are non-zero: the test checks the full C x C blocks.
    assert float(jnp.abs(ref[:, :, 0, 1]).max()) > 1e-6
    for batch_size in (None, 2):  # 2: padded, blocked path
      got = ntk.empirical_kernel(apply_fn, params, x1, x2, batch_size=batch_size,
                                 implementation=impl)
      np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_kernel_is_jacobian_product_and_helpers_agree():
  with enable_x64():
    x = jax.random.normal(jax.random.PRNGKey(0), (7, 4, 4, 2), jnp.float64)
    apply_fn, params = split_apply(TinyBNCNN(), x, ("BatchNorm_", "Dense_"))
    j = ntk.jacobian(apply_fn, params, x)
    p = ntk.num_params(params)
    assert j.shape == (7 * 3, p)
    # kernel_to_matrix of the neural-tangents kernel is J Jᵀ in sample-major order.
    k = ntk.kernel_to_matrix(ntk.empirical_kernel(apply_fn, params, x, batch_size=3))
    # rtol 1e-6, not 1e-10: on jax >= 0.10 XLA's fused code evaluates the float32 BatchNorm
    # statistics differently from op by op (~1e-7 relative); exact on jax 0.5.3.
    np.testing.assert_allclose(k, j @ j.T, rtol=1e-6, atol=1e-9)
    # Streamed Gram and Jᵀr equal the dense ones. Eagerly, `gram` runs each block as its own
    # compiled program, and XLA:CPU evaluates this float64 conv net differently there than
    # op by op (~1e-8 relative; see test_unlearn_api), hence rtol 1e-6, not 1e-10.
    r = jax.random.normal(jax.random.PRNGKey(2), (7, 3), jnp.float64)
    g, b = ntk.gram(apply_fn, params, x, r, batch_size=3)
    np.testing.assert_allclose(g, j.T @ j, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, j.T @ r.reshape(-1), rtol=1e-6, atol=1e-7)
    g_jit, _ = jax.jit(lambda p, x, r: ntk.gram(apply_fn, p, x, r, batch_size=3))(params, x, r)
    np.testing.assert_allclose(g_jit, g, rtol=1e-6, atol=1e-7)  # traced (unrolled) path
    # jvp/vjp rows equal J v and Jᵀu.
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    v = jax.random.normal(jax.random.PRNGKey(3), flat.shape, jnp.float64)
    np.testing.assert_allclose(
        ntk.jvp_rows(apply_fn, params, x, unravel(v), batch_size=3).reshape(-1), j @ v,
        rtol=1e-6, atol=1e-7)
    pulled = jax.flatten_util.ravel_pytree(ntk.vjp_rows(apply_fn, params, x, r, batch_size=3))[0]
    np.testing.assert_allclose(pulled, j.T @ r.reshape(-1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ntk.apply_rows(apply_fn, params, x, batch_size=3),
                               apply_fn(params, x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("model,prefixes", [
    (TinyBNCNN(num_classes=10), ("BatchNorm_", "Dense_")),  # 10 > 4 logits: grouped pullbacks
    (TinyAttention(), ("MultiHeadDotProductAttention_0/query", "Dense_1")),
    (TinyBNMLP(), ("BatchNorm_", "Dense_2")),
], ids=["bn_cnn_c10", "attention", "bn_mlp"])
@pytest.mark.slow
def test_jacobian_methods_equal_forward_mode(model, prefixes, monkeypatch):
  """Both ways of batching the reverse passes give forward mode's per-sample Jacobian."""
  monkeypatch.setattr(ntk, "MAX_UNROLLED_PULLBACKS", 4)  # groups of 3, 3, 2, 2 logits at C=10
  with enable_x64():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 2), jnp.float64)
    apply_fn, params = split_apply(model, x, prefixes)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    want = jax.jit(jax.jacfwd(lambda w: apply_fn(unravel(w), x)))(flat)  # [n, C, p]
    n, c, p = want.shape
    scale = float(jnp.abs(want).max())
    assert scale > 1e-3
    # The BatchNorm statistics are float32: XLA evaluates them differently per program
    # (~1e-7 relative), hence tolerances of float32 round-off, not float64's.
    tol = dict(rtol=1e-5, atol=1e-6 * scale)
    w2 = want.reshape(-1, p)
    for method in (ntk.JacobianMethod.BATCHED_COTANGENTS, ntk.JacobianMethod.PULLBACKS):
      # Blocks of 2 (the last one padded) inside one traced program, as the solvers run it.
      rows, g = jax.jit(lambda w, x: (
          ntk.jacobian_rows(apply_fn, w, x, batch_size=2, method=method),
          ntk.gram(apply_fn, w, x, jnp.zeros((n, c)), batch_size=2, method=method)[0]))(
              params, x)
      np.testing.assert_allclose(rows, want, **tol, err_msg=method.value)
      np.testing.assert_allclose(g, w2.T @ w2, rtol=1e-5, atol=1e-6 * scale ** 2,
                                 err_msg=method.value)


def test_auto_jacobian_method_and_bad_names():
  want = "pullbacks" if jax.default_backend() == "cpu" else "batched_cotangents"
  assert ntk.resolve_jacobian_method("auto").value == want
  with jax.default_device(jax.devices("cpu")[0]):
    assert ntk.resolve_jacobian_method("auto") == ntk.JacobianMethod.PULLBACKS
    # Many logits: PULLBACKS' unrolled backward passes compile slowly; AUTO batches them.
    limit = ntk.PULLBACKS_MAX_OUTPUTS
    assert ntk.resolve_jacobian_method("auto", limit) == ntk.JacobianMethod.PULLBACKS
    assert (ntk.resolve_jacobian_method("auto", limit + 1)
            == ntk.JacobianMethod.BATCHED_COTANGENTS)
    assert (ntk.resolve_jacobian_method("pullbacks", limit + 1)
            == ntk.JacobianMethod.PULLBACKS)
  assert (ntk.resolve_jacobian_method("batched_cotangents")
          == ntk.JacobianMethod.BATCHED_COTANGENTS)
  x = jnp.ones((2, 4, 4, 2))
  apply_fn, params = split_apply(TinyBNMLP(), x, ("Dense_2",))
  for bad in ("svd", "PULLBACKS", None):
    with pytest.raises(ValueError, match="jacobian method"):
      ntk.jacobian(apply_fn, params, x, method=bad)


class ScalarCNN(nn.Module):
  """One logit per sample, as [n] (not [n, 1]), through a convolution."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3))(x))
    return nn.Dense(1)(x.mean(axis=(1, 2)))[:, 0]


class TokenCNN(nn.Module):
  """Logits [n, T, C] (per-token outputs)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1, 3 * x.shape[2]))


@pytest.mark.slow
@pytest.mark.parametrize("model", [ScalarCNN(), TokenCNN()], ids=["logits_n", "logits_n_t_c"])
def test_pullbacks_take_outputs_of_any_rank_like_vmap_jacrev(model):
  """Helper-10 found PULLBACKS (AUTO's choice on CPU) refusing [n] and [n, T, C] outputs that
  vmap(jacrev) took: each sample's output is flattened for the cotangents and shaped back."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
  v = model.init(jax.random.PRNGKey(1), x)
  apply_fn = lambda p, x: model.apply(p, x)
  want = ntk._per_sample_jacobian(apply_fn, v, x, "batched_cotangents")  # pylint: disable=protected-access
  got = ntk._per_sample_jacobian(apply_fn, v, x, "pullbacks")  # pylint: disable=protected-access
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert ntk.jacobian(apply_fn, v, x, method="pullbacks").shape == (
      want.size // want.shape[-1], want.shape[-1])


def test_jacobian_of_an_empty_parameter_tree_is_empty():
  x = jnp.ones((3, 4, 4, 2))
  apply_fn = lambda p, x: jnp.tile(x.reshape(x.shape[0], -1)[:, :1], (1, 4))  # no params
  for method in ("pullbacks", "batched_cotangents"):
    assert ntk.jacobian(apply_fn, {}, x, method=method).shape == (12, 0)
    assert ntk.jacobian_rows(apply_fn, {}, x, batch_size=2, method=method).shape == (3, 4, 0)


@pytest.mark.slow
def test_builtin_kernel_equals_reference_one_block_and_blocked():
  with enable_x64():
    x1 = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 2), jnp.float64)
    x2 = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 2), jnp.float64)
    apply_fn, params = split_apply(TinyBNMLP(), x1, ("BatchNorm_", "Dense_2"))
    for a, b in ((x1, None), (x1, x2)):
      ref = ntk.reference_kernel(apply_fn, params, a, b)
      for batch_size in (None, 2):  # one block (x2=None: one Jacobian for both sides); blocks
        got = ntk.empirical_kernel(apply_fn, params, a, b, batch_size=batch_size,
                                   implementation="jax", jacobian_method="pullbacks")
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_auto_jacobian_method_counts_the_logits_of_the_network(monkeypatch):
  seen = []
  real = ntk.resolve_jacobian_method
  monkeypatch.setattr(ntk, "resolve_jacobian_method",
                      lambda m, num_outputs=None: seen.append(num_outputs) or real(m, num_outputs))
  x = jnp.ones((3, 4, 4, 2))
  apply_fn, params = split_apply(TinyBNMLP(num_classes=7), x, ("Dense_2",))
  auto = ntk.jacobian_rows(apply_fn, params, x, batch_size=2)
  assert seen and set(seen) == {7}
  np.testing.assert_allclose(auto, ntk.jacobian_rows(apply_fn, params, x, batch_size=2,
                                                     method="batched_cotangents"),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_eager_jacobian_rows_equal_the_traced_ones_in_both_layouts():
  # Eagerly over several blocks the rows are written block by block into one buffer; the
  # last block (2 of 3 samples real) is padded and only its real rows written.
  with enable_x64():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 2), jnp.float64)
    apply_fn, params = split_apply(TinyBNMLP(), x, ("BatchNorm_", "Dense_2"))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    want = jax.jacfwd(lambda w: apply_fn(unravel(w), x))(flat)  # [n, C, p]
    n, c, p = want.shape
    for flatten, shape in ((False, (n, c, p)), (True, (n * c, p))):
      eager = ntk.jacobian_rows(apply_fn, params, x, batch_size=3, flatten=flatten)
      traced = jax.jit(lambda w, xx: ntk.jacobian_rows(apply_fn, w, xx, batch_size=3,
                                                       flatten=flatten))(params, x)
      assert eager.shape == traced.shape == shape
      # float32 BatchNorm statistics: round-off differs per program (as above)
      tol = dict(rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))
      np.testing.assert_allclose(eager, want.reshape(shape), **tol)
      np.testing.assert_allclose(traced, want.reshape(shape), **tol)


_ROWS_MEMORY_SCRIPT = """
import resource, sys
import jax, jax.numpy as jnp, numpy as np
from fastntk_jax import ntk
d, c, n = 25_000, 10, 50                       # p = 250,000: rows of 500 MB in float32
w = {"W": jnp.ones((d, c), jnp.float32) * 1e-3}
x = jnp.asarray(np.random.default_rng(0).normal(size=(n, d)), jnp.float32)
apply_fn = lambda w, xx: xx @ w["W"]
ntk.jacobian_rows(apply_fn, w, x[:7], batch_size=4, flatten=True).block_until_ready()  # compile
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rows = ntk.jacobian_rows(apply_fn, w, x, batch_size=8, flatten=True).block_until_ready()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
assert rows.shape == (n * c, d * c)
print(rows.nbytes, peak - before)
"""


@pytest.mark.slow
def test_eager_jacobian_rows_are_held_once():
  # Review finding: the eager block loop kept a list of blocks and their stacked, padded and
  # sliced copies (2-3x the rows at its peak, which the plan's memory rule did not count).
  # The peak growth of a fresh process must stay near one copy of the rows (+ one block).
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  proc = subprocess.run([sys.executable, "-c", _ROWS_MEMORY_SCRIPT], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows_bytes, growth = map(int, proc.stdout.split()[-2:])
  assert growth < 1.4 * rows_bytes, (growth / rows_bytes)
