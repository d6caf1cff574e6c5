# Sourced by the GPU machine's runners (gpu_check.sh, gpu_vllm_engine.sh), from the checkout:
# the toolchain and cache settings, the wheels that came along installed, and the checkout's
# plugin entry points declared.
#   source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" || exit 1
# Sets ROOT (the checkout, also the working directory), OUT (default /tmp/attn_backend_out)
# and SITE (where the wheels go, default /tmp/site; first on PYTHONPATH).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || return 1
OUT=${OUT:-/tmp/attn_backend_out}
mkdir -p "$OUT"
export PATH=/usr/local/cuda/bin:$PATH CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export ATTN_BACKEND_CACHE_DIR=${ATTN_BACKEND_CACHE_DIR:-/tmp/attn_backend_cache}
# Peers and engines travel as wheels in .whl_* folders (.gpu/README.md; vLLM's in two calls:
# scripts/fetch_vllm_wheels.sh); each call installs what it brought.
if ls .whl_*/*.whl >/dev/null 2>&1 && [ -f .gpu/install_wheels.sh ]; then
  source .gpu/install_wheels.sh .whl_*/*.whl || return 1
fi
# Engines packed into one archive each (scripts/pack_site.sh: .whl_vllm_site, .whl_sglang_site),
# each unpacked once per machine.
SITE=${SITE:-/tmp/site}
for archive in .whl_*_site/site.tar.xz; do
  [ -f "$archive" ] || continue
  marker="$SITE/.installed/$(dirname "$archive").tar.xz"
  [ -e "$marker" ] && continue
  t0_site=$(date +%s)
  mkdir -p "$SITE/.installed"
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='tar')" \
    "$archive" "$SITE" || return 1
  touch "$marker"
  echo "gpu_env: unpacked $archive into $SITE in $(( $(date +%s) - t0_site )) s"
done
# FlashInfer kernels built on an earlier machine (gpu_vllm_engine.sh flashinfer_modules, its
# parts copied into .whl_fi_modules): placed where FlashInfer 0.7 loads a prebuilt module
# without building it (flashinfer/data/aot/<name>/<name>.so), so a FLASHINFER engine starts
# without minutes of JIT.
if ls .whl_fi_modules/flashinfer_modules.tgz.part* >/dev/null 2>&1 && [ -d "$SITE/flashinfer" ]; then
  fi_tmp=$(mktemp -d)
  cat .whl_fi_modules/flashinfer_modules.tgz.part* | tar xzf - -C "$fi_tmp" || return 1
  while IFS= read -r so; do
    name=$(basename "$so" .so)
    mkdir -p "$SITE/flashinfer/data/aot/$name"
    cp "$so" "$SITE/flashinfer/data/aot/$name/$name.so"
  done < <(find "$fi_tmp" -path '*cached_ops*' -name '*.so')
  echo "gpu_env: $(ls "$SITE/flashinfer/data/aot" | wc -l) prebuilt FlashInfer modules in $SITE/flashinfer/data/aot"
  rm -rf "$fi_tmp"
fi
# The checkout runs uninstalled: declare its plugin entry points where the wheels went, so the
# engines' plugin loading (in every process they start) finds them.
python3 scripts/declare_entry_points.py "$SITE" >/dev/null && \
  case ":$PYTHONPATH:" in *":$SITE:"*) ;; *) export PYTHONPATH=$SITE:$PYTHONPATH ;; esac
# JIT-builds (or loads) our extension as a user's first call would, its log in $1; prints the
# summary line "build (JIT): rc=N in S s" and returns the build's status.
jit_build() {
  local log=$1 t0 rc
  t0=$(date +%s)
  python3 -c "
from attn_backend import _extension; _extension.load_ops(); print('loaded', _extension.loaded_library())
" > "$log" 2>&1
  rc=$?
  echo "build (JIT): rc=$rc in $(( $(date +%s) - t0 )) s"
  return $rc
}
