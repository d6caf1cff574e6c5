#!/usr/bin/env bash
# The decode kernel's shape and plan alternatives on the GPU machine, in one call: the JIT
# build, then bench.sweep_decode over SHAPES (every variant of its VARIANTS under each of
# PLANS, the traced shipped shape's CTA timeline, FlashInfer's tensor-core decode on the same
# paged data when .whl_fi came along), then ncu --set full of one launch of ours and one of
# FlashInfer's on NCU_SHAPE (bench.profile_decode). Logs and reports land in $OUT/w.tgz; the
# timings and the ncu headline counters are printed last.
#
#   [SHAPES=16x32768x1,...] [PLANS=shipped,balanced] [NCU_SHAPE=16x32768x1|none] \
#     bash scripts/gpu_sweep_decode.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" || exit 1
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
timeout 420 python3 -m bench.sweep_decode --shapes "$SHAPES" --plans "$PLANS" --trace > "$W/sweep.log" 2>&1
echo "sweep: rc=$? at $(( $(date +%s) - t0 )) s"
if [ "$NCU_SHAPE" != none ]; then
  IFS=x read -r batch kv_len page <<< "$NCU_SHAPE"
  for who in ours flashinfer; do
    regex=paged_decode
    [ "$who" = flashinfer ] && regex='BatchPrefillWithPagedKVCache|BatchDecodeWithPagedKVCache'
    timeout 150 ncu --clock-control none --kernel-name "regex:$regex" --launch-skip 3 --launch-count 1 \
      --set full --import-source no -f -o "$W/ncu_$who" \
      python3 -m bench.profile_decode --batch "$batch" --kv-len "$kv_len" --page-size "$page" --repeats 6 \
      > "$W/ncu_$who.log" 2>&1 || echo "ncu $who: rc=$?"
    ncu -i "$W/ncu_$who.ncu-rep" --page details --csv > "$W/ncu_${who}_details.csv" 2>&1
  done
  echo "ncu: done at $(( $(date +%s) - t0 )) s"
fi
tar -czf "$OUT/w.tgz" -C "$W" .
grep -E "TB/s|trace|copy ceiling|Error|error" "$W/sweep.log" | cut -c1-230
if [ "$NCU_SHAPE" != none ]; then
  for who in ours flashinfer; do
    echo "== ncu $who ($NCU_SHAPE)"
    grep -E '"(Duration|DRAM Throughput|Achieved Occupancy|Registers Per Thread|Executed Instructions|L2 Hit Rate|Grid Size|Block Size|Dynamic Shared Memory Per Block)"' \
      "$W/ncu_${who}_details.csv" | awk -F'","' '{print $(NF-2), $(NF-1), $NF}'
  done
fi
