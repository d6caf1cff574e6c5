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
suite=test_attention_backends
python3 -m pytest -p attn_backend_plugin -p no:cacheprovider -q -rfEs --rootdir "$DIR" \
  "$DIR/tests/v1/attention/$suite.py" -k "$K" --junitxml="$OUT/vllm_$suite.xml" "$@" \
  2>&1 | tee "$OUT/vllm_$suite.log" | tail -n 25
rc=${PIPESTATUS[0]}
echo "vllm suite $suite: rc=$rc: $(tail -n 1 "$OUT/vllm_$suite.log")"
exit "$rc"
