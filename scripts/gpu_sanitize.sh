#!/usr/bin/env bash
# compute-sanitizer over bench/sanitizer_cases.py (every kernel and variant once, split-KV,
# graph replays, KV writes, bad input without debug checks): memcheck, racecheck, synccheck
# and initcheck, the four at once (each instruments only our kernels), on the GPU machine.
# Writes $OUT/sanitizer_<tool>.log and the summary $OUT/sanitizer-<date>-<gpu>.txt; exits 1
# when a tool reports an error or a case disagrees with the reference.
#   ATTN_BACKEND_GIT_COMMIT=<sha> bash scripts/gpu_sanitize.sh
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/attn_backend_out}
mkdir -p "$OUT"
export PATH=/usr/local/cuda/bin:$PATH CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export ATTN_BACKEND_CACHE_DIR=${ATTN_BACKEND_CACHE_DIR:-/tmp/attn_backend_cache}
# The extension first, outside the tools (a JIT build under a sanitizer would take long).
python3 -c "from attn_backend import _extension; _extension.load_ops()" || exit 1
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
summary="$OUT/sanitizer-$(date +%Y-%m-%d)-$gpu.txt"
tools=(memcheck racecheck synccheck initcheck)
# Only our kernels are instrumented (torch's run as usual), except under initcheck: it must
# see the kernels that initialise our inputs (torch's random fills) to know they are written.
ours=()
compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name" && ours=(--kernel-name kns=attn_backend)
t0=$(date +%s) pids=()
for tool in "${tools[@]}"; do
  extra=("${ours[@]}")
  [ "$tool" = memcheck ] && extra+=(--leak-check no)
  [ "$tool" = racecheck ] && extra+=(--racecheck-report hazard)
  [ "$tool" = initcheck ] && extra=()
  timeout "${SANITIZE_TIMEOUT:-400}" compute-sanitizer --tool "$tool" "${extra[@]}" \
    --print-limit 20 --error-exitcode 9 python3 -m bench.sanitizer_cases \
    > "$OUT/sanitizer_$tool.log" 2>&1 &
  pids+=($!)
done
statuses=()
for pid in "${pids[@]}"; do wait "$pid"; statuses+=($?); done
rc=0
{
  echo "compute-sanitizer over python -m bench.sanitizer_cases (bash scripts/gpu_sanitize.sh)"
  echo "commit ${ATTN_BACKEND_GIT_COMMIT:-unknown}, $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader), $(compute-sanitizer --version | tail -n 1)"
  for i in "${!tools[@]}"; do
    echo "== ${tools[$i]}: exit ${statuses[$i]}"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitizer cases:|MISMATCH|Error|error:" \
      "$OUT/sanitizer_${tools[$i]}.log" | head -n 12
  done
  echo "(all four at once in $(( $(date +%s) - t0 )) s)"
  echo "== the calls each tool ran (from the memcheck log):"
  grep -E "^(ok|ran|MISMATCH): " "$OUT/sanitizer_memcheck.log"
} | tee "$summary"
for status in "${statuses[@]}"; do [ "$status" -eq 0 ] || rc=1; done
exit $rc
