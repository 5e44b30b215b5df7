#!/usr/bin/env bash
# The one device check for a GPU machine (torch preinstalled, no internet needed):
#   (a) build pyssm's CUDA kernels for the local GPU arch (pip, editable), logging to a file;
#   (a2) the Hopper attention kernels once, alone (bench/hopper_smoke.py), with a short limit;
#   (a3) the Triton kernels once likewise (bench/triton_smoke.py);
#   (a4) the ss2d d_state-1 kernels once likewise (bench/ss2d_smoke.py);
#   (b) run the CUDA tests (pytest -m cuda, a process per op test file: bench/cuda_tests.sh);
#   (c) compute-sanitizer memcheck + racecheck on bench/sanitize_cases.py, if both exist
#       (before the benchmarks, so that a long benchmark cannot crowd them out);
#   (d) `pyssm bench all` on the GPU (kernels, encoders, VLM, report, plots) ->
#       profiles/<gpu-slug>/ and a copy in --out DIR;
#   (e) Nsight Compute (ncu) on the hot kernels at their benchmark shapes, if time is left;
#   (f) print a summary table last (also in <out>/summary.md and profiles/<gpu-slug>/).
# A failing step never stops the others; each step is timed and capped, and the whole run
# keeps to PYSSM_CHECK_BUDGET_S seconds (default 540).
#
#   bash bench/device_check.sh [--out DIR]        (or PYSSM_PROFILE_DIR=DIR)
# Environment: PYTHON (default python), CUDA_HOME (default /usr/local/cuda), MAX_JOBS (16).
set -u
PY=${PYTHON:-python}
EXTRA_OUT=${PYSSM_PROFILE_DIR:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --out) EXTRA_OUT=${2:?--out needs a folder}; shift 2 ;;
    --out=*) EXTRA_OUT=${1#--out=}; shift ;;
    *) echo "usage: $0 [--out DIR]" >&2; exit 2 ;;
  esac
done
if [ -n "$EXTRA_OUT" ]; then
  EXTRA_OUT=$(mkdir -p "$EXTRA_OUT" && cd "$EXTRA_OUT" && pwd) || exit 2
fi
cd "$(dirname "$0")/.." || exit 2
BUDGET=${PYSSM_CHECK_BUDGET_S:-540}
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
# outcome LOG: ok / timed out / skipped / failed, with the log's last line when it failed
outcome() {
  case $RC in
    0) echo ok ;;
    124|137) echo "timed out" ;;
    125) echo "skipped (time budget spent)" ;;
    *) echo "failed (rc $RC): $(tail -1 "$1" | cut -c1-100)" ;;
  esac
}

# the GPU's name, its arch for the build (9.0 -> 90a) and its folder name (nvidia-h200)
PROBE='import torch, re
M, m = torch.cuda.get_device_capability()
name = torch.cuda.get_device_name(0)
print(name, f"{M}{m}" + ("a" if M == 9 else ""),
      re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), sep="\n")'
{ read -r GPU; read -r ARCH; read -r SLUG; } < <($PY -c "$PROBE" 2>/dev/null)
GPU=${GPU:-none} ARCH=${ARCH:-} SLUG=${SLUG:-unknown-gpu}
PROFILE_DIR=profiles/$SLUG
[ "$GPU" = none ] && PROFILE_DIR=build/device-check/no-gpu  # a dry run: keep profiles/ clean
LOGS=build/device-check/logs   # tarred into --out at the end (a device run returns 8 files)
rm -rf "$LOGS"; mkdir -p "$PROFILE_DIR" "$LOGS"
echo "device check: GPU '$GPU', arch '$ARCH', results in $PROFILE_DIR ${EXTRA_OUT:+and $EXTRA_OUT}"

# (a) build
run_step build 300 "$LOGS/build.log" env PYSSM_CUDA_ARCHS="$ARCH" MAX_JOBS=${MAX_JOBS:-16} \
  "$PY" -m pip install --no-build-isolation --no-deps -v -e .
