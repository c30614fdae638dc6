#!/usr/bin/env bash
# Stop the run and delete the TPU VM (and its queued resource, if one was used).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
tpu_ssh "pkill -f '${TRAIN_PATTERN}' || true" || true
if [[ "${QUEUED}" == "1" ]]; then
  gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" --zone "${ZONE}" \
    --project "${PROJECT}" --force --quiet
else
  gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone "${ZONE}" --project "${PROJECT}" --quiet
fi
