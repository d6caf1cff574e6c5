#!/usr/bin/env bash
# Instruction histogram of the kernels in a CUDA binary whose names match a
# pattern (needs cuobjdump, i.e. the GPU machine's full toolkit):
#   bash scripts/sass_histogram.sh LIB.so 'paged_prefill_kernel.*Li128ELi128E.*bfloat16Lb0' [OUT.sass]
set -euo pipefail
lib=$1 pattern=$2 out=${3:-/dev/null}
cuobjdump -sass "$lib" | awk -v pat="$pattern" '
  /Function :/ { keep = ($0 ~ pat) } keep { print }' | tee "$out" |
  grep -oE '^\s+/\*[0-9a-f]+\*/\s+(@!?U?P[0-9T] )?[A-Z][A-Z0-9]*' | awk '{print $NF}' |
  sort | uniq -c | sort -rn | head -40
