#!/usr/bin/env bash
# Installs fastntk_jax with an accelerator build of JAX into the current Python environment,
# then checks which devices JAX sees. Run it in a fresh virtual environment:
#
#   python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
#   bash launch/install_accelerator.sh cuda12             # NVIDIA GPU, CUDA 12 wheels
#   bash launch/install_accelerator.sh cuda13             # NVIDIA GPU, CUDA 13 wheels (lean stack)
#   bash launch/install_accelerator.sh tpu                # Cloud TPU VM (libtpu)
#   STACK=nt bash launch/install_accelerator.sh cuda12    # the neural-tangents stack (jax 0.5.3)
#   EXTRAS=tfds bash launch/install_accelerator.sh cuda12 # + TensorFlow Datasets (CIFAR, ImageNet-R)
#   bash launch/install_accelerator.sh cuda12 --dry-run   # print the commands, run nothing
#
# Steps:
#   1. python -m pip install --upgrade pip
#      (pip 23.2, Python 3.11's default, does not match the `with_cuda` extra that
#      jax[cuda12]==0.5.3 asks of jax-cuda12-plugin: it installs no CUDA libraries and leaves a
#      JAX that silently runs on the CPU.)
#   2. python -m pip install -e '.[EXTRAS]' 'jax[KIND]==V' -c constraints/STACK.txt
#      V is the jax version the stack's constraints file pins (lean: the newest JAX verified,
#      nt: 0.5.3), so the accelerator plugin matches jaxlib exactly. libtpu comes from PyPI
#      (jax[tpu] pins the matching release).
#   3. python -m fastntk_jax.devices --require-platform=gpu|tpu
#      prints the devices JAX sees and exits 1, saying why, when there is no such device.
#
# Environment: PYTHON (default: python, i.e. the active venv's), STACK (lean | nt; default
# lean), EXTRAS (comma-separated extras of setup.cfg; default: none for lean, nt,tfds for nt).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
STACK="${STACK:-lean}"
DRY_RUN=0
kind=""
for arg in "$@"; do
  case "$arg" in
    --dry-run|--dry_run) DRY_RUN=1 ;;
    cuda12|cuda13|tpu)
      if [[ -n "$kind" && "$kind" != "$arg" ]]; then
        echo "install_accelerator.sh: one accelerator at a time, got $kind and $arg" >&2
        exit 2
      fi
      kind="$arg" ;;
    -h|--help) sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "install_accelerator.sh: unknown argument '$arg' (cuda12 | cuda13 | tpu, --dry-run)" >&2
       exit 2 ;;
  esac
done
if [[ -z "$kind" ]]; then
  echo "install_accelerator.sh: name the accelerator: cuda12 | cuda13 | tpu" >&2
  exit 2
fi
constraints="constraints/$STACK.txt"
if [[ ! -f "$constraints" ]]; then
  echo "install_accelerator.sh: STACK=$STACK has no $constraints (lean | nt)" >&2
  exit 2
fi
jax_version="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$constraints")"
if [[ -z "$jax_version" ]]; then
  echo "install_accelerator.sh: $constraints pins no jax version" >&2
  exit 2
fi
if [[ "$STACK" == "nt" && "$kind" == "cuda13" ]]; then
  echo "install_accelerator.sh: jax $jax_version (the nt stack) has no cuda13 build; use cuda12" >&2
  exit 2
fi
if [[ -z "${EXTRAS+set}" ]]; then
  if [[ "$STACK" == "nt" ]]; then EXTRAS="nt,tfds"; else EXTRAS=""; fi
fi
target="."
[[ -n "$EXTRAS" ]] && target=".[$EXTRAS]"
platform="gpu"
[[ "$kind" == "tpu" ]] && platform="tpu"

# Runs (or, with --dry-run, prints) one command given as words.
run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    local sep=""
    for word in "$@"; do
      if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s%s' "$sep" "$word"
      else printf "%s'%s'" "$sep" "${word//\'/\'\"\'\"\'}"; fi
      sep=" "
    done
    printf '\n'
  else
    echo "+ $*" >&2
    "$@"
  fi
}

run "$PYTHON" -m pip install --upgrade pip
run "$PYTHON" -m pip install -e "$target" "jax[$kind]==$jax_version" -c "$constraints"
run "$PYTHON" -m fastntk_jax.devices --require-platform="$platform"
