"""Fast-NTK on ResNet-110 (BN scale/bias + head, p = 8,746) at the paper's scale, 5,000
images, on this machine: the eager `unlearn.ntk_forget` path (Jacobians streamed in blocks of
64 by a host loop over one compiled block step; `ntk.MAX_UNROLLED_BLOCKS`).

    python -m benchmarks.bench_fastntk_cpu_5000 --out benchmarks/results

Random 32x32 inputs (the cost does not depend on the pixel values), 10 classes, 10% forgotten.
Writes fastntk_cpu_5000.md: wall seconds, CPU seconds and peak RSS of the whole process.
"""

import argparse
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from fastntk_jax import unlearn
from fastntk_jax.models import get_model
from fastntk_jax.models import trainable as tr


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--n", type=int, default=5000)
  ap.add_argument("--batch-size", type=int, default=64)
  args = ap.parse_args()
  model = get_model("resnet110", 10)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  w0, frozen = tr.split(variables)
  apply_fn = tr.make_apply_fn(model, frozen)
  w = jax.tree_util.tree_map(lambda l: l + 0.01, w0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.n, 32, 32, 3)).astype(np.float32)
  y = rng.integers(1, 10, size=args.n).astype(np.int32)
  n_f = args.n // 10
  y[:n_f] = 0
  cpu0, wall0 = time.process_time(), time.perf_counter()
  new = unlearn.ntk_forget(apply_fn, w0, w, retain=(jnp.asarray(x[n_f:]), jnp.asarray(y[n_f:])),
                           forget=(jnp.asarray(x[:n_f]), jnp.asarray(y[:n_f])), num_classes=10,
                           damping=1e-2, solver="primal", batch_size=args.batch_size)
  jax.block_until_ready(new)
  wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  finite = all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree_util.tree_leaves(new))
  p = tr.count_params(w0)
  lines = ["# Fast-NTK, ResNet-110 BN+head, at the paper's scale on this machine", "",
           "    python -m benchmarks.bench_fastntk_cpu_5000 --out " + args.out, "",
           common.machine_markdown(common.machine_info()), "",
           "| p | n | n·C | batch | wall s (compile included) | CPU s | peak RSS | update finite |",
           "|---|---|---|---|---|---|---|---|",
           f"| {p:,} | {args.n:,} | {args.n * 10:,} | {args.batch_size} | {wall:.1f} | {cpu:.1f} | "
           f"{peak / 2**30:.2f} GiB | {finite} |", ""]
  text = "\n".join(lines)
  common.atomic_write(common.Path(args.out) / "fastntk_cpu_5000.md", text)
  print(text)


if __name__ == "__main__":
  main()
