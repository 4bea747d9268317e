#!/usr/bin/env bash
# Fast-NTK on one or several GPU nodes under SLURM.
#
# One task per node; each task sees all GPUs of its node. JAX itself joins the tasks into
# one multi-process run (jax.distributed.initialize(), called by fastntk_jax.main when
# FASTNTK_DISTRIBUTED=1): no process orchestration of our own. Every argument is passed
# unchanged to `python -m fastntk_jax.main`.
#
#   sbatch launch/slurm_gpu.sh --config=configs/resnet110_cifar10.py:ipc=100 --workdir=/shared/wd
#   sbatch --nodes=4 --partition=gpu launch/slurm_gpu.sh --config=... --workdir=/shared/wd
#   DRY_RUN=1 bash launch/slurm_gpu.sh --config=... --workdir=...   # print, run nothing
#   bash launch/slurm_gpu.sh --dry-run --config=... --workdir=...    # the same
#
# Options on the sbatch command line override the #SBATCH defaults below. The workdir must
# be on a file system that every node sees (results are resumable from it).
#
# Environment:
#   DRY_RUN=1            print the exact commands instead of running them
#   PYTHON               interpreter on the nodes (default: python; e.g. /path/.venv/bin/python)
#   GPUS_PER_NODE        GPUs each task uses (default: $SLURM_GPUS_ON_NODE, else 8)
#   COORDINATOR_PORT     port of JAX's coordinator on the first node
#                        (default: 61440 + SLURM_JOB_ID % 4096, JAX's own SLURM choice)
#   FASTNTK_REPO         repository root to run from (default: the sbatch submit directory)
#
#SBATCH --job-name=fastntk
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=slurm-fastntk-%j.out

set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
main_args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run|--dry_run) DRY_RUN=1 ;;
    *) main_args+=("$arg") ;;
  esac
done

# Outside an allocation (dry runs on a login node) the SLURM variables are absent: fall
# back to what a one-node job would see, so the printed commands are still complete.
nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
nodelist="${SLURM_JOB_NODELIST:-$(hostname)}"
job_id="${SLURM_JOB_ID:-0}"
gpus="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
python="${PYTHON:-python}"
repo="${FASTNTK_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
port="${COORDINATOR_PORT:-$((61440 + job_id % 4096))}"

# The coordinator is the first host of the allocation. scontrol expands SLURM's compressed
# node lists ("gpu[003-006,010]"); without it, take the first name by hand.
first_host() {
  if command -v scontrol >/dev/null 2>&1 && [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    scontrol show hostnames "$1" | head -n 1
    return
  fi
  local list="$1" head
  head="${list%%,*}"
  if [[ "$list" == *"["* && "${list%%\[*}" != *","* ]]; then
    local prefix="${list%%\[*}" rest="${list#*\[}"
    rest="${rest%%[-,\]]*}"
    head="${prefix}${rest}"
  fi
  printf '%s\n' "$head"
}
coordinator="$(first_host "$nodelist"):${port}"
# JAX's SLURM detection gives each process one GPU (it assumes a task per GPU); with a
# task per node, list all of the node's GPUs explicitly.
local_ids="$(seq -s, 0 $((gpus - 1)))"

# Quotes like Python's shlex.quote, so both launchers print the same, copy-pasteable text.
shq() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}
join_quoted() {
  local sep=""
  for word in "$@"; do printf '%s' "$sep"; shq "$word"; sep=" "; done
  printf '\n'
}

run_cmd=(srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1
         "$python" -m fastntk_jax.main "${main_args[@]+"${main_args[@]}"}")

if [[ "$DRY_RUN" == "1" ]]; then
  printf 'cd %s\n' "$(shq "$repo")"
  printf 'export FASTNTK_DISTRIBUTED=1\n'
  printf 'export JAX_COORDINATOR_ADDRESS=%s\n' "$coordinator"
  printf 'export JAX_LOCAL_DEVICE_IDS=%s\n' "$local_ids"
  join_quoted "${run_cmd[@]}"
  exit 0
fi

cd "$repo"
export FASTNTK_DISTRIBUTED=1
export JAX_COORDINATOR_ADDRESS="$coordinator"
export JAX_LOCAL_DEVICE_IDS="$local_ids"
echo "fastntk: $nodes node(s) x $gpus GPU(s), coordinator $coordinator" >&2
exec "${run_cmd[@]}"
