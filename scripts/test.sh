#!/usr/bin/env bash
# Set up, then run the test suite (slow tests excluded; add `-m slow` to run those).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,bench
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
