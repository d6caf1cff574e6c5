#!/usr/bin/env bash
# vLLM's own attention-backend tests against attn_backend (issue 21): the modules fetch_tests.sh
# took from vLLM's sdist, unchanged, adapted from outside by attn_backend_plugin.py.
#   bash scripts/vllm_suite/run.sh [DIR] [pytest args...]     (DIR default .vllm_tests)
# Suites (VLLM_SUITE_K, a pytest -k expression): the causal (fp16/bf16 and FP8 caches, TP 1/2/4
# head shares), non-causal (DFlash blocks), sliding-window and speculative-as-decode tests of
# test_attention_backends.py.
# (test_mla_backends.py is fetched but not run: it fixes its parameters at import from vLLM's
# own MLA and MLA-prefill backend lists, which no outside adaptation reaches; our MLA backend
# runs under vLLM's real MLAAttention layer in tests/test_vllm_mla.py.)
# Each suite runs eagerly and, on a GPU, once more with every forward captured in a CUDA graph
# and replayed (VLLM_SUITE_MODES, default "eager graph" where nvidia-smi is found, else "eager").
# Needs vLLM importable (scripts/fetch_vllm_wheels.sh on the GPU machine). Without a GPU, set
# VLLM_TARGET_DEVICE=cpu (vLLM's CPU platform; attn_backend runs its float reference).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DIR=$(cd "${1:-$ROOT/.vllm_tests}" && pwd); shift || true
K=${VLLM_SUITE_K:-test_causal_backend_correctness or test_non_causal_backend_correctness or test_sliding_window_backend_correctness or spec_as_decode}
OUT=${OUT:-/tmp/attn_backend_out}
mkdir -p "$OUT"
# vLLM's `tests` package first: the checkout has a `tests` package of its own, and
# `python -m` puts the working directory ahead of PYTHONPATH, so run from DIR.
export PYTHONPATH=$DIR:$ROOT:$ROOT/scripts/vllm_suite${PYTHONPATH:+:$PYTHONPATH}
cd "$DIR" || exit 2
if [ -z "${VLLM_SUITE_MODES:-}" ]; then
  VLLM_SUITE_MODES=eager
  command -v nvidia-smi >/dev/null 2>&1 && VLLM_SUITE_MODES="eager graph"
fi
suite=test_attention_backends
rc=0
for mode in $VLLM_SUITE_MODES; do
  case "$mode" in
    eager) graphs=0 ;;
    graph) graphs=1 ;;
    *) echo "run.sh: VLLM_SUITE_MODES takes eager and graph, not $mode" >&2; exit 2 ;;
  esac
  log=$OUT/vllm_${suite}_$mode.log
  ATTN_BACKEND_VLLM_SUITE_GRAPHS=$graphs python3 -m pytest -p attn_backend_plugin \
    -p no:cacheprovider -q -rfEs --rootdir "$DIR" "$DIR/tests/v1/attention/$suite.py" -k "$K" \
    --junitxml="$OUT/vllm_${suite}_$mode.xml" "$@" 2>&1 | tee "$log" | tail -n 25
  mode_rc=${PIPESTATUS[0]}
  [ "$mode_rc" -eq 0 ] || rc=$mode_rc
  echo "vllm suite $suite ($mode): rc=$mode_rc: $(grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -n 1)"
done
exit "$rc"
