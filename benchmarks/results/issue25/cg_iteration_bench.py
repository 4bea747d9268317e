"""Seconds of one conjugate-gradient iteration of the linearised objective (a jvp and a vjp
over D, what `finetune.linearized_solver="cg"` runs per iteration) for a paper CNN on
digits-sized batches, BN scale/bias + head trainable, float64 as the exact mode solves:

    python benchmarks/results/issue25/cg_iteration_bench.py mobilenetv2 50
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fastntk_jax.models import get_model
from fastntk_jax.models import trainable as tr

jax.config.update("jax_enable_x64", True)
name, n = sys.argv[1], int(sys.argv[2])
model = get_model(name, 10)
x = jax.random.normal(jax.random.PRNGKey(1), (n, 32, 32, 3), jnp.float64)
variables = tr.init_variables(model, (32, 32, 3), seed=0)
variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
w0, frozen = tr.split(variables)
apply = tr.make_apply_fn(model, frozen)
flat, unravel = ravel_pytree(w0)


@jax.jit
def matvec(v):  # (JᵀJ) v over the n images: one jvp, one vjp
  f = lambda w: apply(w, x)
  _, jv = jax.jvp(f, (w0,), (unravel(v),))
  _, pull = jax.vjp(f, w0)
  return ravel_pytree(pull(jv)[0])[0]


v = jnp.ones_like(flat)
start = time.perf_counter()
jax.block_until_ready(matvec(v))
compile_s = time.perf_counter() - start
times = []
for _ in range(3):
  start = time.perf_counter()
  jax.block_until_ready(matvec(v))
  times.append(time.perf_counter() - start)
print(json.dumps({"model": name, "images": n, "p": int(flat.size), "first_call_s": compile_s,
                  "seconds_per_iteration": min(times), "all": times}))
