#!/usr/bin/env bash
# vLLM's engine on the GPU machine with attn_backend (issue 21): installs the carried wheels,
# JIT-builds our kernels, then runs the steps named, each with its log under $OUT, and prints a
# summary last. One call, carry .whl_vllm_site [.vllm_tests] (scripts/pack_vllm_site.sh: the
# engine's wheels unpacked and packed again with xz, ~58 MiB):
#   ATTN_BACKEND_GIT_COMMIT=<sha> bash scripts/gpu_vllm_engine.sh STEP...
# (the machine's copy of the tree has no .git of its own: the commit stamps the results JSON).
# Without the archive the wheel folders of scripts/fetch_vllm_wheels.sh take two calls on a
# warm machine (call 1 carry .gpu .whl_vllm_dep .whl_vllm_fi with no step; call 2 .gpu
# .whl_vllm), and the machine goes cold 30 s after a call, forgetting /tmp.
# Steps (in the order given):
#   smoke  one small engine per setting: CUSTOM with CUDA graphs, CUSTOM eager, TRITON_ATTN;
#          greedy agreement between them (bench/e2e_vllm.py at 8 x 256, 16 output tokens)
#   suite  vLLM's own attention-backend tests against CUSTOM, eager and CUDA graph
#          (scripts/vllm_suite/run.sh; needs .vllm_tests)
#   bench  bench/e2e_vllm.py with E2E_ARGS (default: CUSTOM FLASH_ATTN TRITON_ATTN FLASHINFER at
#          64 x 1024 and 64 x 4096; one that cannot start is noted with its reason); JSON + PNG
#   flashinfer_modules  the FlashInfer kernels a FLASHINFER engine JIT-built here, in parts
#          for the way back (FI_MODULES_OUT), to carry as prebuilt modules later
#   throughput  `vllm bench throughput` (vllm.benchmarks.throughput, as the CLI runs it: the
#          CLI module itself imports vLLM's server stack, absent here) on the same model, random
#          dataset, 64 prompts x 1024 in / 128 out, for each of THROUGHPUT_SETTINGS (default
#          "CUSTOM CUSTOM:eager TRITON_ATTN"; NAME:eager adds --enforce-eager)
# E2E_COMPILE (none | vllm, default none): the compilation mode for smoke and bench; `none`
# keeps FULL decode graphs without Inductor, which vLLM 0.33 (pinned to torch 2.14) may not
# build under the machine's torch 2.11.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# vLLM's PyTorch sampler for every backend: FlashInfer's sampling kernels come without prebuilt
# binaries here and JIT-built for about 2 min in the first engine of each fresh machine (seen
# on the H200), time a device call cannot spare; the sampler is outside attention.
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
COMPILE=${E2E_COMPILE:-none}
summary=()
finish() {
  echo
  echo "==== gpu_vllm_engine summary ===="
  printf '%s\n' "${summary[@]}"
}

