#!/usr/bin/env bash
# Install persyn_jax (with jax[tpu]) on every worker: from REPO_URL, or a copy of this checkout.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
if [[ -n "${REPO_URL}" ]]; then
  tpu_ssh "rm -rf ${REMOTE_DIR} && git clone --depth 1 ${REPO_URL} ${REMOTE_DIR}"
else
  root="$(cd "$(dirname "$0")/.." && pwd)"
  tarball="$(mktemp -t persyn_jax.XXXXXX.tar.gz)"
  tar -C "${root}" --exclude=.git --exclude=runs --exclude=.ci --exclude=__pycache__ -czf "${tarball}" .
  gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:persyn_jax.tar.gz" --zone "${ZONE}" \
    --project "${PROJECT}" --worker=all
  rm -f "${tarball}"
  tpu_ssh "rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -C ${REMOTE_DIR} -xzf persyn_jax.tar.gz"
fi
tpu_ssh "cd ${REMOTE_DIR} && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && pip install -q -e '.[tpu]'"
