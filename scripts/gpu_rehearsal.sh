#!/usr/bin/env bash
# Rehearse the GPU run on this CPU machine with the GPU machine's versions, before spending its
# minutes: Python 3.12, torch 2.11.0 and Triton 3.6.0 (the image the device README describes, with
# no network there). Under 30 minutes on a 2-core machine once the side environment exists.
#
#   1. env      a side venv ($REHEARSAL_DIR/venv312, default ~/.cache/dgk-rehearsal) with python3.12
#               (pyenv's or the PATH's; 3.11 when no 3.12 exists, said in the summary), torch 2.11.0,
#               triton 3.6.0 and the packages the image has that the tests and the carried wheels use
#               (pip only installs what is missing: a second run reuses it)
#   2. wheels   the wheels of scripts/gpu_carry_wheels.txt downloaded into a local folder
#               ($REHEARSAL_DIR/whl), then installed from it with --no-index --no-deps into a fresh
#               --target folder (as on the GPU machine) and imported with the device's torch/Triton
#   3. install  the project into the venv (pip install --no-build-isolation -e .): the C++ extension
#               is built for the CPU here (DGKERNELS_BUILD_CUDA=0; nvcc and a GPU are the GPU run's),
#               against torch 2.11's headers, or reused when no C++ source is newer than it
#   4. report   the sm_90 compile and resource report of every Triton launch configuration with
#               Triton 3.6's compiler and ptxas: benchmarks/results/triton_sm90_resources_triton36.md;
#               fails on a compile failure, a spill or a half-precision GEMM without wgmma
#   5. tests    the Triton value and gradient tests under TRITON_INTERPRET=1 with these versions
#   6. dry      scripts/gpu_check.sh --dry with the venv's python (every step, tiny sizes, the
#               benchmark table's skeleton in $REHEARSAL_DIR/logs/gpu_dry.md)
# Usage: scripts/gpu_rehearsal.sh [--skip-report] [--skip-tests]. Each step's log is in
# $REHEARSAL_DIR/logs/<step>.log and its result and time one line of $REHEARSAL_DIR/logs/summary.md;
# the exit status is the first failing step's. Run it under `nice` on a shared machine.
# shellcheck disable=SC2329  # the step functions are called through step()
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

DO_REPORT=1 DO_TESTS=1
for arg in "$@"; do
  case "$arg" in
    --skip-report) DO_REPORT=0 ;;
    --skip-tests) DO_TESTS=0 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {print}' "$0"; exit 0 ;;
    *) echo "gpu_rehearsal: unknown argument $arg" >&2; exit 2 ;;
  esac
done

TORCH_VERSION=2.11.0
TRITON_VERSION=3.6.0
R="${REHEARSAL_DIR:-$HOME/.cache/dgk-rehearsal}"
LOGS="$R/logs"
mkdir -p "$LOGS"
START=$(date +%s)
STATUS=0

say() { echo "[gpu_rehearsal $(($(date +%s) - START))s] $*"; }

step() {  # step NAME CMD...: run, log, one summary line
  local name="$1"
  shift
  local t0 rc=0
  t0=$(date +%s)
  say "$name ..."
  "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  local verdict="ok"
  [ "$rc" = 0 ] || verdict="FAILED (exit $rc)"
  tail -n 12 "$LOGS/$name.log"
  say "$name: $verdict"
  echo "| $name | $verdict | $(($(date +%s) - t0)) s | $name.log |" >>"$LOGS/summary.md"
  if [ "$rc" != 0 ] && [ "$STATUS" = 0 ]; then STATUS=$rc; fi
  return "$rc"
}

# ---- 1. the side environment ----------------------------------------------------------------
PYBASE=""
for cand in "$(command -v pyenv >/dev/null 2>&1 && pyenv root)/versions/"3.12*/bin/python3.12 \
    "$(command -v python3.12 || true)"; do
  if [ -x "$cand" ] && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    PYBASE="$cand"
    break
  fi
done
PYNOTE="Python 3.12 as on the GPU machine"
if [ -z "$PYBASE" ]; then
  PYBASE="$(command -v python3.11 || command -v python3)"
  PYNOTE="NO Python 3.12 here: $("$PYBASE" --version 2>&1) instead (the GPU machine has 3.12)"
fi
VENV="$R/venv$("$PYBASE" -c 'import sys; print(*sys.version_info[:2], sep="")')"
PY="$VENV/bin/python"
{
  echo "# gpu_rehearsal $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "$PYNOTE ($PYBASE); torch $TORCH_VERSION, triton $TRITON_VERSION"
  echo
  echo "| step | result | time | log |"
  echo "|---|---|---|---|"
} >"$LOGS/summary.md"

