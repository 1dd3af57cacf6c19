#!/usr/bin/env bash
# Install ray-collectors and its test tools into the current Python. Torch first, pinned to the
# CPU build that lies on this kind of machine, so the project's torch range needs nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-test}
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -e ".[${extras}]"
