#!/usr/bin/env bash
# Set up, then run the main job: a short collection on the local default config.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m collectors run "${1:-configs/cartpole.yaml}" "${@:2}"
