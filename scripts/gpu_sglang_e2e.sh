#!/usr/bin/env bash
# SGLang end to end on the GPU machine (issues 18-20): unpacks SGLang 0.5.17 and its peers'
# wheels (one carry: .whl_sglang_site, from scripts/pack_site.sh), JIT-builds our kernels and
# runs bench/e2e_sglang.py with E2E_ARGS, its logs in $OUT/e2e (kept between calls on a warm
# machine under /tmp/e2e_sglang, so `--resume` continues a run that one call cannot finish), and
# prints a summary last. One call, carry .whl_sglang_site:
#   ATTN_BACKEND_GIT_COMMIT=<sha> E2E_ARGS="--backends attn_backend flashinfer triton --shapes 64x4096 --engines 3" \
#     bash scripts/gpu_sglang_e2e.sh
# Building the archive here: bash .gpu/fetch_sglang_wheels.sh .whl_sgl .whl_dep;
# bash .gpu/fetch_flashinfer_wheels.sh .whl_fi; bash scripts/pack_site.sh .whl_sglang_site
# .whl_sgl .whl_dep .whl_fi (then carry .whl_sglang_site alone: the wheel folders are 91 MiB).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LOGS=${E2E_LOG_DIR:-/tmp/e2e_sglang}
summary=()
finish() {
  echo
  echo "==== gpu_sglang_e2e summary ===="
  printf '%s\n' "${summary[@]}"
}
if ! python3 -c "import sglang, flashinfer" 2>/dev/null; then
  summary+=("sglang or flashinfer not importable: carry .whl_sglang_site (scripts/pack_site.sh)")
  finish
  exit 1
fi
summary+=("$(python3 -c "
import torch, sglang, flashinfer
print(f'torch {torch.__version__}, sglang {sglang.__version__}, flashinfer {flashinfer.__version__}')
" 2>&1 | tail -n 1)")
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt"

build_line=$(jit_build "$OUT/build.log")
build_rc=$?
summary+=("$build_line")
[ "$build_rc" -eq 0 ] || { tail -n 20 "$OUT/build.log"; finish; exit 1; }

t0=$(date +%s)
mkdir -p "$LOGS" "$OUT/e2e"
# shellcheck disable=SC2086
python3 -m bench.e2e_sglang --log-dir "$LOGS" --out "$OUT/e2e" \
  ${E2E_ARGS:---backends attn_backend flashinfer triton --shapes 64x4096 --engines 1} \
  > "$OUT/e2e_sglang.log" 2>&1
rc=$?
summary+=("e2e_sglang: rc=$rc in $(( $(date +%s) - t0 )) s")
summary+=("$(tail -n 25 "$OUT/e2e_sglang.log")")
# The device brings back at most 8 files: the engines' logs travel as one archive.
tar czf "$OUT/e2e_logs.tgz" -C "$LOGS" . 2>/dev/null
finish
exit $rc
