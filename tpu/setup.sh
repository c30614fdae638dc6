#!/usr/bin/env bash
# Install persyn_jax (with jax[tpu]) on every worker: from REPO_URL, or a copy of this checkout,
# into a uv-made venv of PYTHON_VERSION (default 3.11), whatever the image's python3 is.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
if [[ -n "${REPO_URL}" ]]; then
  tpu_ssh "rm -rf ${REMOTE_DIR} && git clone --depth 1 ${REPO_URL} ${REMOTE_DIR}"
else
  root="$(cd "$(dirname "$0")/.." && pwd)"
  tarball="$(mktemp -t persyn_jax.XXXXXX.tar.gz)"
  tar -C "${root}" --exclude=.git --exclude=runs --exclude=.ci --exclude=__pycache__ \
    --exclude=.venv -czf "${tarball}" .
  gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:persyn_jax.tar.gz" --zone "${ZONE}" \
    --project "${PROJECT}" --worker=all
  rm -f "${tarball}"
  tpu_ssh "rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -C ${REMOTE_DIR} -xzf persyn_jax.tar.gz"
fi
# uv brings a Python >= 3.11 (tpu/remote_venv.sh): the image's python3 may be 3.10
tpu_ssh "cd ${REMOTE_DIR} && export PATH=\"\$HOME/.local/bin:\$HOME/.cargo/bin:\$PATH\" \
&& PYTHON_VERSION=${PYTHON_VERSION} bash tpu/remote_venv.sh && . .venv/bin/activate \
&& uv pip install -q -e '.[tpu]'"
