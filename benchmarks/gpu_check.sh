#!/usr/bin/env bash
# One prepared device check for a GPU machine (run from anywhere; it cd's to the repo root):
#
#     OUT=/path/to/outdir bash benchmarks/gpu_check.sh
#
# Assumes the machine's python3 has jax (CUDA), flax, optax, chex, numpy, psutil, matplotlib
# and pytest, but NOT neural-tangents, and no internet: the package is used from the repo root
# via PYTHONPATH (no pip install). Kernels then use the built-in JAX implementation
# (kernel_impl 'auto' falls back when neural-tangents does not import; step 2 checks it).
#
# Steps (each under `timeout`; the whole script stays under ~7 minutes):
#   1. nvidia-smi, python/jax/flax versions, jax.devices()
#   2. kernel 'auto' resolution; whether `from jax.experimental import enable_x64` still works
#   3. pytest -q tests/test_unlearn_exact.py (with the benchmarks.jax_compat plugin, which
#      re-adds jax.experimental.enable_x64 only if this jax removed it)
#   4. bench_solvers at GPU sizes    -> $OUT/bench_solvers.{md,png,json}
#   5. bench_scale at GPU sizes      -> $OUT/bench_scale.{md,png,json}
# Everything printed also goes to $OUT/gpu_check.log: 7 files in $OUT, no sub-folders.
#
# GPU_CHECK_TINY=1 shrinks every size (and only collects the tests) so the Python steps can
# be exercised on a CPU; PYTHON overrides the interpreter (default python3).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2
TINY="${GPU_CHECK_TINY:-0}"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

T_TOTAL=400                      # seconds for the whole script (hard cap below 7 minutes)
T_END=$((SECONDS + T_TOTAL))
left() { echo $((T_END - SECONDS)); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
step() { echo; echo "=== [$(date -u +%H:%M:%S), ${SECONDS}s elapsed, $(left)s left] $*"; }
RC=0
note_rc() {  # name rc
  if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then echo "!!! $1: TIMED OUT (rc $2)"; RC=1
  elif [ "$2" -ne 0 ]; then echo "!!! $1: FAILED (rc $2)"; RC=1
  else echo "--- $1: ok"; fi
}

step "1. machine"
timeout 20 nvidia-smi || echo "(nvidia-smi unavailable: rc $?)"
timeout 90 "$PY" - <<'EOF'
import importlib.metadata as md, platform, jax
def v(d):
  try: return md.version(d)
  except md.PackageNotFoundError: return "not installed"
print("python", platform.python_version(), "| jax", jax.__version__, "| jaxlib", v("jaxlib"),
      "| flax", v("flax"), "| optax", v("optax"), "| neural-tangents", v("neural-tangents"),
      "| numpy", v("numpy"), "| pytest", v("pytest"))
print("backend:", jax.default_backend(), "| devices:", jax.devices())
d = jax.devices()[0]
print("device kind:", getattr(d, "device_kind", "?"), "| memory_stats:",
      {k: v for k, v in (d.memory_stats() or {}).items() if k in ("bytes_limit", "bytes_in_use")})
EOF
note_rc "machine info" $?

step "2. kernel implementation and x64 API"
timeout 60 "$PY" - <<'EOF'
import jax, jax.experimental
from fastntk_jax import ntk
print("neural_tangents_available():", ntk.neural_tangents_available())
print("kernel_impl 'auto' resolves to:", ntk.resolve_implementation("auto").value)
print("jax.experimental.enable_x64 present:", hasattr(jax.experimental, "enable_x64"),
      "| jax.enable_x64 present:", hasattr(jax, "enable_x64"))
EOF
note_rc "kernel/x64 check" $?

step "3. exactness tests (tests/test_unlearn_exact.py)"
if [ "$TINY" = "1" ]; then
  timeout 60 "$PY" -m pytest -q -p benchmarks.jax_compat --collect-only tests/test_unlearn_exact.py
else
  timeout "$(min 90 "$(left)")" "$PY" -m pytest -q -p benchmarks.jax_compat -p no:cacheprovider \
    tests/test_unlearn_exact.py
fi
note_rc "pytest test_unlearn_exact" $?

step "4. bench_solvers"
if [ "$TINY" = "1" ]; then
  SOLVER_ARGS="--configs resnet8@12 --cg-maxiter 3 --no-diagnostics --timeout 120 --budget-seconds 150"
  B=170
else
  # GPU: resnet20 (p = 2,026) and widths x2 (p = 4,052) at n·C = 1,000 (< p) and 16,000 (> p);
  # primal and dual only (cg, truncated, is covered by the CPU run), no eigen-decompositions.
  B=$(min 140 $(( $(left) - 190 )))
  SOLVER_ARGS="--configs resnet20@100,resnet20:w2@100,resnet20@1600,resnet20:w2@1600 --solvers primal,dual --no-diagnostics --timeout 60 --budget-seconds $B"
fi
echo "args: $SOLVER_ARGS"
timeout $((B + 25)) "$PY" -m benchmarks.bench_solvers --out "$OUT" $SOLVER_ARGS
note_rc "bench_solvers" $?

step "5. bench_scale"
if [ "$TINY" = "1" ]; then
  SCALE_ARGS="--model resnet8 --fast-n 8,16 --full-n 8,16 --target-n 64 --fast-batch-size 8 --full-batch-size 8 --budget-seconds 100 --total-budget-seconds 200"
  B=220
else
  # GPU: Fast-NTK up to the paper's 5000 images first, then the full model until it stops.
  B=$(min 200 $(( $(left) - 30 )))
  SCALE_ARGS="--order fast-first --fast-n 512,5000 --full-n 16,64,256,1024,4096 --target-n 5000 --fast-batch-size 256 --full-batch-size 64 --budget-seconds 75 --total-budget-seconds $B"
fi
echo "args: $SCALE_ARGS"
timeout $((B + 25)) "$PY" -m benchmarks.bench_scale --out "$OUT" $SCALE_ARGS
note_rc "bench_scale" $?

step "done: files in $OUT"
ls -la "$OUT"
exit $RC
