#!/usr/bin/env bash
# The test suite from a fresh clone: sets up .venv and the build (.ci/setup.sh), then runs pytest.
# Extra arguments go to pytest (for example: bash tests/run.sh -m "not slow" -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
VENV=${PYSSM_VENV:-.venv}
set +e
"$VENV/bin/python" -m pytest -q "$@"   # no paths: pyproject testpaths (tests/)
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$rc"
