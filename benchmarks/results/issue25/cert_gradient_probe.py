"""The gradient of MobileNetV2's linearised retain objective at Retrain's parameters (seed 0 of a
`configs/mobilenetv2_cifar10.py:digits,linearized` run), with the network's Jacobian products
taken in float32 (as the kernel statistics' rows that define Full, Retrain and the update) and
with its parameters widened to float64 (as the matrix-free certificate takes them):

    python benchmarks/results/issue25/cert_gradient_probe.py WORKDIR

RESULTS.md §22.
"""
import json, numpy as np, jax, jax.numpy as jnp, orbax.checkpoint as ocp
jax.config.update("jax_enable_x64", True)
from jax.flatten_util import ravel_pytree
from fastntk_jax import config as config_lib, ntk
from fastntk_jax.experiment import prepare as prep
from fastntk_jax.models import trainable as tr, checkpoints
from fastntk_jax.experiment import pretrain as pre
import sys
W = sys.argv[1]
cfg = config_lib.load_config_file("configs/mobilenetv2_cifar10.py:digits,linearized")
p = prep.prepare(cfg)
data = p.data
init = tr.init_variables(p.model, data.image_shape, seed=10_000)
variables = checkpoints.restore_checkpoint(W + "/pretrain", init)
frozen = {k: v for k, v in variables.items() if k != "trainable"}
w0 = tr.fresh_head(variables["trainable"], p.model, data.image_shape, 0)
raw = ocp.PyTreeCheckpointer().restore(W + "/seed_0/retrain")["trainable"]
wr = jax.tree_util.tree_map(lambda a, b: jnp.asarray(b, a.dtype), w0, raw)
apply32 = tr.make_apply_fn(p.model, frozen)
x, y = jnp.asarray(data.retain.x), jnp.asarray(data.retain.y)
C = data.num_classes
flat0, unravel = ravel_pytree(w0)
d = (ravel_pytree(wr)[0].astype(jnp.float64) - flat0.astype(jnp.float64))
print("||w_r - w0||", float(jnp.linalg.norm(d)))
for name, dt in (("float32 network", None), ("float64 params", jnp.float64)):
  if dt is None:
    f = lambda w, xx: apply32(w, xx).astype(jnp.float64); w = w0
  else:
    f = lambda w, xx: apply32(w, xx).astype(jnp.float64)
    w = jax.tree_util.tree_map(lambda l: l.astype(jnp.float64), w0)
  fl, un = ravel_pytree(w)
  jv = ntk.jvp_rows(f, w, x, un(d.astype(fl.dtype)), batch_size=64)
  e = jax.nn.one_hot(y, C, dtype=jnp.float64) - f(w, x)
  g = ravel_pytree(ntk.vjp_rows(f, w, x, (jv - e).astype(jnp.float64), batch_size=64))[0]
  g = g.astype(jnp.float64) + 0.01 * d
  print(name, "gradient norm at w_r:", float(jnp.linalg.norm(g)), " ||J d||", float(jnp.linalg.norm(jv)))
w64 = jax.tree_util.tree_map(lambda l: l.astype(jnp.float64), w0)
a, b = np.asarray(apply32(w0, x), np.float64), np.asarray(apply32(w64, x), np.float64)
print("logits at w0: max |f32 - f64|", np.abs(a - b).max(), " max |f|", np.abs(b).max())
