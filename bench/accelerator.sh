#!/usr/bin/env bash
# Every accelerator target of the sampler/SFT/scoring issue on one GPU or TPU, in <= 5 minutes.
#
#   bash bench/accelerator.sh          # on the accelerator: JSON under bench/results/accelerator_<date>/
#   bash bench/accelerator.sh --dry    # CPU, tiny presets: the same steps end to end, to check the
#                                      # plumbing (figures meaningless; written to a temp dir)
#
# Steps (each under its own time limit, STEP_LIMIT seconds, default 150, and all of them within
# TOTAL_LIMIT, default 540; one failing, timed-out or unstarted step does not stop the others, and
# its targets are reported as not measured):
#   sampler_paper_eos  top-p 0.95 / T 0.7 on random stop tokens (geometric response lengths),
#                      batch 64, Llama-3.2-1B shape, vs transformers generate (static cache)
#   sampler_greedy     greedy, every row runs all new tokens: decode vs the HBM roofline, vs torch
#   sft                4 x 2048 SFT step, bf16: MFU, vs a torch step (autocast bf16, fused AdamW)
#   scoring            learnability scoring: MFU (vs torch forward)
#   sampling_math      the sampling math alone at batch 64 over Llama-3's vocabulary: greedy, top-p on
#                      peaked logits (the top-k prefilter) and on flat ones (the full radix search:
#                      what sampler_paper_eos pays on random weights), vs transformers' warpers
#   continuous         continuous against static batching on a heavy-tailed workload (useful-token
#                      fraction), and decode cost per token as the allocated cache grows (flat);
#                      a small model, the same in both modes: judged in a --dry run on CPU too
# The two sides of each step run sequentially in one process, alternating over 3 repeats, with
# XLA_PYTHON_CLIENT_PREALLOCATE=false so that the torch side finds free device memory.
# On a TPU host, or where torch has no CUDA (pyproject's CPU wheel), torch has no device: the
# torch anchors are skipped there (--no-torch).
# Finally bench/accelerator_summary.py checks each target and writes summary.json beside the runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1

stamp=$(date -u +%Y-%m-%dT%H%MZ)
since=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)  # the summary ignores step JSON older than this
if (( DRY )); then
  OUT=${OUT_DIR:-$(mktemp -d -t persyn_accel_dry.XXXX)}
  SAMPLER=(--preset cpu-tiny --batches 4)
  SFT=(--preset tiny)
  SCORING=(--preset tiny)
  CONTINUOUS=()
  MATH=(--batch 4 --vocab 4096 --steps 4)
  LIMIT=300
else
  OUT=${OUT_DIR:-bench/results/accelerator_$stamp}
  # sized by estimate (never run yet) to ~5 minutes in all on an H100/H200: compiles of the 1B
  # model dominate (~0.5-1 min a step); batch 64 is the target's, 256 + 128 tokens keep torch's
  # generate (~25 ms a step) to seconds per repeat
  SAMPLER=(--preset gpu-1b --batches 64 --prompt-len 256 --new-tokens 128 --repeats 3)
  SFT=(--preset gpu --set steps=3 rounds=3 warmup=1)
  # packed only (the scoring stage's default): a padded side would add ~7 compiles of the 1B model
  SCORING=(--preset gpu --pairs 128 --repeats 3 --packing true)
  CONTINUOUS=(--rows 512)
  MATH=()
  LIMIT=${STEP_LIMIT:-150}
fi
NO_TORCH=()
if ! (( DRY )) && ! "$PY" -c "import jax, sys, torch
sys.exit(not (jax.default_backend() == 'gpu' and torch.cuda.is_available()))"; then
  NO_TORCH=(--no-torch)  # a TPU, or a torch without CUDA: no torch anchor to time on the device
  echo "no CUDA torch beside JAX's accelerator here: the torch anchors are skipped (--no-torch)"
fi
mkdir -p "$OUT"
echo "accelerator bench -> $OUT (dry=$DRY, ${NO_TORCH[*]:-with torch})"

TOTAL=${TOTAL_LIMIT:-$(( DRY ? 3600 : 540 ))}  # the whole run ends within this (a device call: <= 600 s)
run() {  # name, then the command
  local name=$1; shift
  local t0=$SECONDS
  local left=$((TOTAL - SECONDS))
  if (( left < 30 )); then
    echo "== $name: not run, the total budget of $TOTAL s is spent (its targets: not measured)"
    return
  fi
  local limit=$(( left < LIMIT ? left : LIMIT ))
  echo "== $name (limit $limit s): $*"
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "   done in $((SECONDS - t0)) s"
  else
    echo "   FAILED or timed out after $((SECONDS - t0)) s (rc $?): see $OUT/$name.log"
    tail -5 "$OUT/$name.log"
  fi
}

run sampler_paper_eos "$PY" bench/sampler.py "${SAMPLER[@]}" --sampling paper --workload eos \
  "${NO_TORCH[@]}" --out "$OUT/sampler_paper_eos.json"
run sampler_greedy "$PY" bench/sampler.py "${SAMPLER[@]}" --sampling greedy --workload full \
  "${NO_TORCH[@]}" --out "$OUT/sampler_greedy.json"
run sft "$PY" bench/sft.py "${SFT[@]}" "${NO_TORCH[@]}" --out "$OUT/sft.json"
run scoring "$PY" bench/scoring.py "${SCORING[@]}" "${NO_TORCH[@]}" --out "$OUT/scoring.json"
run sampling_math "$PY" bench/sampling_math.py "${MATH[@]}" "${NO_TORCH[@]}" \
  --out "$OUT/sampling_math.json"
run continuous "$PY" bench/continuous.py "${CONTINUOUS[@]}" --out "$OUT/continuous.json"
"$PY" bench/accelerator_summary.py "$OUT" --since "$since" $( (( DRY )) && echo --dry )
echo "total $SECONDS s"
