#!/usr/bin/env bash
# A kernel change judged before/after on the GPU machine in one call: builds the tree in
# BEFORE_DIR (an older checkout of attn_backend/ and kernels/, e.g. from `git archive`) and this
# one (MAX_JOBS=16 split between them), optionally runs this tree's GPU tests, times the
# benchmarks with each build in turns (ours alone), and combines each benchmark's runs into
# one result with the before build as a peer (bench/before_after.py). The tables and the test
# log land in $OUT, every other log and JSON in $OUT/all.tgz (the device tool brings back
# at most 8 files).
#
#   BEFORE_DIR=.gpu/base BEFORE_LABEL=c66ed44 ATTN_BACKEND_GIT_COMMIT=<sha> [PYTEST_K=...] \
#   [TESTS_TIMEOUT_S=seconds] bash scripts/gpu_before_after.sh [--tests] [--rounds N] [--only decode,prefill]
#       [--also-peers flashinfer]   (one more after run with those peers, merged in)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-/tmp/attn_backend_out}
BEFORE_DIR=$(cd "${BEFORE_DIR:?set BEFORE_DIR to the before tree}" && pwd)
BEFORE_LABEL=${BEFORE_LABEL:?set BEFORE_LABEL to the before commit}
AFTER_LABEL=${ATTN_BACKEND_GIT_COMMIT:-after}
WORK=$OUT/work
mkdir -p "$WORK"
export PATH=/usr/local/cuda/bin:$PATH CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
export ATTN_BACKEND_CACHE_DIR=${ATTN_BACKEND_CACHE_DIR:-/tmp/attn_backend_cache}
run_tests=0 rounds=2 only=decode,prefill also_peers=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) run_tests=1 ;;
    --rounds) rounds=$2; shift ;;
    --only) only=$2; shift ;;
    --also-peers) also_peers=$2; shift ;;
    *) echo "gpu_before_after.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$also_peers" ] && ls "$ROOT"/.whl_*/*.whl >/dev/null 2>&1 && [ -f "$ROOT/.gpu/install_wheels.sh" ]; then
  source "$ROOT/.gpu/install_wheels.sh" "$ROOT"/.whl_*/*.whl || exit 1
fi
summary=()
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$WORK/gpu.txt"

# Both builds at once (the JIT path, as a user's first call); each in its own cache folder.
build() {  # build NAME TREE
  (cd /tmp && MAX_JOBS=8 PYTHONPATH="$2${PYTHONPATH:+:$PYTHONPATH}" python3 -c "
import logging; logging.basicConfig(level=logging.WARNING)
from attn_backend import _extension; _extension.load_ops(); print('$1 loaded', _extension.loaded_library())
") > "$WORK/build_$1.log" 2>&1
}
t0=$(date +%s)
build before "$BEFORE_DIR" & before_pid=$!
build after "$ROOT"; after_rc=$?
wait $before_pid; before_rc=$?
summary+=("builds: before rc=$before_rc, after rc=$after_rc in $(( $(date +%s) - t0 )) s")
if [ $before_rc -ne 0 ] || [ $after_rc -ne 0 ]; then
  tail -n 30 "$WORK"/build_*.log; printf '%s\n' "${summary[@]}"; exit 1
fi

test_rc=0
if [ "$run_tests" -eq 1 ]; then
  t0=$(date +%s)
  # TESTS_TIMEOUT_S bounds the tests (a kernel that hangs would otherwise take the whole call).
  (cd "$ROOT" && timeout "${TESTS_TIMEOUT_S:-0}" python3 -m pytest -q -m gpu tests -p no:cacheprovider --maxfail=25 \
     ${PYTEST_K:+-k "$PYTEST_K"} --junitxml="$WORK/gpu_tests.xml") > "$OUT/gpu_tests.log" 2>&1
  test_rc=$?
  summary+=("gpu tests: rc=$test_rc in $(( $(date +%s) - t0 )) s: $(tail -n 1 "$OUT/gpu_tests.log")")
fi

# The benchmarks with each build in turns: the bench package is this tree's (it uses the
# wrappers' public API only); attn_backend comes first on the path from the build's tree.
bench() {  # bench NAME TREE LABEL PEERS
  (cd /tmp && ATTN_BACKEND_BENCH_PEERS=$4 ATTN_BACKEND_GIT_COMMIT=$3 \
     ATTN_BACKEND_BENCH_COMMAND="bash scripts/gpu_before_after.sh ($1 build, peers $4)" \
     PYTHONPATH="$2:$ROOT${PYTHONPATH:+:$PYTHONPATH}" python3 -m bench.run_all --only "$only" \
       --out "$WORK/$1") \
    >> "$WORK/bench_$1.log" 2>&1
}
t0=$(date +%s)
bench_rc=0
for round in $(seq 1 "$rounds"); do
  bench "before_$round" "$BEFORE_DIR" "$BEFORE_LABEL" none || bench_rc=1
  bench "after_$round" "$ROOT" "$AFTER_LABEL" none || bench_rc=1
done
if [ -n "$also_peers" ]; then bench "peers" "$ROOT" "$AFTER_LABEL" "$also_peers" || bench_rc=1; fi
summary+=("benchmarks: rc=$bench_rc, $rounds rounds in $(( $(date +%s) - t0 )) s")

tables=()
for name in ${only//,/ }; do
  befores=("$WORK"/before_*/"$name"-*.json) afters=("$WORK"/after_*/"$name"-*.json)
  also=(); [ -n "$also_peers" ] && also=(--also "$WORK"/peers/"$name"-*.json)
  (cd "$ROOT" && python3 -m bench.before_after --before "${befores[@]}" --after "${afters[@]}" \
     "${also[@]}" --label "$BEFORE_LABEL" --out "$WORK/result/$(basename "${afters[0]}")") \
    > "$OUT/before_after_$name.txt" 2>&1 || bench_rc=1
  tables+=("$(cat "$OUT/before_after_$name.txt")")
done
tar -czf "$OUT/all.tgz" -C "$WORK" . && rm -rf "$WORK"
echo
printf '%s\n\n' "${tables[@]}"
echo "==== gpu_before_after summary ===="
printf '%s\n' "${summary[@]}"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
