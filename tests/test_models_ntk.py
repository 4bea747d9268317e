"""A tiny model's `apply_fn` feeds `ntk.empirical_kernel` and `unlearn.ntk_forget` unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fastntk_jax import ntk, unlearn
from fastntk_jax.models import get_model, make_apply_fn, split
from fastntk_jax.models.report import abstract_variables

_C = 3


def _tiny(name):
  kwargs = (dict(widths=(4, 4, 4)) if name == "resnet8" else
            dict(patch_size=4, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=16,
                 prompt_length=2))
  model = get_model(name, _C, **kwargs)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if path[-1].key == "var":
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    scale = 0.5 if len(leaf.shape) <= 1 else 1 / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, abstract_variables(model, (8, 8, 3)))
  x = jnp.asarray(rng.standard_normal((8, 8, 8, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, _C, 8))
  return model, variables, x, y


@pytest.mark.slow
def test_apply_fn_feeds_kernel_and_forget():
  """The prompted ViT-S/16 at its real depth (the CNNs feed every tiny run of the suite)."""
  model, variables, x, y = _tiny("vit_s16")
  trainable, frozen = split(variables)
  apply_fn = make_apply_fn(model, frozen)

  # Kernel over the trainable collection only: equals J J^T with J from jacrev of the
  # ravelled trainable vector (an independent computation of the same quantity).
  kernel = ntk.empirical_kernel(apply_fn, trainable, x[:4])
  assert kernel.shape == (4, 4, _C, _C)
  flat, unravel = ravel_pytree(trainable)
  jac = jax.jit(jax.jacrev(lambda w: apply_fn(unravel(w), x[:4]).reshape(-1)))(flat)  # [4C, p]
  np.testing.assert_allclose(ntk.kernel_to_matrix(kernel), jac @ jac.T, rtol=1e-4, atol=1e-4)

  # The Fast-NTK update runs on the trainable pytree and returns one of the same structure
  # (solver choice and exactness are unlearn's own tests; primal is the cheapest to compile).
  finetuned = jax.tree_util.tree_map(lambda a: a + 0.01, trainable)
  out = unlearn.ntk_forget(apply_fn, trainable, finetuned, retain=(x[:6], y[:6]),
                           forget=(x[6:], y[6:]), num_classes=_C, damping=1e-2, solver="primal")
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(trainable)
  leaves = jax.tree_util.tree_leaves(out)
  assert all(bool(jnp.all(jnp.isfinite(l))) for l in leaves)
  assert float(jnp.abs(ravel_pytree(out)[0] - ravel_pytree(finetuned)[0]).max()) > 0
