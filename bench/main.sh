#!/usr/bin/env bash
# The main job from a fresh clone: sets up .venv and the build (.ci/setup.sh), then measures
# cost versus resolution for ss2d and attention on this machine's device (bench/run.py).
# Extra arguments go to bench/run.py (for example: --quick, --device cpu, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
VENV=${PYSSM_VENV:-.venv}
exec "$VENV/bin/python" bench/run.py "$@"
