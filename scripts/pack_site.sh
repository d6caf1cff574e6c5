#!/usr/bin/env bash
# An engine's wheels for the GPU machine in ONE carry: wheel folders (zip-compressed wheels that
# together exceed one 64 MiB carry) unpacked as pip's --target would lay them out and packed
# again with xz (-9e), so that one call brings the whole engine. The machine goes cold 30 s
# after a call and loses /tmp, which made installs split over two calls fail whenever the
# second call came late. scripts/gpu_env.sh unpacks every .whl_*_site/site.tar.xz into $SITE
# once per warm machine.
#   bash scripts/pack_site.sh OUT_DIR WHEEL_FOLDER...    # writes OUT_DIR/site.tar.xz
#   e.g. bash scripts/pack_site.sh .whl_sglang_site .whl_sgl .whl_dep .whl_fi
#   then carry OUT_DIR (not the wheel folders), with .gpu as needed
set -euo pipefail
OUT=${1:?usage: pack_site.sh OUT_DIR WHEEL_FOLDER...}
shift
[ $# -gt 0 ] || { echo "pack_site: name the wheel folders" >&2; exit 2; }
case "$OUT" in
  .whl_*_site) ;;
  *) echo "pack_site: OUT_DIR must be named .whl_<name>_site (gpu_env.sh looks for those)" >&2; exit 2 ;;
esac
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
count=0
for folder in "$@"; do
  for wheel in "$folder"/*.whl; do
    [ -f "$wheel" ] || { echo "pack_site: no wheels in $folder" >&2; exit 1; }
    python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
      "$wheel" "$scratch/site"
    count=$((count + 1))
  done
done
# pip spreads a wheel's .data folder: purelib/platlib into the site (merged here as pip would),
# scripts, data and headers outside it (command-line entry points, man pages: nothing an import
# needs, so they are left out; dill and ipython in SGLang's set carry such folders).
for data in "$scratch"/site/*.data; do
  [ -d "$data" ] || continue
  for lib in purelib platlib; do
    if [ -d "$data/$lib" ]; then cp -a "$data/$lib/." "$scratch/site/"; fi
  done
  kept=$(ls "$data" | grep -E '^(purelib|platlib)$' | tr '\n' ' ' || true)
  dropped=$(ls "$data" | grep -vE '^(purelib|platlib)$' | tr '\n' ' ' || true)
  echo "pack_site: $(basename "$data"): merged ${kept:-nothing}; left out ${dropped:-nothing}"
  rm -rf "$data"
done
mkdir -p "$OUT"
rm -f "$OUT/site.tar.xz"
tar cf - -C "$scratch/site" . | xz -9e -T2 > "$OUT/site.tar.xz"
size=$(du -b "$OUT/site.tar.xz" | awk '{printf "%d", $1 / 1048576 + 0.999}')
echo "$OUT/site.tar.xz: $count wheels, $size MiB"
# With the checkout (~3 MiB) one carry must stay under 64 MiB.
if [ "$size" -gt 60 ]; then
  echo "pack_site: $size MiB is too much for one carry with the checkout" >&2
  exit 1
fi
