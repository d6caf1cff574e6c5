#!/usr/bin/env bash
# FlashMLA for bench/bench_mla.py's `flashmla` peer on the GPU machine: SGLang 0.5.23's pin,
# sgl-flash-mla 1.0.0 (10 MB; its extensions register through torch's stable ABI, so they may
# load under the machine's older torch). Run where PyPI is reachable; carry the folder along
# (scripts/gpu_check.sh installs every .whl_*/*.whl it is given, without dependencies).
#   bash scripts/fetch_mla_peer_wheel.sh [.whl_fmla]
set -euo pipefail
OUT=${1:-.whl_fmla}
mkdir -p "$OUT"
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$OUT" sgl-flash-mla==1.0.0
du -sh "$OUT"
