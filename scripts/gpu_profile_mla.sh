#!/usr/bin/env bash
# ncu --set full of one MLA latent launch per (backend, shape), in one GPU call: the details,
# raw and SASS-source pages land in $OUT/ncu_mla.tgz; key counters are printed last.
#   PROFILES="wgmma:64x4096x128 wgmma:64x4096x16 mma:64x4096x16" bash scripts/gpu_profile_mla.sh
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); OUT=${OUT:-/tmp/attn_backend_out}
W=$OUT/ncu_mla; mkdir -p "$W"; cd "$ROOT"
export PATH=/usr/local/cuda/bin:$PATH CUDA_HOME=/usr/local/cuda PYTHONUNBUFFERED=1
export ATTN_BACKEND_CACHE_DIR=${ATTN_BACKEND_CACHE_DIR:-/tmp/attn_backend_cache} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH=$ROOT
python3 -c "from attn_backend import _extension; _extension.load_ops()" || exit 1
for profile in ${PROFILES:-wgmma:64x4096x128 wgmma:64x4096x16 mma:64x4096x16}; do
  backend=${profile%%:*} shape=${profile#*:}
  IFS=x read -r batch kv heads <<< "$shape"
  name=${backend}_${shape}
  timeout 240 ncu --clock-control none --kernel-name regex:paged_mla --launch-skip 2 \
    --launch-count 1 --set full --import-source no -f -o "$W/$name" \
    python3 -m bench.profile_mla --batch "$batch" --kv-len "$kv" --heads "$heads" \
    --backend "$backend" > "$W/$name.log" 2>&1 || echo "ncu $name rc=$?"
  ncu -i "$W/$name.ncu-rep" --page details --csv > "$W/${name}_details.csv" 2>&1
  ncu -i "$W/$name.ncu-rep" --page source --csv --print-source sass > "$W/${name}_sass.csv" 2>&1
  ncu -i "$W/$name.ncu-rep" --page raw --csv > "$W/${name}_raw.csv" 2>&1
done
tar -czf "$OUT/ncu_mla.tgz" -C "$W" .
for f in "$W"/*_details.csv; do
  echo "== $(basename "$f" _details.csv)"
  grep -E '"(Duration|Elapsed Cycles|Executed Instructions|Registers Per Thread|Achieved Occupancy|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Executed Ipc Active|Shared Memory Configuration Size|L1/TEX Hit Rate|L2 Hit Rate|No Eligible|Warp Cycles Per Issued Instruction)"' "$f" \
    | awk -F'","' '{gsub(/"/, "", $NF); print $(NF-2) " = " $NF " " $(NF-1)}'
done
