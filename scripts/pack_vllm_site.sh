#!/usr/bin/env bash
# vLLM's engine in one carry: the three wheel folders of scripts/fetch_vllm_wheels.sh (106 MiB
# of zip-compressed wheels, two carries) repacked by scripts/pack_site.sh (about 58 MiB).
#   bash scripts/pack_vllm_site.sh [.whl_vllm]     # writes .whl_vllm_site/site.tar.xz
#   then carry .whl_vllm_site (not the three wheel folders), with .gpu or .vllm_tests as needed
set -euo pipefail
WHEELS=${1:-.whl_vllm}
exec bash "$(dirname "${BASH_SOURCE[0]}")/pack_site.sh" "${WHEELS}_site" \
  "$WHEELS" "${WHEELS}_dep" "${WHEELS}_fi"
