#!/usr/bin/env bash
# Stop the run on every worker and keep the TPU VM: `tpu/launch.sh` with the same config and
# --run-dir resumes it (finished stages are skipped, a stopped stage continues from its shards
# and its last SFT checkpoint). GRACE seconds after SIGTERM, what is left is killed.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
: "${GRACE:=30}"
tpu_ssh "pkill -TERM -f '${TRAIN_PATTERN}' || true; \
for _ in \$(seq ${GRACE}); do pgrep -f '${TRAIN_PATTERN}' >/dev/null || exit 0; sleep 1; done; \
pkill -KILL -f '${TRAIN_PATTERN}' || true"
echo "stopped the run on every worker of ${TPU_NAME} (the VM is kept)"
