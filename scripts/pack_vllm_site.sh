#!/usr/bin/env bash
# vLLM's engine for the GPU machine in ONE carry: the three wheel folders of
# scripts/fetch_vllm_wheels.sh (106 MiB of zip-compressed wheels, two carries) unpacked as pip's
# --target would lay them out and packed again with xz (-9e: about 58 MiB), so that one call
# brings the whole engine: the machine goes cold 30 s after a call and loses /tmp, which made
# the two-call install fail whenever the second call came late. scripts/gpu_env.sh unpacks it
# into $SITE once per warm machine.
#   bash scripts/pack_vllm_site.sh [.whl_vllm]     # writes .whl_vllm_site/site.tar.xz
#   then carry .whl_vllm_site (not the three wheel folders), with .gpu or .vllm_tests as needed
set -euo pipefail
WHEELS=${1:-.whl_vllm}
OUT=${WHEELS}_site
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
count=0
for wheel in "$WHEELS"/*.whl "${WHEELS}_dep"/*.whl "${WHEELS}_fi"/*.whl; do
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
    "$wheel" "$scratch/site"
  count=$((count + 1))
done
if ls -d "$scratch"/site/*.data >/dev/null 2>&1; then
  # pip would spread a wheel's .data folders (scripts, headers) elsewhere; none is expected
  echo "pack_vllm_site: a wheel has a .data folder, which this packing does not place" >&2
  exit 1
fi
mkdir -p "$OUT"
rm -f "$OUT/site.tar.xz"
tar cf - -C "$scratch/site" . | xz -9e -T2 > "$OUT/site.tar.xz"
size=$(du -b "$OUT/site.tar.xz" | awk '{printf "%d", $1 / 1048576 + 0.999}')
echo "$OUT/site.tar.xz: $count wheels, $size MiB"
# With the checkout (~3 MiB) one carry must stay under 64 MiB.
if [ "$size" -gt 60 ]; then
  echo "pack_vllm_site: $size MiB is too much for one carry with the checkout" >&2
  exit 1
fi
