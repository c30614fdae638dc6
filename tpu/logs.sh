#!/usr/bin/env bash
# Collect every worker's run.log into logs/<TPU_NAME>/worker-<i>.log (and tail worker 0's).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
out="logs/${TPU_NAME}"
mkdir -p "${out}"
workers="$(gcloud compute tpus tpu-vm describe "${TPU_NAME}" --zone "${ZONE}" --project "${PROJECT}" \
  --format='value(networkEndpoints.len())' 2>/dev/null || echo 1)"
for ((i = 0; i < ${workers:-1}; i++)); do
  gcloud compute tpus tpu-vm scp "${TPU_NAME}:${REMOTE_DIR}/run.log" "${out}/worker-${i}.log" \
    --zone "${ZONE}" --project "${PROJECT}" --worker="${i}" || true
done
tail -n 20 "${out}/worker-0.log" 2>/dev/null || true
