"""`linalg.cholesky` of a random SPD matrix of a large order on this machine, in a subprocess
per try (a LAPACK crash must not take the benchmark with it), reporting whether it finished,
its residual and its time.

    python -m benchmarks.bench_cholesky_large --order 20000 --tries 1

Why: the multithreaded LAPACK potrf that jaxlib calls on CPUs (scipy's OpenBLAS 0.3.30)
segfaulted from order ~19,000 on two threads (RESULTS.md §16); `linalg.cholesky` factorises by
blocks on CPUs above `CPU_CHOLESKY_BLOCK`. Order 20,000 takes 3.2 GB and about 90 s here.
"""

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from fastntk_jax import linalg
n = int(sys.argv[1]); t0 = time.time()
a = jax.random.normal(jax.random.PRNGKey(0), (n, 64), jnp.float64)
k = a @ a.T + jnp.eye(n)
chol = linalg.cholesky(k)
cols = np.unique(np.clip([0, linalg.CPU_CHOLESKY_BLOCK - 1, linalg.CPU_CHOLESKY_BLOCK, n // 2, n - 1], 0, n - 1))
residual = float(np.abs(np.asarray(chol @ chol[cols].T - k[:, cols])).max())
print(json.dumps({"finite": bool(jnp.all(jnp.isfinite(chol))), "residual": residual,
                  "seconds": round(time.time() - t0, 1)}))
"""


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--order", type=int, default=20000)
  parser.add_argument("--tries", type=int, default=1)
  args = parser.parse_args(argv)
  failures = 0
  for k in range(args.tries):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(args.order)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
      failures += 1
      print(f"try {k}: exit {proc.returncode}: {proc.stderr[-500:]}")
      continue
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = out["finite"] and out["residual"] < 1e-9
    failures += not ok
    print(f"try {k}: order {args.order}: {'ok' if ok else 'WRONG'} {out}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
