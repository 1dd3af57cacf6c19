#!/usr/bin/env bash
# Set up, then run the whole test suite, slow tests included (what CI runs; pass
# `-m "not slow"` for a quicker local run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,bench
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider -m "slow or not slow" "$@"
