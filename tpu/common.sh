#!/usr/bin/env bash
# Shared settings for the TPU scripts. Override any of them in the environment:
#   TPU_NAME=persyn-v5p ZONE=us-east5-a ACCELERATOR=v5p-64 PROJECT=my-project tpu/create.sh
set -euo pipefail
: "${TPU_NAME:=persyn}"
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR:=v4-32}"          # v4-*, v5litepod-* (v5e), v5p-*, v6e-*
: "${RUNTIME:=}"                   # default: chosen from the accelerator below
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${QUEUED:=0}"                   # 1: create through a queued resource
: "${SPOT:=0}"                     # 1: spot capacity
: "${REPO_URL:=}"                  # git URL to install from; default: copy this checkout
: "${REMOTE_DIR:=persyn_jax}"
: "${PYTHON_VERSION:=3.11}"        # the workers' venv (uv fetches it; 3.11 or later)
# The run's process, for pgrep/pkill -f. The brackets keep the pattern from matching the shell that
# runs the pgrep (its own command line holds the pattern's text, not what the pattern matches).
: "${TRAIN_PATTERN:=[p]ersyn_jax[.]train}"

if [[ -z "${RUNTIME}" ]]; then
  case "${ACCELERATOR}" in
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) echo "unknown accelerator type ${ACCELERATOR} (v4-*, v5litepod-*, v5p-*, v6e-*)" >&2; exit 2 ;;
  esac
fi

tpu_ssh() {  # tpu_ssh COMMAND: run COMMAND on every worker
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" --project "${PROJECT}" \
    --worker=all --command "$1"
}

run_alive() {  # true when the run's process is alive on every worker
  tpu_ssh "pgrep -f '${TRAIN_PATTERN}' >/dev/null" >/dev/null 2>&1
}
