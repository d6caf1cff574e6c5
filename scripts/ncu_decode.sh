# Sourced by the GPU machine's decode probes (gpu_probe_decode.sh, gpu_sweep_decode.sh): one
# decode launch under ncu, and the counters those scripts print of it.
#
#   ncu_decode_launch BASE KERNEL_REGEX BATCH KV_LEN PAGE
#       ncu --set full of the 4th matching launch of bench.profile_decode (ours, then
#       FlashInfer's: the regex picks whose); BASE.ncu-rep, BASE.log, BASE_details.csv.
#       Runs with the caller's PYTHONPATH and working directory.
#   ncu_headline DETAILS_CSV
#       duration, DRAM throughput, occupancy, registers, instructions, L2 hit rate, grid
#       and block of that report, one per line.
ncu_decode_launch() {
  local base=$1 regex=$2 batch=$3 kv_len=$4 page=$5 rc
  timeout 200 ncu --clock-control none --kernel-name "regex:$regex" --launch-skip 3 --launch-count 1 \
    --set full --import-source no -f -o "$base" \
    python3 -m bench.profile_decode --batch "$batch" --kv-len "$kv_len" --page-size "$page" --repeats 6 \
    > "$base.log" 2>&1
  rc=$?
  ncu -i "$base.ncu-rep" --page details --csv > "${base}_details.csv" 2>&1
  return $rc
}

ncu_headline() {
  grep -E '"(Duration|Elapsed Cycles|DRAM Throughput|Achieved Occupancy|Registers Per Thread|Executed Instructions|L2 Hit Rate|Grid Size|Block Size|Dynamic Shared Memory Per Block)"' "$1" \
    | cut -c1-400 | awk -F'","' '{print $(NF-2), $(NF-1), $NF}'
}
