#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with pinned torch and build tools, and builds pyssm
# into it (editable, so the tests see pyssm/ and the freshly compiled pyssm/_C).
# Used by the README's two commands (bench/main.sh, tests/run.sh) and by .ci/run.
#
#   PYSSM_VENV     where the environment lives (default .venv in the repository)
#   PYSSM_TORCH    the torch requirement (default torch==2.14.1 torchvision==0.29.1: the CUDA 13.0
#                  build, which also runs on the CPU; timm needs torchvision)
#   PYSSM_EXTRAS   the test, model, VLM and benchmark dependencies (default: pytest, numpy,
#                  timm, safetensors, transformers, tokenizers, tqdm, scikit-learn, matplotlib,
#                  pytest-benchmark, nvidia-ml-py; all pinned)
#   PYSSM_NUMPY    the numpy requirement in that default list (default numpy==2.4.6; Triton 3.6,
#                  the device's, interprets kernels only below 2.4: bench/README.md)
#   PYSSM_CUDA_ARCHS, PYSSM_BUILD_CUDA, MAX_JOBS   passed to the build (see CMakeLists.txt)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PYSSM_VENV:-.venv}
TORCH=${PYSSM_TORCH:-torch==2.14.1 torchvision==0.29.1}
NUMPY=${PYSSM_NUMPY:-numpy==2.4.6}
EXTRAS=${PYSSM_EXTRAS-pytest==9.0.2 $NUMPY timm==1.0.29 safetensors==0.8.0 transformers==5.24.0 tokenizers==0.23.3 tqdm==4.70.1 scikit-learn==1.9.1 matplotlib==3.11.2 pytest-benchmark==5.3.1 nvidia-ml-py==13.615.71}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "[setup] installing $TORCH, the build tools and $EXTRAS into $VENV"
# shellcheck disable=SC2086  # the requirement lists are word lists
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  $TORCH scikit-build-core==0.11.6 ninja==1.13.0 $EXTRAS \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "[setup] building pyssm (MAX_JOBS=$MAX_JOBS; log in build/pip-build.log)"
mkdir -p build
if ! "$VENV/bin/python" -m pip install --no-build-isolation --no-deps --disable-pip-version-check \
    --config-settings=build-dir="build/$(basename "$VENV")" -v -e . > build/pip-build.log 2>&1; then
  tail -40 build/pip-build.log
  echo "[setup] the build failed; the full log is build/pip-build.log" >&2
  exit 1
fi
grep -E "^ *-- pyssm:" build/pip-build.log | sed 's/^ *-- /[setup] /' || true
"$VENV/bin/python" -c "import pyssm; s = pyssm.extension_status(); print('[setup] pyssm._C loaded:', s['loaded'], '| kernels:', ', '.join(s['kernels']))"
