"""The SGD population's two engines on the same config: Full and Retrain vmapped over the
seeds (`train.fit_seeds`, engine "batched_sgd") against one fit per seed ("per_seed").

  python benchmarks/bench_population_sgd.py --seeds=8 --out=/tmp/bench_pop_sgd

Each engine runs `python -m fastntk_jax.main --config=configs/default.py:standard,klom` in its
own subprocess and workdir with `eval.population_seeds` = --seeds, one report seed, Full,
Retrain and Fast-NTK only, no tuning; it prints the population's seconds per model of each
(results.json's timing.population_seconds / (3N + N) models) and whether their audits agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# Runs main with the engine forced: the CPU takes the per-seed engine unless told.
_MAIN = ("import sys; from fastntk_jax.experiment import population; "
         "engine = sys.argv.pop(1); population.SGD_VMAP_ON_CPU = engine == 'batched_sgd'; "
         "population.sgd_engine_applies = (population.sgd_engine_applies if engine == "
         "'batched_sgd' else lambda cfg, mesh=None: False); "
         "from absl import app; from fastntk_jax import cli, main; "
         "app.run(main.main, argv=['main'] + sys.argv[1:], flags_parser=cli.parse_flags)")


def _run(engine: str, seeds: int, workdir: str) -> dict:
  flags = [f"--config={os.path.join(REPO, 'configs', 'default.py')}:standard,klom",
           f"--workdir={workdir}", f"--config.eval.population_seeds={seeds}",
           "--config.seeds=(0,)", "--config.methods=('full','retrain','fastntk')",
           "--config.tuning.enabled=False"]
  cmd = [sys.executable, "-c", _MAIN, engine] + flags
  start = time.perf_counter()
  subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
  wall = time.perf_counter() - start
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  audits = results["population_audits"]
  return {"engine": audits["engine"], "wall_seconds": wall,
          "population_seconds": results["timing"]["population_seconds"],
          "klom_p95": {k: v["p95"] for k, v in results["klom"]["per_method"].items()}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--out", default="/tmp/bench_pop_sgd")
  args = parser.parse_args()
  rows = {}
  for engine in ("batched_sgd", "per_seed"):
    rows[engine] = _run(engine, args.seeds, os.path.join(args.out, engine))
    models = 4 * args.seeds  # A: Full, Retrain, Fast-NTK; B: Retrain
    rows[engine]["seconds_per_model"] = rows[engine]["population_seconds"] / models
    print(json.dumps({engine: rows[engine]}), flush=True)
  a, b = (rows[e]["klom_p95"] for e in ("batched_sgd", "per_seed"))
  print("KLoM P95 per method, batched vs per seed:",
        {k: (round(a[k], 4), round(b[k], 4)) for k in a})


if __name__ == "__main__":
  main()