BUILD=$(outcome "$LOGS/build.log")
KERNELS=$($PY bench/sanitize_cases.py --list 2>&1 | tail -1)   # the ops with a CUDA kernel
note build "$BUILD; CUDA kernels: $KERNELS" "$TOOK"

# smoke NAME SWITCH SCRIPT: kernels that have never run on a GPU, once, alone, under a short
# limit, so that a hang or fault costs one short step; if SCRIPT fails, SWITCH=0 is exported
# and every later step runs without those kernels
smoke() {
  local name=$1 switch=$2 script=$3 log="$LOGS/${1// /_}.log"
  run_step "$name" 60 "$log" "$PY" "$script"
  if [ $RC = 0 ]; then
    note "$name" "$(tail -1 "$log")" "$TOOK"
  else
    export "$switch=0"
    note "$name" "FAILED: $(outcome "$log"); later steps run with $switch=0" "$TOOK"
  fi
}
# (a2) the Hopper attention kernels (every later step takes them on an sm_90 GPU; without
# them the tests' sm90 variants skip) and (a3) the Triton kernels (layer_norm,
# depthwise_conv2d, linear_gelu, linear_residual_, mlp_gelu, mlp_residual_, norm_mlp_residual
# and layer_norm_linear, which the encoders take; without them torch's own ops run)
smoke "hopper smoke" PYSSM_FLASH_SM90 bench/hopper_smoke.py
# the Hopper backward's dQ by TMA reduce-adds (v2, the default) is the newest part: when the
# smoke failed, once more with v1's atomics, which keep the Hopper path if they pass
if [ "${PYSSM_FLASH_SM90:-}" = 0 ] && [ -z "${PYSSM_FLASH_SM90_DQ:-}" ]; then
  unset PYSSM_FLASH_SM90
  export PYSSM_FLASH_SM90_DQ=atomic
  smoke "hopper smoke, dQ atomics" PYSSM_FLASH_SM90 bench/hopper_smoke.py
  [ "${PYSSM_FLASH_SM90:-}" = 0 ] && unset PYSSM_FLASH_SM90_DQ
fi
# (a2') the flash-decoding attention kernel (every later step gives it the forwards with few
# queries a group of heads)
smoke "decode smoke" PYSSM_FLASH_DECODE bench/decode_smoke.py
# (exit status bits: 1 layer_norm / depthwise_conv2d, 2 linear_gelu, 4 linear_residual_,
# 8 mlp_gelu, 16 mlp_residual_ or norm_mlp_residual, 32 layer_norm_linear; over 63, a timeout
# or crash: all six)
# turns off for the later steps all the Triton kernels (PYSSM_TRITON=0), the MLPs' fused
# fc1 + GELU (PYSSM_LINEAR_GELU=0), fused fc2 + residual add (PYSSM_LINEAR_RESIDUAL=0), fused
# training MLP (PYSSM_MLP_GELU=0), whole inference MLP, alone or with its norm
# (PYSSM_MLP_RESIDUAL=0), or VMamba's norms fused into its projections (PYSSM_NORM_LINEAR=0)
run_step "triton smoke" 60 "$LOGS/triton_smoke.log" "$PY" bench/triton_smoke.py
if [ $RC = 0 ]; then
  note "triton smoke" "$(tail -1 "$LOGS/triton_smoke.log")" "$TOOK"
elif [ $RC -le 63 ]; then
  [ $((RC & 1)) != 0 ] && export PYSSM_TRITON=0
  [ $((RC & 2)) != 0 ] && export PYSSM_LINEAR_GELU=0
  [ $((RC & 4)) != 0 ] && export PYSSM_LINEAR_RESIDUAL=0
  [ $((RC & 8)) != 0 ] && export PYSSM_MLP_GELU=0
  [ $((RC & 16)) != 0 ] && export PYSSM_MLP_RESIDUAL=0
  [ $((RC & 32)) != 0 ] && export PYSSM_NORM_LINEAR=0
