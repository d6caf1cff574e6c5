#!/usr/bin/env bash
# One decode shape profiled with the build before a change and this one, in one GPU call:
# the CTA timelines of the traced decode (bench/sweep_decode.py --trace) over SHAPES, twice
# per build in turns, then ncu --set full of one launch per build (bench.profile_decode);
# the reports and their details / SASS source / raw pages land in $OUT/w.tgz.
#
#   BEFORE_DIR=.gpu/base [SHAPES=16x512x16,...] [NCU_BATCH=16 NCU_KV_LEN=512 NCU_PAGE=16] \
#     bash scripts/gpu_probe_decode.sh
# (BEFORE_DIR: an older tree of attn_backend/, kernels/ and bench/, e.g. from git archive; its
# sweep_decode must build no variants under --variants none, as from 16d54f4 on: older ones
# need that one line.)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); OUT=${OUT:-/tmp/attn_backend_out}
BEFORE=$(cd "${BEFORE_DIR:?set BEFORE_DIR to the before tree}" && pwd)
W=$OUT/w; mkdir -p "$W"
source "$ROOT/scripts/ncu_decode.sh"
export PATH=/usr/local/cuda/bin:$PATH CUDA_HOME=/usr/local/cuda PYTHONUNBUFFERED=1
export ATTN_BACKEND_CACHE_DIR=/tmp/abc MAX_JOBS=8
SHAPES=${SHAPES:-16x512x16,16x512x1,1x4096x16}
NCU_BATCH=${NCU_BATCH:-16} NCU_KV_LEN=${NCU_KV_LEN:-512} NCU_PAGE=${NCU_PAGE:-16}
t0=$(date +%s)
build() {  # NAME TREE
  (cd /tmp && PYTHONPATH=$2 python3 -c "
from attn_backend import _extension; _extension.load_ops(); print('$1', _extension.loaded_library())
from bench.sweep_decode import build_traced; build_traced(); print('$1 traced built')") > "$W/build_$1.log" 2>&1
}
build before "$BEFORE" & bp=$!
build after "$ROOT"; ar=$?; wait $bp; br=$?
echo "builds before=$br after=$ar in $(( $(date +%s) - t0 )) s"
[ $br -eq 0 ] && [ $ar -eq 0 ] || { tail -n 40 "$W"/build_*.log; tar -czf "$OUT/w.tgz" -C "$W" .; exit 1; }
for round in 1 2; do
for b in before after; do
  tree=$ROOT; [ $b = before ] && tree=$BEFORE
  (cd /tmp && PYTHONPATH=$tree python3 -m bench.sweep_decode --shapes "$SHAPES" --variants none --trace) \
    > "$W/trace_${b}_$round.log" 2>&1 || echo "trace $b rc=$?"
done; done
echo "traces done at $(( $(date +%s) - t0 )) s"
for b in before after; do
  tree=$ROOT; [ $b = before ] && tree=$BEFORE
  (cd /tmp && PYTHONPATH=$tree ncu_decode_launch "$W/ncu_$b" paged_decode "$NCU_BATCH" "$NCU_KV_LEN" "$NCU_PAGE") \
    || echo "ncu $b rc=$?"
  ncu -i "$W/ncu_$b.ncu-rep" --page source --csv --print-source sass > "$W/ncu_${b}_sass.csv" 2>&1
  ncu -i "$W/ncu_$b.ncu-rep" --page raw --csv > "$W/ncu_${b}_raw.csv" 2>&1
done
echo "ncu done at $(( $(date +%s) - t0 )) s"
tar -czf "$OUT/w.tgz" -C "$W" .
for f in "$W"/trace_*.log; do echo "== $(basename $f)"; grep -E "shipped|trace" "$f"; done
for b in before after; do echo "== ncu $b"; ncu_headline "$W/ncu_${b}_details.csv"; done