if [ $# -eq 0 ]; then
  summary+=("installed; no steps named")
  finish
  exit 0
fi
if ! python3 -c "import vllm, flashinfer" 2>/dev/null; then
  summary+=("vllm or flashinfer not importable: carry .whl_vllm_site (scripts/pack_vllm_site.sh), or on one warm machine .gpu .whl_vllm_dep .whl_vllm_fi, then .gpu .whl_vllm")
  finish
  exit 1
fi
versions=$(python3 -c "
import torch, vllm, flashinfer
print(f'torch {torch.__version__}, vllm {vllm.__version__}, flashinfer {flashinfer.__version__}')
" 2>&1 | tail -n 1)
summary+=("$versions")
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt"

build_line=$(jit_build "$OUT/build.log")
build_rc=$?
summary+=("$build_line")
[ "$build_rc" -eq 0 ] || { tail -n 20 "$OUT/build.log"; finish; exit 1; }

e2e() { # e2e NAME ARGS...: one bench/e2e_vllm.py run, logs in $OUT/NAME, results in $OUT/NAME
  local name=$1; shift
  local t0=$(date +%s)
  python3 -m bench.e2e_vllm --log-dir "$OUT/$name" --out "$OUT/$name" "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$name: rc=$rc in $(( $(date +%s) - t0 )) s")
  summary+=("$(grep -E '^  [A-Z_]+_[0-9x]+: exit|^note:|^b[0-9]+_in[0-9]+' "$OUT/$name.log")")
  return $rc
}

rc=0
for step in "$@"; do
  case "$step" in
    smoke)
      smoke_args=(--backends CUSTOM TRITON_ATTN --shapes 8x256 --output-len 16 --repeats 1
                  --agreement-prompts 8 --compile "$COMPILE" --timeout 300)
      if ! e2e smoke_graphs "${smoke_args[@]}"; then
        # vLLM 0.33's default model runner (V2) stopped in its warm-up on the H200 for CUSTOM
        # and TRITON_ATTN alike (dummy requests longer than the block table, before
        # e2e_vllm capped max_num_batched_tokens); where it still fails, try the V1 runner and
        # keep it for the later steps if it works.
        if [ -z "${VLLM_USE_V2_MODEL_RUNNER:-}" ] && \
           VLLM_USE_V2_MODEL_RUNNER=0 e2e smoke_graphs_v1_runner "${smoke_args[@]}"; then
          export VLLM_USE_V2_MODEL_RUNNER=0
          summary+=("the V1 model runner worked where the default did not: kept for the rest")
        else
          rc=1
        fi
      fi
      e2e smoke_eager --backends CUSTOM --shapes 8x256 --output-len 16 --repeats 1 \
        --agreement-prompts 8 --enforce-eager --timeout 300 || rc=1 ;;
    suite)
      t0=$(date +%s)
      OUT=$OUT bash scripts/vllm_suite/run.sh .vllm_tests > "$OUT/vllm_suite.log" 2>&1 || rc=1
      summary+=("vllm suite in $(( $(date +%s) - t0 )) s: $(grep '^vllm suite' "$OUT/vllm_suite.log" | tr '\n' ' ')") ;;
    bench)
      # shellcheck disable=SC2086
      e2e bench ${E2E_ARGS:---backends CUSTOM FLASH_ATTN TRITON_ATTN FLASHINFER --shapes 64x1024 64x4096} \
        --compile "$COMPILE" || rc=1 ;;
    throughput)
      model=$(python3 -c "
from bench.e2e_sglang import write_model_dir; from bench.e2e_vllm import default_model_dir
print(write_model_dir(default_model_dir()))")
      compile_json=$(python3 -c "
import json, sys; from bench.e2e_vllm import compilation_config
print(json.dumps(compilation_config(sys.argv[1])))" "$COMPILE")
      # NAME or NAME:eager (--enforce-eager, no CUDA graphs)
      for setting in ${THROUGHPUT_SETTINGS:-CUSTOM CUSTOM:eager TRITON_ATTN}; do
        backend=${setting%%:*}; eager=(); label=$backend
        [ "$setting" != "${setting%:eager}" ] && { eager=(--enforce-eager); label=${backend}_eager; }
        t0=$(date +%s)
        VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 -c "
import sys
from vllm.benchmarks.throughput import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))
" --model "$model" --load-format dummy --dataset-name random --random-input-len 1024 \
          --random-output-len 128 --num-prompts 64 --max-model-len 1200 --seed 0 \
          --gpu-memory-utilization 0.6 --attention-backend "$backend" "${eager[@]}" \
          --compilation-config "$compile_json" --output-json "$OUT/throughput_$label.json" \
          > "$OUT/throughput_$label.log" 2>&1 || rc=1
        summary+=("vllm bench throughput $label (in $(( $(date +%s) - t0 )) s): $(grep '^Throughput' "$OUT/throughput_$label.log" || tail -n 1 "$OUT/throughput_$label.log")")
      done ;;
    flashinfer_modules)
      # The FlashInfer kernels a FLASHINFER engine JIT-built on this machine (minutes at start-up,
      # no prebuilt ones in a carry), in parts of at most 15 MiB (the device tool brings back
      # files of up to 16 MiB) written to FI_MODULES_OUT (default $OUT/flashinfer_modules; give
      # the device tool's own $OUT so the parts come back). FlashInfer 0.7 loads a module from
      # flashinfer/data/aot/<name>/<name>.so without building it (jit/env.py get_aot_artifacts).
      dest=${FI_MODULES_OUT:-$OUT/flashinfer_modules}
      mkdir -p "$dest"
      modules=$(find "${FLASHINFER_WORKSPACE_BASE:-$HOME}/.cache/flashinfer" -path '*cached_ops*' \
                -name '*.so' 2>/dev/null)
      if [ -z "$modules" ]; then
        summary+=("flashinfer_modules: none built on this machine")
      else
        # shellcheck disable=SC2086
        tar czf - $modules 2>/dev/null | split -b 15M -d - "$dest/flashinfer_modules.tgz.part"
        summary+=("flashinfer_modules: $(echo "$modules" | wc -l) modules ($(echo "$modules" | xargs -n1 basename | tr '\n' ' ')) in $(ls "$dest" | wc -l) parts in $dest")
      fi ;;
    *) echo "gpu_vllm_engine.sh: unknown step $step" >&2; exit 2 ;;
  esac
done
finish
exit "$rc"