else
  export PYSSM_TRITON=0 PYSSM_LINEAR_GELU=0 PYSSM_LINEAR_RESIDUAL=0 PYSSM_MLP_GELU=0 \
    PYSSM_MLP_RESIDUAL=0 PYSSM_NORM_LINEAR=0
fi
[ $RC != 0 ] && note "triton smoke" "FAILED: $(outcome "$LOGS/triton_smoke.log"); later steps \
run with PYSSM_TRITON=${PYSSM_TRITON:-on} PYSSM_LINEAR_GELU=${PYSSM_LINEAR_GELU:-on} \
PYSSM_LINEAR_RESIDUAL=${PYSSM_LINEAR_RESIDUAL:-on} PYSSM_MLP_GELU=${PYSSM_MLP_GELU:-on} \
PYSSM_MLP_RESIDUAL=${PYSSM_MLP_RESIDUAL:-on} PYSSM_NORM_LINEAR=${PYSSM_NORM_LINEAR:-on}" "$TOOK"
# (a4) the ss2d d_state-1 kernels (v3) and the x_proj kernel, which every later step takes at
# VMamba's shapes: what fails (exit status bits: 1 the forward, 2 the backward, 4 x_proj, 8 the
# backward from the forward's states; over 15 a crash: all four) falls back for the later steps
# to v2's forward (PYSSM_SS2D_FWD=v2), v1's backward (PYSSM_SS2D_BWD=v1), the GEMMs
# (PYSSM_SS2D_XPROJ=gemm) or the summary pass (PYSSM_SS2D_STATES=0)
run_step "ss2d smoke" 90 "$LOGS/ss2d_smoke.log" "$PY" bench/ss2d_smoke.py
if [ $RC = 0 ]; then
  note "ss2d smoke" "$(tail -1 "$LOGS/ss2d_smoke.log")" "$TOOK"
elif [ $RC -le 15 ]; then
  [ $((RC & 1)) != 0 ] && export PYSSM_SS2D_FWD=v2
  [ $((RC & 2)) != 0 ] && export PYSSM_SS2D_BWD=v1
  [ $((RC & 4)) != 0 ] && export PYSSM_SS2D_XPROJ=gemm
  [ $((RC & 8)) != 0 ] && export PYSSM_SS2D_STATES=0
else
  export PYSSM_SS2D_FWD=v2 PYSSM_SS2D_BWD=v1 PYSSM_SS2D_XPROJ=gemm PYSSM_SS2D_STATES=0
fi
[ $RC != 0 ] && note "ss2d smoke" "FAILED: $(outcome "$LOGS/ss2d_smoke.log"); later steps run \
with PYSSM_SS2D_FWD=${PYSSM_SS2D_FWD:-v3} PYSSM_SS2D_BWD=${PYSSM_SS2D_BWD:-v3} \
PYSSM_SS2D_XPROJ=${PYSSM_SS2D_XPROJ:-kernel} PYSSM_SS2D_STATES=${PYSSM_SS2D_STATES:-on}" "$TOOK"

# (b) CUDA tests, one process per op test file, side by side (bench/cuda_tests.sh)
run_step tests 240 "$LOGS/tests.log" bash bench/cuda_tests.sh "$LOGS"
TESTS=$(tail -1 "$LOGS/tests.log")
case $RC in  # 0 all passed, 1 some failed
  0|1) note "tests (-m cuda)" "${TESTS:-rc $RC, no summary}" "$TOOK" ;;
  *) note "tests (-m cuda)" "$(outcome "$LOGS/tests.log")" "$TOOK" ;;
esac

