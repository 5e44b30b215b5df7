#!/usr/bin/env bash
# The one device check for a GPU machine (torch preinstalled, no internet needed):
#   (a) build pyssm's CUDA kernels for the local GPU arch (pip, editable), logging to a file;
#   (b) run the CUDA tests (pytest -m cuda);
#   (c) run every kernel benchmark on the GPU -> profiles/<gpu-slug>/ and a copy in --out DIR;
#   (d) compute-sanitizer memcheck + racecheck on bench/sanitize_cases.py, if both exist;
#   (e) print a summary table last (also written to <out>/summary.md).
# A failing step never stops the others; each step is timed and capped, and the whole run
# keeps to PYSSM_CHECK_BUDGET_S seconds (default 450).
#
#   bash bench/device_check.sh [--out DIR]        (or PYSSM_PROFILE_DIR=DIR)
# Environment: PYTHON (default python), CUDA_HOME (default /usr/local/cuda), MAX_JOBS (16).
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
EXTRA_OUT=${PYSSM_PROFILE_DIR:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --out) EXTRA_OUT=${2:?--out needs a folder}; shift 2 ;;
    --out=*) EXTRA_OUT=${1#--out=}; shift ;;
    *) echo "usage: $0 [--out DIR]" >&2; exit 2 ;;
  esac
done
BUDGET=${PYSSM_CHECK_BUDGET_S:-450}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
START=$SECONDS
SUMMARY=()

note() { SUMMARY+=("| $1 | $2 | $3 |"); }   # step, result, seconds

# run_step NAME CAP_S LOG CMD...: runs CMD with a timeout of min(CAP_S, time left), output to
# LOG; sets RC (124 when it ran out of time) and TOOK (seconds).
run_step() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$(( BUDGET - (SECONDS - START) ))
  local limit=$(( cap < left ? cap : left ))
  TOOK=0
  if [ "$limit" -lt 15 ]; then
    echo "skipped: the ${BUDGET}s budget is spent" > "$log"; RC=125; return
  fi
  echo "== $name (up to ${limit}s, log $log)"
  local t0=$SECONDS
  timeout --kill-after=15 "$limit" "$@" > "$log" 2>&1
  RC=$?
  TOOK=$(( SECONDS - t0 ))
  echo "   rc=$RC in ${TOOK}s"
}
outcome() { case $RC in 0) echo ok ;; 124|137) echo "timed out" ;; 125) echo skipped ;;
            *) echo "failed (rc $RC)" ;; esac; }

GPU=$($PY -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null || echo none)
ARCH=$($PY -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}{m}" + ("a" if M == 9 else ""))' 2>/dev/null || echo "")
SLUG=$(cd bench && $PY -c 'import harness; print(harness.device_slug())' 2>/dev/null || echo unknown-gpu)
PROFILE_DIR=profiles/$SLUG
LOGS=${EXTRA_OUT:-build/device-check}/logs
mkdir -p "$PROFILE_DIR" "$LOGS"
echo "device check: GPU '$GPU', arch '$ARCH', results in $PROFILE_DIR ${EXTRA_OUT:+and $EXTRA_OUT}"

# (a) build
run_step build 300 "$LOGS/build.log" env PYSSM_CUDA_ARCHS="$ARCH" MAX_JOBS=${MAX_JOBS:-16} \
  "$PY" -m pip install --no-build-isolation --no-deps -v -e .
BUILD=$(outcome)
KERNELS=$($PY -c 'import pyssm; s = pyssm.extension_status(); print(" ".join(k for k in s["kernels"] if k.endswith(":cuda") and "backward" not in k) or "none", "" if s["loaded"] else "(extension not loaded)")' 2>&1 | tail -1)
note build "$BUILD; CUDA kernels: $KERNELS" "$TOOK"

# (b) CUDA tests
run_step tests 150 "$LOGS/tests.log" "$PY" -m pytest tests -m cuda -q -p no:cacheprovider
TESTS=$(grep -E '[0-9]+ (passed|failed|skipped|deselected|error)|no tests ran' "$LOGS/tests.log" | tail -1)
note "tests (-m cuda)" "$(outcome): ${TESTS:-no pytest summary}" "$TOOK"

# (c) benchmarks
for bench in ss2d selective_scan cross_scan attention; do
  run_step "bench_$bench" 100 "$LOGS/bench_$bench.log" \
    "$PY" bench/bench_$bench.py --device cuda --out "$PROFILE_DIR"
  note "bench_$bench" "$(outcome)" "$TOOK"
done
if [ -n "$EXTRA_OUT" ]; then
  mkdir -p "$EXTRA_OUT/$SLUG" && cp "$PROFILE_DIR"/*.json "$PROFILE_DIR"/*.md "$EXTRA_OUT/$SLUG/" 2>/dev/null
fi

# (d) compute-sanitizer on the ops that have CUDA kernels
SANITIZER=$(command -v compute-sanitizer || ls "$CUDA_HOME/bin/compute-sanitizer" 2>/dev/null)
HAS_CUDA=$($PY -c 'from pyssm import _extension as e; print(int(any(e.has_kernel(o, "cuda") for o in ("cross_scan", "cross_merge", "selective_scan", "ss2d", "attention"))))' 2>/dev/null || echo 0)
for tool in memcheck racecheck; do
  if [ -z "$SANITIZER" ]; then note "sanitizer $tool" "skipped: no compute-sanitizer" 0; continue; fi
  if [ "$HAS_CUDA" != 1 ]; then note "sanitizer $tool" "skipped: no CUDA kernels" 0; continue; fi
  run_step "sanitizer $tool" 120 "$LOGS/sanitizer_$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool "$tool" --error-exitcode 99 "$PY" bench/sanitize_cases.py
  if [ $RC = 0 ] && grep -qE 'SUMMARY: .*\b0 errors' "$LOGS/sanitizer_$tool.log"; then
    RESULT=pass
  else
    RESULT="FAIL: $(outcome); $(grep -E 'SUMMARY|FAIL' "$LOGS/sanitizer_$tool.log" | tail -2 | tr '\n' ' ')"
  fi
  note "sanitizer $tool" "$RESULT" "$TOOK"
done

# (e) summary, last
{
  echo "# pyssm device check: $GPU (sm_$ARCH), $(date -u +%FT%TZ), $(git rev-parse --short=12 HEAD 2>/dev/null || echo no-git)"
  echo
  echo "| step | result | s |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo "| total | | $(( SECONDS - START )) |"
  echo
  echo "Key benchmark rows (vs anchor > 1: faster than ANCHORS.md; full tables in $PROFILE_DIR):"
  (cd bench && "$PY" summarize.py "../$PROFILE_DIR" 2>&1)
  echo
  echo "Logs: $LOGS"
} > "$LOGS/../summary.md"
[ -n "$EXTRA_OUT" ] && cp "$LOGS/../summary.md" "$EXTRA_OUT/$SLUG/" 2>/dev/null
cat "$LOGS/../summary.md"
