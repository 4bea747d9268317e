#!/usr/bin/env bash
# Fast-NTK on a Cloud TPU VM (single host or a multi-host slice) with gcloud.
#
# Every step runs the same command on all workers (`--worker=all`); on a multi-host slice
# JAX joins the worker processes into one run (jax.distributed.initialize(), called by
# fastntk_jax.main when FASTNTK_DISTRIBUTED=1). Nothing is created unless CREATE=1.
#
#   TPU_NAME=my-tpu ZONE=us-central2-b bash launch/tpu_vm.sh all \
#       --config=configs/vit_small_imagenet_r.py:classes=20,ipc=50 --workdir=wd_vits
#   DRY_RUN=1 TPU_NAME=my-tpu ZONE=us-central2-b bash launch/tpu_vm.sh all --config=...
#
# Steps (first argument; default "all" = copy + install + run):
#   create   gcloud compute tpus tpu-vm create (only with CREATE=1)
#   copy     `git archive HEAD` of this repository to ~/fastntk_jax on every worker
#            (committed files only: commit first)
#   install  launch/install_accelerator.sh tpu on every worker (STACK=lean|nt, EXTRAS=tfds)
#   run      python -m fastntk_jax.main <remaining arguments> on every worker
#   fetch    copy the workdir back from worker 0 (the process that writes the report)
#
# Environment:
#   TPU_NAME, ZONE      required
#   PROJECT             optional gcloud --project
#   DRY_RUN=1           print the exact commands instead of running them
#   CREATE=1            let "create" (and "all") create the TPU VM
#   ACCELERATOR_TYPE    for create (default v4-8); TPU_VERSION: software version
#                       (default tpu-ubuntu2204-base)
#   REMOTE_DIR          checkout folder on the workers (default fastntk_jax, in $HOME)
#   PYTHON              interpreter on the workers (default python3)

set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
CREATE="${CREATE:-0}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-fastntk_jax}"
PYTHON="${PYTHON:-python3}"
STACK="${STACK:-lean}"    # constraints/<STACK>.txt: lean (newest JAX, no TensorFlow) | nt
EXTRAS="${EXTRAS-tfds}"   # the TFDS readers of ImageNet-R / CIFAR

step="all"
if [[ $# -gt 0 && "$1" != -* ]]; then
  step="$1"
  shift
fi
main_args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run|--dry_run) DRY_RUN=1 ;;
    *) main_args+=("$arg") ;;
  esac
done

if [[ -z "${TPU_NAME:-}" || -z "${ZONE:-}" ]]; then
  echo "tpu_vm.sh: set TPU_NAME and ZONE (e.g. TPU_NAME=my-tpu ZONE=us-central2-b)" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archive="${TMPDIR:-/tmp}/fastntk_jax-src.tar.gz"
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="$PROJECT")

# Quotes like Python's shlex.quote, so the printed commands can be pasted into a shell.
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
}

# Runs (or, with DRY_RUN=1, prints) one local command given as words.
do_cmd() {
  if [[ "$DRY_RUN" == "1" ]]; then
    join_quoted "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Runs (or prints) a shell command line on every worker. Printed as
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="..."
# the remote line uses single quotes only, so the double quotes above are safe to paste.
on_all_workers() {
  local remote="$1"
  if [[ "$DRY_RUN" == "1" ]]; then
    printf 'gcloud compute tpus tpu-vm ssh %s --zone=%s --worker=all%s --command="%s"\n' \
      "$TPU_NAME" "$ZONE" "${PROJECT:+ --project=$PROJECT}" "$remote"
  else
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
      "${project_flag[@]+"${project_flag[@]}"}" --command="$remote"
  fi
}

workdir_arg() {
  local a
  for a in "${main_args[@]+"${main_args[@]}"}"; do
    [[ "$a" == --workdir=* ]] && { printf '%s' "${a#--workdir=}"; return; }
  done
  printf 'workdir_default'
}

step_create() {
  if [[ "$CREATE" != "1" ]]; then
    echo "tpu_vm.sh: not creating $TPU_NAME (set CREATE=1 to create it)" >&2
    return
  fi
  do_cmd gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    "${project_flag[@]+"${project_flag[@]}"}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$TPU_VERSION"
}

step_copy() {
  do_cmd git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  do_cmd gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:fastntk_jax-src.tar.gz" \
    --zone="$ZONE" --worker=all "${project_flag[@]+"${project_flag[@]}"}"
  local dir
  dir="$(shq "$REMOTE_DIR")"
  on_all_workers "mkdir -p $dir && tar -xzf fastntk_jax-src.tar.gz -C $dir"
}

step_install() {
  # launch/install_accelerator.sh: upgrades pip, installs the package with the TPU build of
  # the stack's pinned jax (libtpu from PyPI) under constraints/<STACK>.txt, then fails unless
  # JAX sees the TPU (python -m fastntk_jax.devices --require-platform=tpu).
  on_all_workers "cd $(shq "$REMOTE_DIR") && PYTHON=$PYTHON STACK=$STACK EXTRAS=$EXTRAS \
bash launch/install_accelerator.sh tpu"
}

step_run() {
  local main_line
  main_line="$(join_quoted "$PYTHON" -m fastntk_jax.main "${main_args[@]+"${main_args[@]}"}")"
  if [[ "$main_line" == *'"'* ]]; then
    echo "tpu_vm.sh: arguments must not contain double quotes" >&2
    exit 2
  fi
  on_all_workers "cd $(shq "$REMOTE_DIR") && FASTNTK_DISTRIBUTED=1 $main_line"
}

step_fetch() {
  local wd
  wd="$(workdir_arg)"
  [[ "$wd" == /* ]] || wd="$REMOTE_DIR/$wd"
  do_cmd gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$wd" . \
    --zone="$ZONE" --worker=0 "${project_flag[@]+"${project_flag[@]}"}"
}

case "$step" in
  create) step_create ;;
  copy) step_copy ;;
  install) step_install ;;
  run) step_run ;;
  fetch) step_fetch ;;
  all) step_create; step_copy; step_install; step_run; step_fetch ;;
  *) echo "tpu_vm.sh: unknown step '$step' (create|copy|install|run|fetch|all)" >&2; exit 2 ;;
esac
