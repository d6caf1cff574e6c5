#!/usr/bin/env bash
# The kernel benchmarks' FlashInfer peers once more with a second FlashInfer release (issue 20:
# the newest that runs on the GPU machine beside 0.6.15.post1), in the same call as the main
# run, and the second release's peers merged into the main results (bench/merge_peers.py), named
# with its version (flashinfer_fa2_0.7.4). Carry .gpu .whl_fi .fi_peer (scripts/fetch_flashinfer_peer.sh):
#   ATTN_BACKEND_GIT_COMMIT=<sha> bash scripts/gpu_check.sh --bench-only --only decode,prefill; \
#   MAIN_DIR=$OUT bash scripts/gpu_flashinfer_peer.sh --only decode,prefill
# The second release goes into a site of its own, first on PYTHONPATH for these runs only, with
# its own JIT cache; our rows of these runs are not kept (the main run's are the result).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" || exit 1
only=decode,prefill
while [ $# -gt 0 ]; do
  case "$1" in
    --only) only=$2; shift ;;
    *) echo "gpu_flashinfer_peer.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ -f .fi_peer/VERSION ] || { echo "gpu_flashinfer_peer.sh: carry .fi_peer (scripts/fetch_flashinfer_peer.sh)" >&2; exit 1; }
version=$(cat .fi_peer/VERSION)
PEER_SITE=/tmp/fi_peer_$version
if [ ! -d "$PEER_SITE/flashinfer" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$PEER_SITE" .fi_peer/*.whl \
    > "$OUT/fi_peer_install.log" 2>&1 || { cat "$OUT/fi_peer_install.log"; exit 1; }
fi
got=$(PYTHONPATH=$PEER_SITE:$PYTHONPATH python3 -c "import flashinfer; print(flashinfer.__version__)" 2>&1 | tail -n 1)
echo "flashinfer peer: $got (from $PEER_SITE)"
t0=$(date +%s)
PYTHONPATH=$PEER_SITE:$PYTHONPATH FLASHINFER_WORKSPACE_BASE=/tmp/fi_peer_workspace_$version \
  ATTN_BACKEND_BENCH_PEERS=flashinfer ATTN_BACKEND_BENCH_FLASHINFER_LABEL=$version \
  ATTN_BACKEND_BENCH_COMMAND="bash scripts/gpu_flashinfer_peer.sh (FlashInfer $version)" \
  python3 -m bench.run_all --only "$only" --out "$OUT/fi_peer" > "$OUT/fi_peer_bench.log" 2>&1
rc=$?
echo "flashinfer $version peers: rc=$rc in $(( $(date +%s) - t0 )) s"
if [ -n "${MAIN_DIR:-}" ]; then
  for extra in "$OUT"/fi_peer/*.json; do
    [ -f "$extra" ] || continue
    name=$(basename "$extra")
    if [ -f "$MAIN_DIR/$name" ]; then
      python3 -m bench.merge_peers "$MAIN_DIR/$name" "$extra" --out "$OUT/merged/$name"
    fi
  done
fi
tail -n 40 "$OUT/fi_peer_bench.log"
exit $rc
