"""Input checks shared by the public entry points (unlearn, stream, ntk)."""

import jax
import jax.numpy as jnp


def is_concrete(x) -> bool:
  """True for a concrete array (value checks possible), False while traced under jit."""
  return not isinstance(x, jax.core.Tracer)


def check_finite(name: str, tree) -> None:
  """Raises ValueError naming the first leaf of `tree` holding NaN/inf (concrete leaves only)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if is_concrete(leaf) and jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact):
      if not bool(jnp.all(jnp.isfinite(leaf))):
        raise ValueError(f"{name} contains non-finite values (NaN/inf) at "
                         f"{jax.tree_util.keystr(path) or 'the array'}")