# (c) compute-sanitizer on the ops that have CUDA kernels
SANITIZER=$(command -v compute-sanitizer || ls "$CUDA_HOME/bin/compute-sanitizer" 2>/dev/null)
for tool in memcheck racecheck; do
  if [ -z "$SANITIZER" ]; then
    note "sanitizer $tool" "skipped: no compute-sanitizer" 0; continue
  fi
  if ! [[ $KERNELS =~ ^(cross_scan|cross_merge|selective_scan|ss2d|attention)( |$) ]]; then
    note "sanitizer $tool" "skipped: no CUDA kernels" 0; continue
  fi
  run_step "sanitizer $tool" 120 "$LOGS/sanitizer_$tool.log" \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 99 \
    "$PY" bench/sanitize_cases.py
  if [ $RC = 0 ] && grep -qE 'SUMMARY: .*\b0 errors' "$LOGS/sanitizer_$tool.log"; then
    RESULT=pass
  elif [ $RC = 125 ]; then
    RESULT=$(outcome "$LOGS/sanitizer_$tool.log")
  else
    RESULT="FAIL: $(outcome "$LOGS/sanitizer_$tool.log");"
    RESULT+=" $(grep -E 'SUMMARY|FAIL' "$LOGS/sanitizer_$tool.log" | tail -2 | tr '\n' ' ')"
  fi
  note "sanitizer $tool" "$RESULT" "$TOOK"
done

# (d) benchmarks: the main job on the GPU, its tables printed last by pyssm bench all
BENCH_ARGS=${PYSSM_BENCH_ARGS:---quick}   # the full sweep: PYSSM_BENCH_ARGS=" " (about 6 min)
run_step "bench all" 330 "$LOGS/bench_all.log" \
  env PYSSM_UNVERIFIED_CUDA=1 "$PY" -m pyssm bench all --device cuda --no-progress \
  --out "$PROFILE_DIR" $BENCH_ARGS
note "bench all $BENCH_ARGS" "$(outcome "$LOGS/bench_all.log")" "$TOOK"

# (e) Nsight Compute on the hot kernels (bench/ncu_cases.py), when ncu is there and time is left:
# duration, throughput against the roofline, occupancy and warp stalls per kernel
NCU=$(command -v ncu || ls "$CUDA_HOME/bin/ncu" 2>/dev/null)
if [ -z "$NCU" ]; then
  note ncu "skipped: no ncu" 0
else
  run_step ncu 90 "$LOGS/ncu.log" "$NCU" --clock-control none --section SpeedOfLight \
    --section Occupancy --section WarpStateStats \
    -k 'regex:ss2d|xproj|n1_kernel|summary_kernel|main_kernel|flash|selective_scan' --launch-count 28 \
    "$PY" bench/ncu_cases.py
  note ncu "$(outcome "$LOGS/ncu.log") (logs/ncu.log)" "$TOOK"
fi

# (f) summary, last
{
  SHA=$(git rev-parse --short=12 HEAD 2>/dev/null || echo no-git)
  echo "# pyssm device check: $GPU (sm_$ARCH), $(date -u +%FT%TZ), $SHA"
  echo
  echo "| step | result | s |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo "| total | | $(( SECONDS - START )) |"
  echo
  if [ -s "$LOGS/ncu.log" ]; then
    echo "Nsight Compute (duration, SM / memory throughput, achieved occupancy per kernel):"
    grep -E '^  [a-z_].*\(|Duration|Compute \(SM\) Throughput|^    Memory Throughput|Achieved Occupancy' \
      "$LOGS/ncu.log" | head -n 60
    echo
  fi
  echo "Key benchmark rows (vs anchor > 1: faster than ANCHORS.md; report.md and full tables"
  echo "in $PROFILE_DIR):"
  sed -n '/^| op | provider/,$p' "$LOGS/bench_all.log" 2>/dev/null | tail -n 80
  echo
  echo "Logs: $LOGS"
} > "$LOGS/../summary.md"
cp "$LOGS/../summary.md" "$PROFILE_DIR/device_check.md"
if [ -n "$EXTRA_OUT" ]; then  # three files: the summary, the results folder, the logs
  cp "$LOGS/../summary.md" "$EXTRA_OUT/"
  tar czf "$EXTRA_OUT/$SLUG.tgz" -C "$PROFILE_DIR" .
  tar czf "$EXTRA_OUT/logs.tgz" -C "$LOGS" .
fi
cat "$LOGS/../summary.md"
