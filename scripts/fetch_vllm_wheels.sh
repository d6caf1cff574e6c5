#!/usr/bin/env bash
# vLLM 0.33.0 for the GPU machine (issue 21): a slim vLLM wheel (scripts/slim_vllm_wheel.py:
# Python files, sm_90-only stable-ABI CUDA ops, a vllm_flash_attn stand-in; ~26 MiB) and the
# wheels its imports need that the machine's image lacks (it has Python 3.12, torch 2.11 with
# its own dependencies, triton, numpy, pytest, ninja). Run where PyPI is reachable; carry the
# folders along (scripts/gpu_check.sh installs every .whl_*/*.whl it is given, without
# dependencies, and declares attn_backend's entry points, so vLLM's plugin loading finds it).
# Together they exceed one 64 MiB carry (which the checkout's ~3 MiB shares), so they come in
# folders for two consecutive calls on a warm machine (each call installs what it brought; the
# next finds it installed; the machine keeps /tmp while it stays warm):
#   call 1: OUT_dep (~27 MiB): the compiled wheels (cp312) but pillow, and OUT_fi (~29 MiB):
#     FlashInfer at vLLM's pin (0.7.2.post1), slimmed (slim_vllm_wheel.py --profile flashinfer):
#     vLLM's engine imports it (sampler, autotuner) and its FLASHINFER backend JIT-builds from
#     it; our tests and vLLM's attention suite do not need it;
#   call 2: OUT (~49 MiB): the slim vLLM wheel, the pure-Python wheels and pillow.
# Last, scripts/pack_vllm_site.sh packs all three into one archive for ONE carry
# (.whl_vllm_site/site.tar.xz, ~58 MiB with xz; the way to carry them now).
#   bash scripts/fetch_vllm_wheels.sh [.whl_vllm]   # writes .whl_vllm, .whl_vllm_dep, .whl_vllm_fi, .whl_vllm_site
# Env: PYVER (default 3.12: the GPU machine's), VLLM_WHEEL (a full vllm-0.33.0 wheel already
# here, to skip its 336 MB download).
# The list below is what importing vLLM's config, attention, MLA and distributed modules (our
# vLLM tests) needs, found by installing into an empty environment until the imports and
# tests/test_vllm_*.py passed; versions are those CI resolves for vllm 0.33.0 (scripts/env.sh).
# The engine (LLM(...), model loading) also imports compressed_tensors (and its loguru): seen
# on the H200, "No module named 'compressed_tensors'" at model construction.
set -euo pipefail
OUT=${1:-.whl_vllm}
DEP=${OUT}_dep
FI=${OUT}_fi
PYVER=${PYVER:-3.12}
CP=cp${PYVER/./}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$DEP" "$FI"
PLATFORMS=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 \
         manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
download() { # download DIR SPEC...
  local dir=$1; shift
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp --abi "$CP" --abi abi3 --abi none \
    "${PLATFORMS[@]}" -d "$dir" "$@"
}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
if [ -z "${VLLM_WHEEL:-}" ]; then
  full=$scratch/full
  download "$full" vllm==0.33.0
  VLLM_WHEEL=$(ls "$full"/vllm-0.33.0-*.whl)
fi
"$PY" "$HERE/slim_vllm_wheel.py" "$VLLM_WHEEL" "$OUT"

deps=$scratch/deps
download "$deps" \
  aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0 annotated-doc==0.0.7 \
  annotated-types==0.7.0 anyio==4.16.0 apache-tvm-ffi==0.1.11 attrs==26.1.0 cachetools==8.0.2 \
  cbor2==6.3.0 certifi==2026.5.20 cloudpickle==2.1.0 compressed-tensors==0.17.0 \
  distro==1.9.0 einops==0.8.2 loguru==0.7.3 \
  fastapi==0.165.0 frozenlist==1.8.0 h11==0.16.0 httpcore==1.0.9 httpx==0.28.1 \
  huggingface-hub==1.33.0 idna==3.13 llguidance==1.9.1 msgspec==0.23.0 multidict==7.2.1 \
  openai==2.25.0 oss-harmony==0.0.11 opentelemetry-api==1.45.2 \
  partial-json-parser==0.2.1.1.post7 pillow==13.0.0 prometheus-client==0.26.0 \
  propcache==0.5.4 psutil==7.2.2 py-cpuinfo==9.0.0 pybase64==1.5.1 pydantic==2.13.4 \
  pydantic-core==2.46.4 pyyaml==6.0.3 pyzmq==27.3.0 regex==2026.5.9 requests==2.34.2 \
  safetensors==0.8.0 sniffio==1.3.1 starlette==1.10.0 tokenizers==0.23.2 tqdm==4.70.1 \
  transformers==5.19.0 typing-inspection==0.4.2 urllib3==2.7.0 uvloop==0.23.0 \
  xgrammar==0.2.8 yarl==1.25.1
# pillow (7 MiB) goes with the pure-Python wheels, so that OUT_dep and OUT_fi share one carry.
mv "$deps"/*-none-any.whl "$deps"/pillow-*.whl "$OUT"/
mv "$deps"/*.whl "$DEP"/

download "$scratch/fi" flashinfer-python==0.7.2.post1
"$PY" "$HERE/slim_vllm_wheel.py" --profile flashinfer "$scratch"/fi/flashinfer_python-*.whl "$FI"
mib() { du -cb "$@" | tail -n 1 | awk '{printf "%d", $1 / 1048576 + 0.999}'; }
for dir in "$OUT" "$DEP" "$FI"; do
  echo "$dir: $(ls "$dir" | wc -l) wheels, $(mib "$dir") MiB"
done
# Each call's carry, with the checkout and .gpu (~5 MiB), must stay under 64 MiB.
for call in "$DEP $FI" "$OUT"; do
  if [ "$(mib $call)" -gt 58 ]; then
    echo "fetch_vllm_wheels: $call: over 58 MiB, too much for one carry with the checkout" >&2
    exit 1
  fi
done
bash "$HERE/pack_vllm_site.sh" "$OUT"