env_setup() {
  [ -x "$PY" ] || "$PYBASE" -m venv "$VENV" || return 1
  # What the GPU machine's image has and the tests or the carried wheels import (versions as read
  # there where known), plus the extension's build tools.
  # numpy below 2.4: Triton 3.6's interpreter converts one-element arrays with int(), which numpy
  # 2.4 and 2.5 refuse (the GPU machine's numpy 2.5.2 never meets the interpreter: kernels compile).
  "$PY" -m pip install -q "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" "torchvision==0.26.0" "numpy<2.4" pytest \
    pytest-timeout einops timm "huggingface_hub==1.33.0" "safetensors==0.8.0" regex tqdm pillow \
    setuptools wheel ninja pybind11 || return 1
  "$PY" -c "import sys, torch, triton
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)
assert torch.__version__.split('+')[0] == '$TORCH_VERSION' and triton.__version__ == '$TRITON_VERSION'"
}
step env env_setup || { say "no side environment: stopping"; exit 1; }

# ---- 2. the carried wheels, offline ---------------------------------------------------------
SITE="$R/site"
wheels() {
  rm -rf "$R/whl" "$SITE"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$R/whl" -r scripts/gpu_carry_wheels.txt || return 1
  ls -la "$R/whl"
  # the device's install line, with no index at all
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS="" "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" "$R"/whl/*.whl || return 1
  PYTHONPATH="$SITE" "$PY" -c "
import importlib
for m in ('open_clip', 'ftfy', 'wcwidth', 'inf_cl', 'liger_kernel', 'info_nce'):
    importlib.import_module(m)
    print('imports:', m)
from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
import open_clip
print('open_clip', open_clip.__version__, 'ViT-B-16 config:', 'ViT-B-16' in open_clip.list_models())"
}
step wheels wheels

# ---- 3. the project, CPU extension built against torch 2.11 ---------------------------------
install() {
  # The extension built by an earlier rehearsal is reused while no C++ source is newer than it (a
  # CPU build takes 5-10 minutes on 2 cores); the package is (re)installed either way.
  local so="" skip=0 f tag
  tag=$("$PY" -c 'import sys; print(*sys.version_info[:2], sep="")')
  for f in dgkernels/_C.cpython-"$tag"-*.so; do [ -f "$f" ] && so="$f"; done
  if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -print -quit)" ]; then
    echo "reusing $so (no C++ source is newer)"
    skip=1
  fi
  env DGKERNELS_BUILD_CUDA=0 DGKERNELS_SKIP_EXTENSION="$skip" MAX_JOBS="${MAX_JOBS:-2}" \
    "$PY" -m pip install --no-deps --no-build-isolation -e "$ROOT" || return 1
  "$PY" -c "import dgkernels; print({k: v.available for k, v in dgkernels.backends().items()})"
}
step install install

export PYTHONPATH="$ROOT:$SITE"

# ---- 4. sm_90 compile and resource report under Triton 3.6 ----------------------------------
REPORT_MD="benchmarks/results/triton_sm90_resources_triton36.md"  # relative: its header shows the command
report() {
  env -u TRITON_INTERPRET "$PY" tools/triton_resources.py --report --cc 90 --workers 2 --markdown "$REPORT_MD" \
    >/dev/null || return 1
  grep -m1 '^\*\*sm_90' "$REPORT_MD"
  grep -q '0 fail to compile or exceed shared memory; 0 spill; 0 half-precision GEMM kernels without wgmma' \
    "$REPORT_MD"
}
if [ "$DO_REPORT" = 1 ]; then step report report; fi

# ---- 5. the Triton value and gradient tests, interpreter, these versions --------------------
if [ "$DO_TESTS" = 1 ]; then
  step tests env TRITON_INTERPRET=1 "$PY" -m pytest -q -x -p no:cacheprovider -o timeout=600 \
    tests/test_contrastive.py tests/test_heads.py tests/test_prompt_backends.py tests/test_triton_grids.py \
    -k "triton and not large or grid or split" -m "not slow"
fi

# ---- 6. gpu_check.sh end to end in its dry mode ---------------------------------------------
step dry env PYTHON="$PY" LOGDIR="$LOGS/gpu_check" BENCH_OUT="$LOGS/gpu_dry.md" bash scripts/gpu_check.sh --dry

{
  echo
  echo "exit status $STATUS after $(($(date +%s) - START)) s"
} >>"$LOGS/summary.md"
cat "$LOGS/summary.md"
exit "$STATUS"
