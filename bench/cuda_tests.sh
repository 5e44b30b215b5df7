#!/usr/bin/env bash
# The CUDA tests (pytest -m cuda), one pytest process per op test file plus one for the rest,
# side by side: one after another they outran the device check's cap on the H200 (the
# attention file alone takes ~160 s, its float64 references mostly). Prints each process's
# summary and a total line; exits non-zero when any process failed.
#   bash bench/cuda_tests.sh [LOG_DIR]
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
LOGS=${1:-build/device-check/logs}
mkdir -p "$LOGS"
pids=() names=()
for f in tests/ops/test_*.py; do
  name=$(basename "$f" .py)
  "$PY" -m pytest "$f" -m cuda -q -p no:cacheprovider -rf > "$LOGS/cuda_$name.log" 2>&1 &
  pids+=($!) names+=("$name")
done
"$PY" -m pytest tests -m cuda -q -p no:cacheprovider -rf --ignore=tests/ops \
  > "$LOGS/cuda_rest.log" 2>&1 &
pids+=($!) names+=(rest)
rc=0 passed=0 failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; r=$?
  line=$(grep -E '[0-9]+ (passed|failed|skipped|deselected|error)|no tests ran' \
         "$LOGS/cuda_${names[$i]}.log" | tail -1)
  echo "${names[$i]}: ${line:-rc $r, no pytest summary}"
  grep -E '^(FAILED|ERROR) ' "$LOGS/cuda_${names[$i]}.log" | head -5
  p=$(grep -oE '[0-9]+ passed' <<< "$line" | cut -d' ' -f1); passed=$(( passed + ${p:-0} ))
  f=$(grep -oE '[0-9]+ failed' <<< "$line" | cut -d' ' -f1); failed=$(( failed + ${f:-0} ))
  case $r in 0|5) ;; *) rc=1 ;; esac
done
echo "$passed passed, $failed failed (all CUDA test processes)"
exit $rc
