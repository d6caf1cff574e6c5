#!/usr/bin/env bash
# The main job: the benchmark suite on a GPU (JSON + PNG into bench/results/).
#   bash scripts/bench.sh [--out DIR] [--only decode,...]
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
   && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "bench.sh: the benchmark suite needs a CUDA GPU and none was found on this machine." >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m bench.run_all "$@"
