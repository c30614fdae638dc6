#!/usr/bin/env bash
# Keep a run going on spot or queued-resource capacity: create the slice, install, launch, poll.
# After a preemption (the slice PREEMPTED/SUSPENDED/FAILED/TERMINATED or gone, or the run's process
# gone from a worker) it recreates the slice and relaunches with the same --run-dir, so the run
# resumes: finished stages are skipped, a stopped stage continues from its shards and its last SFT
# checkpoint. It stops when RUN_DIR/report/report.json exists, or after MAX_ATTEMPTS launches.
#   RUN_DIR=/mnt/shared/runs/math SPOT=1 tpu/run.sh configs/math.yaml [train.py flags]
# RUN_DIR must outlive the slice: a filesystem every worker mounts, or gs://. A recreated slice is
# a fresh VM: PREPARE is a command every worker runs after each setup, e.g. mounting that share:
#   PREPARE="sudo mkdir -p /mnt/shared && sudo mount -t nfs 10.0.0.2:/vol1 /mnt/shared"
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "${here}/common.sh"
config="${1:?usage: RUN_DIR=DIR tpu/run.sh CONFIG [train.py flags]}"
shift
: "${RUN_DIR:?set RUN_DIR to a directory that every worker and every attempt shares}"
: "${MAX_ATTEMPTS:=10}"
: "${POLL_S:=300}"                 # seconds between checks of the slice and the run
: "${SETUP:=1}"                    # 0: the slice that exists at the start is already set up
: "${PREPARE:=}"
# the scripts this one calls read the same settings
export TPU_NAME ZONE ACCELERATOR RUNTIME PROJECT QUEUED SPOT REPO_URL REMOTE_DIR PYTHON_VERSION

slice_state() {  # the slice's state, GONE when there is none
  local s
  if [[ "${QUEUED}" == "1" ]]; then
    s="$(gcloud compute tpus queued-resources describe "${TPU_NAME}-qr" --zone "${ZONE}" \
      --project "${PROJECT}" --format='value(state.state)' 2>/dev/null)" || s=GONE
  else
    s="$(gcloud compute tpus tpu-vm describe "${TPU_NAME}" --zone "${ZONE}" \
      --project "${PROJECT}" --format='value(state)' 2>/dev/null)" || s=GONE
  fi
  echo "${s:-GONE}"
}

usable() { [[ "$1" == READY || "$1" == ACTIVE ]]; }
pending() {  # on its way to usable: keep waiting
  case "$1" in
    CREATING | ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES | RESTARTING | REPAIRING) return 0 ;;
    *) return 1 ;;
  esac
}

report_exists() {
  local report="${RUN_DIR%/}/report/report.json"
  if [[ "${RUN_DIR}" == gs://* ]]; then
    gcloud storage ls "${report}" >/dev/null 2>&1
  else
    gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" --project "${PROJECT}" \
      --worker=0 --command "test -f $(printf '%q' "${report}")" >/dev/null 2>&1
  fi
}

set_up() {  # (no `set -e` inside a function called from a condition: each step is chained)
  bash "${here}/setup.sh" && { [[ -z "${PREPARE}" ]] || tpu_ssh "${PREPARE}"; }
}

wait_usable() {
  local s
  while true; do
    s="$(slice_state)"
    if usable "${s}"; then return 0; fi
    if ! pending "${s}"; then
      echo "the slice is ${s} before the run started" >&2
      return 1
    fi
    sleep "${POLL_S}"
  done
}

watch() {  # poll until the report exists, the slice is lost, or the run is gone from a worker
  local s
  while true; do
    sleep "${POLL_S}"
    if report_exists; then return 0; fi
    s="$(slice_state)"
    if ! usable "${s}"; then
      echo "attempt ${attempt}: the slice is ${s} (preempted?)"
      return 0
    fi
    if ! run_alive; then
      echo "attempt ${attempt}: the run is not running on every worker"
      return 0
    fi
  done
}

retry() {  # a step that failed (no capacity, a preemption during setup, ssh): the next attempt
  echo "attempt ${attempt}: $1 failed; trying again in ${POLL_S} s" >&2
  sleep "${POLL_S}"
}

attempt=0
launches=0
installed=$([[ "${SETUP}" == "1" ]] && echo 0 || echo 1)  # the slice there at the start
while true; do
  if report_exists; then
    echo "run finished: ${RUN_DIR%/}/report/report.json (${launches} launch(es))"
    exit 0
  fi
  if ((attempt >= MAX_ATTEMPTS)); then
    echo "gave up after ${attempt} attempts; the run dir ${RUN_DIR} keeps what was done" >&2
    exit 1
  fi
  attempt=$((attempt + 1))
  state="$(slice_state)"
  if usable "${state}"; then
    if ((attempt == 1)) && run_alive; then  # this script restarted beside a live run: watch it
      echo "attempt 1: the run is already going on ${TPU_NAME}; watching it"
      installed=1
      watch
      continue
    fi
    if ((attempt > 1)); then bash "${here}/stop.sh" || true; fi  # a crashed run's survivors
  else
    if ! pending "${state}"; then
      echo "attempt ${attempt}: the slice is ${state}; (re)creating it"
      if [[ "${state}" != GONE ]]; then bash "${here}/delete.sh" || true; fi
      if ! bash "${here}/create.sh"; then retry "creating the slice"; continue; fi
    fi
    wait_usable || continue
    installed=0  # a new slice is a fresh VM
  fi
  if ((installed == 0)); then
    if ! set_up; then retry "setting up the slice"; continue; fi
    installed=1
  fi
  echo "attempt ${attempt}: launching with --run-dir ${RUN_DIR}"
  if ! bash "${here}/launch.sh" "${config}" --run-dir "${RUN_DIR}" "$@"; then
    retry "the launch"
    continue
  fi
  launches=$((launches + 1))
  watch
done
