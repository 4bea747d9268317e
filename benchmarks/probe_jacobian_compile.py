"""Compile and run seconds of one block's per-sample Jacobian (`ntk._per_sample_jacobian`),
params passed as an argument, for a model, image size, class count, block and method:

    python -m benchmarks.probe_jacobian_compile vit_ti16 32 16 8 pullbacks
    python -m benchmarks.probe_jacobian_compile vit_ti16 32 20 8 batched_cotangents

(an optional sixth argument overrides ntk.MAX_UNROLLED_PULLBACKS). Results: RESULTS.md §15.
"""
import time, jax, jax.numpy as jnp, sys
from fastntk_jax.models import get_model, make_apply_fn, split
from fastntk_jax import ntk
name, size, c, b, method = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if len(sys.argv) > 6: ntk.MAX_UNROLLED_PULLBACKS = int(sys.argv[6])
model = get_model(name, c, prompt_length=4)
v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
w, frozen = split(v); apply_fn = make_apply_fn(model, frozen)
x = jnp.ones((b, size, size, 3))
t=time.perf_counter(); f=jax.jit(lambda w, xb: ntk._per_sample_jacobian(apply_fn, w, xb, method)).lower(w, x).compile(); print(c, method, sys.argv[6:], "compile", round(time.perf_counter()-t,1), flush=True)
t=time.perf_counter(); jax.block_until_ready(f(w,x)); print("run", round(time.perf_counter()-t,2), flush=True)
