# Sourced by scripts/test.sh and scripts/bench.sh: an environment with torch,
# the test tools and attn_backend built in place (kernels compiled by setup.py).
#
# - If python3 already has torch (the GPU machine's image), that interpreter is
#   used as is: it may have no network, and its torch is the one to build for.
# - Otherwise a virtualenv .venv is created with torch 2.14.1 (the CUDA build,
#   so the extension links; it runs on the CPU reference without a GPU).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [ -z "${CUDA_HOME:-}" ]; then
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")"; do
    if [ -x "$candidate/bin/nvcc" ] && [ -d "$candidate/include" ]; then export CUDA_HOME=$candidate; break; fi
  done
fi
if [ -z "${CUDA_HOME:-}" ]; then
  echo "env.sh: nvcc (the CUDA toolkit) is needed to build the kernels; set CUDA_HOME" >&2
  exit 1
fi
export PATH="$CUDA_HOME/bin:$PATH"

# pip, minus the notices about index locations this machine does not have.
quiet_pip() {
  "$PY" -m pip "$1" -q "${@:2}" 2>&1 | { grep -v -E "^WARNING: (Location|Running pip as)" || true; }
  return "${PIPESTATUS[0]}"
}

if python3 -c "import torch" 2>/dev/null; then
  PY=python3
else
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv --system-site-packages .venv
  fi
  PY=$ROOT/.venv/bin/python
  "$PY" -c "import torch" 2>/dev/null || quiet_pip install "torch==2.14.1"
fi
quiet_pip install ninja pytest hypothesis pytest-benchmark numpy matplotlib
# SGLang without its GPU-only dependencies, for the integration tests (on CPU they
# run on the float reference). Pinned to the release whose torch pin is ours.
SGLANG_FOR_TORCH_2_14="sglang==0.5.23"
SGLANG_CPU_DEPS=("transformers==5.19.0" "tokenizers==0.23.2" "torchvision==0.29.1"
  "apache-tvm-ffi==0.1.11" "compressed-tensors==0.18.0" "openai==2.25.0" "sentencepiece==0.2.1"
  pillow pyzmq msgspec pydantic orjson psutil pybase64 requests packaging starlette tqdm IPython
  aiohttp dill gguf partial_json_parser fastapi uvicorn einops)
if ! "$PY" -c "import sglang" 2>/dev/null; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.14.') else 1)"; then
    # pip lists sglang's GPU-only requirements as missing: expected, so not shown.
    if ! { quiet_pip install --no-deps "$SGLANG_FOR_TORCH_2_14" \
           && quiet_pip install "${SGLANG_CPU_DEPS[@]}" > /tmp/attn_backend_sglang_deps.log 2>&1; }; then
      cat /tmp/attn_backend_sglang_deps.log >&2
      echo "env.sh: installing $SGLANG_FOR_TORCH_2_14 failed; the SGLang integration tests will skip" >&2
      [ "${CI:-}" = "true" ] && exit 1
    fi
    grep -v -E "^(sglang [0-9.]+ requires|ERROR: pip's dependency resolver)" \
      /tmp/attn_backend_sglang_deps.log 2>/dev/null || true
  else
    echo "env.sh: no sglang release pinned for this torch; the SGLang integration tests will skip" >&2
  fi
fi

# vLLM without its CUDA dependencies, for the integration tests (on CPU they run on the
# float reference): its Python classes (configs, KV specs, metadata, registry) are what
# the tests drive. vllm 0.33.0 pins torch 2.14.0; its Python code runs on 2.14.1. The
# list below is what importing vllm.config and vllm.v1.attention needs; openai 2.25 (for
# vLLM's tool parsers) also serves sglang.
VLLM_FOR_TORCH_2_14="vllm==0.33.0"
VLLM_CPU_DEPS=(regex cachetools blake3 py-cpuinfo cbor2 ijson cloudpickle python-json-logger
  prometheus_client pyyaml safetensors protobuf jsonschema oss-harmony uvloop "xgrammar==0.2.8"
  "openai==2.25.0" llguidance)
if ! "$PY" -c "import vllm" 2>/dev/null; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.14.') else 1)"; then
    if ! { quiet_pip install --no-deps "$VLLM_FOR_TORCH_2_14" \
           && quiet_pip install "${VLLM_CPU_DEPS[@]}" > /tmp/attn_backend_vllm_deps.log 2>&1; }; then
      cat /tmp/attn_backend_vllm_deps.log >&2
      echo "env.sh: installing $VLLM_FOR_TORCH_2_14 failed; the vLLM integration tests will skip" >&2
      [ "${CI:-}" = "true" ] && exit 1
    fi
  else
    echo "env.sh: no vllm release pinned for this torch; the vLLM integration tests will skip" >&2
  fi
fi

started=$(date +%s)
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
  > /tmp/attn_backend_build.log 2>&1 || {
  tail -n 60 /tmp/attn_backend_build.log >&2
  echo "env.sh: building the attn_backend extension failed (full log: /tmp/attn_backend_build.log)" >&2
  exit 1
}
echo "env.sh: attn_backend built in $(( $(date +%s) - started )) s with $("$PY" -c 'import torch; print("torch", torch.__version__)')"
