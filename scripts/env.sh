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
# An engine package without its GPU-only dependencies, for the integration tests (on CPU
# they run on the float reference): the release pinned for our torch is installed with
# --no-deps, then the pure-Python (or CPU) packages its imports need.
#   install_engine MODULE "PACKAGE==VERSION" DEPENDENCY...
install_engine() {
  local module=$1 pinned=$2 log=/tmp/attn_backend_${1}_deps.log
  shift 2
  "$PY" -c "import $module" 2>/dev/null && return 0
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.14.') else 1)"; then
    echo "env.sh: no $module release pinned for this torch; its integration tests will skip" >&2
    return 0
  fi
  if ! { quiet_pip install --no-deps "$pinned" && quiet_pip install "$@" > "$log" 2>&1; }; then
    cat "$log" >&2
    echo "env.sh: installing $pinned failed; its integration tests will skip" >&2
    [ "${CI:-}" = "true" ] && exit 1
  fi
  # pip lists the engine's GPU-only requirements as missing: expected, so not shown.
  grep -v -E "^([a-z-]+ [0-9.a-z]+ requires|ERROR: pip's dependency resolver)" "$log" || true
}
# SGLang 0.5.23 pins torch 2.14.
install_engine sglang "sglang==0.5.23" "transformers==5.19.0" "tokenizers==0.23.2" \
  "torchvision==0.29.1" "apache-tvm-ffi==0.1.11" "compressed-tensors==0.18.0" "openai==2.25.0" \
  "sentencepiece==0.2.1" pillow pyzmq msgspec pydantic orjson psutil pybase64 requests \
  packaging starlette tqdm IPython aiohttp dill gguf partial_json_parser fastapi uvicorn einops \
  setproctitle
# vLLM 0.33.0 pins torch 2.14.0; its Python code (configs, KV specs, metadata, registry:
# what the tests drive) runs on 2.14.1. These are what importing vllm.config and
# vllm.v1.attention needs; openai 2.25 (vLLM's tool parsers) also serves sglang.
install_engine vllm "vllm==0.33.0" regex cachetools blake3 py-cpuinfo cbor2 ijson cloudpickle \
  python-json-logger prometheus_client pyyaml safetensors protobuf jsonschema oss-harmony uvloop \
  "xgrammar==0.2.8" "openai==2.25.0" llguidance

started=$(date +%s)
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
  > /tmp/attn_backend_build.log 2>&1 || {
  tail -n 60 /tmp/attn_backend_build.log >&2
  echo "env.sh: building the attn_backend extension failed (full log: /tmp/attn_backend_build.log)" >&2
  exit 1
}
echo "env.sh: attn_backend built in $(( $(date +%s) - started )) s with $("$PY" -c 'import torch; print("torch", torch.__version__)')"
