#!/usr/bin/env bash
# A second FlashInfer release for the GPU machine's kernel benchmarks (issue 20: the newest one
# that runs there beside 0.6.15.post1), slimmed to fit one carry beside .gpu and .whl_fi:
# flashinfer-python VERSION downloaded without its dependencies (0.7.x needs apache-tvm-ffi
# 0.1.11+, which .whl_fi brings) and repacked without the kernel sources its fa2/fa3 prefill and
# decode modules never compile (.gpu/slim_flashinfer.sh: 0.7.4 96.6 -> 36.3 MiB).
#   bash scripts/fetch_flashinfer_peer.sh 0.7.4 .fi_peer
# The folder is not a .whl_* one on purpose: gpu_env.sh installs those into one site, where two
# FlashInfer releases would collide; scripts/gpu_flashinfer_peer.sh installs it apart.
set -euo pipefail
VERSION=${1:?usage: fetch_flashinfer_peer.sh VERSION OUT_DIR}
OUT=${2:?usage: fetch_flashinfer_peer.sh VERSION OUT_DIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SLIM=$ROOT/.gpu/slim_flashinfer.sh
[ -f "$SLIM" ] || SLIM=$ROOT/../shared/device/slim_flashinfer.sh
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$scratch" "flashinfer-python==$VERSION" 2>&1 | { grep -v "^WARNING: Location" || true; }
mkdir -p "$OUT"
rm -f "$OUT"/flashinfer_python-*.whl
bash "$SLIM" "$scratch"/flashinfer_python-"$VERSION"-*.whl "$OUT"
echo "$VERSION" > "$OUT/VERSION"
du -sh "$OUT"
