#!/usr/bin/env bash
# Runner for the GPU machine (no network; torch from its image): JIT-builds the
# kernels (MAX_JOBS=16), runs the gpu-marked tests, runs the benchmarks, writes
# logs and JSON under $OUT, and prints a short summary last.
#   ATTN_BACKEND_GIT_COMMIT=<sha> bash scripts/gpu_check.sh [--tests-only | --bench-only]
#       [--only BENCHES]        (PYTEST_K=EXPR selects tests; the commit stamps the results,
#                                since the GPU machine's copy of the tree has no .git)
# The tests include a fuzz against the reference (FUZZ_CASES cases, default 2000, FUZZ_WORKERS
# processes, default 8, FUZZ_SECONDS an optional time limit: bench/fuzz.py; its JSON in $OUT) and compute-sanitizer over the kernel set
# (scripts/gpu_sanitize.sh; FUZZ_CASES=0 / SANITIZE=0 leave them out).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" || exit 1
run_tests=1 run_bench=1 bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tests-only) run_bench=0 ;;
    --bench-only) run_tests=0 ;;
    --only) bench_args+=(--only "$2"); shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
summary=()
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

t0=$(date +%s)
python3 -c "
import logging; logging.basicConfig(level=logging.INFO)
from attn_backend import _extension; _extension.load_ops(); print('loaded', _extension.loaded_library())
" 2>&1 | tee "$OUT/build.log"
build_rc=${PIPESTATUS[0]}
summary+=("build (JIT): rc=$build_rc in $(( $(date +%s) - t0 )) s")
[ "$build_rc" -eq 0 ] || { printf '%s\n' "${summary[@]}"; exit 1; }

test_rc=0
if [ "$run_tests" -eq 1 ]; then
  t0=$(date +%s)
  python3 -m pytest -q -m gpu tests ${PYTEST_K:+-k "$PYTEST_K"} --junitxml="$OUT/gpu_tests.xml" \
    2>&1 | tee "$OUT/gpu_tests.log"
  test_rc=${PIPESTATUS[0]}
  summary+=("gpu tests: rc=$test_rc in $(( $(date +%s) - t0 )) s: $(tail -n 1 "$OUT/gpu_tests.log")")
fi

# The fuzz and compute-sanitizer at once: the fuzz's workers are host-bound, the sanitized
# calls slow; neither needs the GPU to itself for its answer.
fuzz_rc=0 sanitize_rc=0 sanitize_pid=""
if [ "$run_tests" -eq 1 ] && [ "${SANITIZE:-1}" -eq 1 ]; then
  t_sanitize=$(date +%s)
  bash scripts/gpu_sanitize.sh > "$OUT/sanitize.log" 2>&1 & sanitize_pid=$!
fi
if [ "$run_tests" -eq 1 ] && [ "${FUZZ_CASES:-2000}" -gt 0 ]; then
  t0=$(date +%s)
  ATTN_BACKEND_BENCH_COMMAND="bash scripts/gpu_check.sh (FUZZ_CASES=${FUZZ_CASES:-2000})" \
    python3 -m bench.fuzz --cases "${FUZZ_CASES:-2000}" --workers "${FUZZ_WORKERS:-8}" \
      ${FUZZ_SECONDS:+--seconds "$FUZZ_SECONDS"} --out "$OUT" \
    > "$OUT/fuzz.log" 2>&1
  fuzz_rc=$?
  summary+=("fuzz: rc=$fuzz_rc in $(( $(date +%s) - t0 )) s: $(grep '^fuzz:' "$OUT/fuzz.log")")
fi
if [ -n "$sanitize_pid" ]; then
  wait "$sanitize_pid"; sanitize_rc=$?
  summary+=("compute-sanitizer: rc=$sanitize_rc in $(( $(date +%s) - t_sanitize )) s: $(grep -c ': exit 0' "$OUT/sanitize.log") of 4 tools clean")
fi

# SGLang's own attention kit against attn_backend, when sglang is installed
# (wheels from .gpu/fetch_sglang_wheels.sh): all of its runner modes at head_dim 128.
kit_rc=0
if [ "$run_tests" -eq 1 ] && [ -d .gpu/sglang_kit ] && python3 -c "import sglang" 2>/dev/null; then
  t0=$(date +%s)
  ATTN_KIT_BACKEND=attn_backend ATTN_KIT_IMPORTS=attn_backend.launch ATTN_KIT_HEAD_DIM=128 \
    ATTN_KIT_HIDDEN=512 python3 -m pytest -q -rs -p no:cacheprovider .gpu/sglang_kit \
    2>&1 | tee "$OUT/sglang_kit.log"
  kit_rc=${PIPESTATUS[0]}
  summary+=("sglang kit: rc=$kit_rc in $(( $(date +%s) - t0 )) s: $(tail -n 1 "$OUT/sglang_kit.log")")
fi

# vLLM's own attention-backend tests against attn_backend, when vLLM is installed
# (scripts/fetch_vllm_wheels.sh) and its test modules came along (scripts/vllm_suite/fetch_tests.sh).
vllm_rc=0
if [ "$run_tests" -eq 1 ] && [ -d .vllm_tests ] && python3 -c "import vllm" 2>/dev/null; then
  t0=$(date +%s)
  OUT=$OUT bash scripts/vllm_suite/run.sh .vllm_tests > "$OUT/vllm_suite.log" 2>&1
  vllm_rc=$?
  summary+=("vllm's attention suites: rc=$vllm_rc in $(( $(date +%s) - t0 )) s: $(grep '^vllm suite' "$OUT/vllm_suite.log" | tr '\n' ' ')")
fi

bench_rc=0
if [ "$run_bench" -eq 1 ]; then
  t0=$(date +%s)
  ATTN_BACKEND_BENCH_COMMAND="bash scripts/gpu_check.sh${bench_args[*]:+ ${bench_args[*]}}" \
    python3 -m bench.run_all --out "$OUT" "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
  summary+=("benchmarks: rc=$bench_rc in $(( $(date +%s) - t0 )) s (JSON in $OUT)")
fi

echo
echo "==== gpu_check summary ===="
printf '%s\n' "${summary[@]}"
[ "$test_rc" -eq 0 ] && [ "$fuzz_rc" -eq 0 ] && [ "$sanitize_rc" -eq 0 ] && [ "$kit_rc" -eq 0 ] && \
  [ "$vllm_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
