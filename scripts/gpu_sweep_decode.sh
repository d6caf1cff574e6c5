#!/usr/bin/env bash
# The decode kernel's shape and plan alternatives on the GPU machine, in one call: the JIT
# build, then bench.sweep_decode over SHAPES (every variant of its VARIANTS under each of
# PLANS, the traced shipped shape's CTA timeline, FlashInfer's tensor-core decode on the same
# paged data when .whl_fi came along), then ncu --set full of one launch of ours and one of
# FlashInfer's on NCU_SHAPE (bench.profile_decode). Logs and reports land in $OUT/w.tgz; the
# timings and the ncu headline counters are printed last.
#
#   [SHAPES=16x32768x1,...] [PLANS=shipped,balanced] [NCU_SHAPE=16x32768x1|none] \
#     [VARIANTS=none|0,2,...] bash scripts/gpu_sweep_decode.sh
# (VARIANTS=none: only the shipped op, its traced build and FlashInfer; no variant build.)
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" || exit 1
source "$ROOT/scripts/ncu_decode.sh"
set -uo pipefail
W=$OUT/w
mkdir -p "$W"
SHAPES=${SHAPES:-16x32768x1,16x32768x16,16x4096x1,16x4096x16,1x32768x1,1x32768x16,1x4096x1,64x4096x1}
PLANS=${PLANS:-shipped,balanced}
NCU_SHAPE=${NCU_SHAPE:-16x32768x1}
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$W/gpu.txt"
python3 -c "from attn_backend import _extension; _extension.load_ops(); print('built', _extension.loaded_library())" \
  > "$W/build.log" 2>&1 || { tail -n 40 "$W/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
timeout 420 python3 -m bench.sweep_decode --shapes "$SHAPES" --plans "$PLANS" --trace \
  ${VARIANTS:+--variants "$VARIANTS"} > "$W/sweep.log" 2>&1
echo "sweep: rc=$? at $(( $(date +%s) - t0 )) s"
if [ "$NCU_SHAPE" != none ]; then
  IFS=x read -r batch kv_len page <<< "$NCU_SHAPE"
  for who in ours flashinfer; do
    regex=paged_decode
    [ "$who" = flashinfer ] && regex='BatchPrefillWithPagedKVCache|BatchDecodeWithPagedKVCache'
    ncu_decode_launch "$W/ncu_$who" "$regex" "$batch" "$kv_len" "$page" || echo "ncu $who: rc=$?"
  done
  echo "ncu: done at $(( $(date +%s) - t0 )) s"
fi
tar -czf "$OUT/w.tgz" -C "$W" .
grep -E "TB/s|trace|copy ceiling|Error|error" "$W/sweep.log" | cut -c1-230
if [ "$NCU_SHAPE" != none ]; then
  for who in ours flashinfer; do
    echo "== ncu $who ($NCU_SHAPE)"
    ncu_headline "$W/ncu_${who}_details.csv"
  done
fi
