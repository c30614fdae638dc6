#!/usr/bin/env bash
# Create a TPU VM (or a queued resource). Usage: TPU_NAME=.. ZONE=.. ACCELERATOR=v5p-64 tpu/create.sh
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
extra=()
if [[ "${SPOT}" == "1" ]]; then extra+=(--spot); fi
if [[ "${QUEUED}" == "1" ]]; then
  gcloud compute tpus queued-resources create "${TPU_NAME}-qr" --node-id "${TPU_NAME}" \
    --zone "${ZONE}" --project "${PROJECT}" --accelerator-type "${ACCELERATOR}" \
    --runtime-version "${RUNTIME}" ${extra[@]+"${extra[@]}"}
  echo "queued; watch with: gcloud compute tpus queued-resources describe ${TPU_NAME}-qr --zone ${ZONE}"
else
  gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone "${ZONE}" --project "${PROJECT}" \
    --accelerator-type "${ACCELERATOR}" --version "${RUNTIME}" ${extra[@]+"${extra[@]}"}
fi
