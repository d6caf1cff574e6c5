#!/usr/bin/env bash
# vLLM's own attention-backend test modules, from the sdist of the release we run (issue 21):
# tests/v1/attention/{utils,test_attention_backends,test_mla_backends}.py and the package files
# they import through, unchanged, into DIR (default .vllm_tests, ~200 KB; carry it to the GPU).
#   bash scripts/vllm_suite/fetch_tests.sh [DIR]      (VLLM_SDIST=path skips the download)
set -euo pipefail
DIR=${1:-.vllm_tests}
VERSION=0.33.0
if [ -z "${VLLM_SDIST:-}" ]; then
  tmp=$(mktemp -d)
  url=$(curl -sSf https://pypi.org/simple/vllm/ | grep -o "https://[^\"#]*vllm-$VERSION.tar.gz" | head -1)
  curl -sSfL -o "$tmp/vllm-$VERSION.tar.gz" "$url"
  VLLM_SDIST=$tmp/vllm-$VERSION.tar.gz
fi
mkdir -p "$DIR"
members=(tests/__init__.py tests/v1/__init__.py tests/v1/attention/utils.py
         tests/v1/attention/test_attention_backends.py tests/v1/attention/test_mla_backends.py)
tar -xzf "$VLLM_SDIST" -C "$DIR" --strip-components=1 "${members[@]/#/vllm-$VERSION/}"
echo "$DIR: vLLM $VERSION's $(find "$DIR" -name '*.py' | wc -l) test files"
