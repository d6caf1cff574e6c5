#!/usr/bin/env bash
# The test command: sets up the environment, builds the kernels, runs the suite.
# Without a GPU the gpu-marked tests are skipped; with one they run too.
#   bash scripts/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
set +e
# A SWIG-built dependency of sglang warns at interpreter exit, after pytest's
# summary; silence exactly that so the summary stays the last line.
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:builtin type swig:DeprecationWarning"
"$PY" -m pytest -q tests "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; treating that as a failure" >&2
  exit 1
fi
exit "$status"
