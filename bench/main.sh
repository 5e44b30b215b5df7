#!/usr/bin/env bash
# The main job from a fresh clone: sets up .venv and the build (.ci/setup.sh), then runs
# `pyssm bench all`: kernels, encoders and the VLM on this machine's device, side by side with
# their references and ceilings, a report, plots (about 3 minutes on a 2-core CPU).
# Extra arguments go to `pyssm bench all` (for example: --quick, --device cpu, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
VENV=${PYSSM_VENV:-.venv}
exec "$VENV/bin/python" -m pyssm bench all "$@"
