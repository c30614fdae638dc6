#!/usr/bin/env bash
# Copy a config to every worker and start the run on all of them (jax.distributed initializes
# itself on TPU). Usage: tpu/launch.sh configs/math.yaml [--set key=value ...]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
config="${1:?usage: tpu/launch.sh CONFIG [train.py flags]}"
shift
gcloud compute tpus tpu-vm scp "${config}" "${TPU_NAME}:${REMOTE_DIR}/run_config.yaml" \
  --zone "${ZONE}" --project "${PROJECT}" --worker=all
args=""
for a in "$@"; do args+=" $(printf '%q' "$a")"; done
# The braces put only python in the background, with no stdout/stderr of the ssh session left
# open, so the command returns at once (backgrounding the whole `&&` list would keep the channel
# open until the run ends). run.log is appended to: an earlier attempt's traceback stays.
tpu_ssh "cd ${REMOTE_DIR} && . .venv/bin/activate && { nohup python -m persyn_jax.train --config run_config.yaml${args} >> run.log 2>&1 < /dev/null & }"
echo "started; follow with: tpu/logs.sh"
