#!/usr/bin/env bash
# One-run GPU check of dgkernels on one H100/H200 (sm_90), no network, at most 8 minutes:
#   1. build the compiled extension with CUDA for sm_90, in place;
#   2. the whole test suite on the GPU (tests marked `gpu` run; Triton tests use CUDA tensors);
#   3. the GPU benchmarks (benchmarks/gpu_bench.py), written AS THEY GO to
#      benchmarks/results/gpu_<device>.md: a timeout leaves every finished row behind.
# Each step's log goes to $LOGDIR (default benchmarks/results/gpu_check_logs/) and a summary line
# to stdout; a failing step does not stop the later ones (the exit status reports the first failure).
#
# Usage: scripts/gpu_check.sh [--dry-run] [--smoke] [--skip-build] [--skip-tests] [--skip-bench]
#   --dry-run  print the commands and the time budget, run nothing
#   --smoke    no GPU needed: skip the CUDA build, run the benchmarks' CPU smoke mode (tiny sizes)
#              and only the tests that are quick here (tests/test_gpu_bench_smoke.py)
# Time budget (seconds, environment): GPU_CHECK_BUILD_S (120), GPU_CHECK_TESTS_S (200),
#   GPU_CHECK_BENCH_S (135); the three sum to 455 s plus start-up, under the 8 minutes. A step cut
#   by its limit still leaves its log (and the benchmarks their finished rows).
#   MAX_JOBS (default: all cores) for the build; PYTEST_WORKERS (default 8) with pytest-xdist
#   (--dist loadgroup: the compile tests share one worker, the rest spread); DGKERNELS_COMPILE_WORKERS
#   (default 6) for the sm_80/sm_90 compile test.
#
# What the machine needs. python3 (3.12 on the project's GPU machines) already has torch, triton,
# numpy, pytest, pytest-benchmark, pytest-xdist, einops, timm, regex, tqdm, huggingface_hub,
# safetensors, scikit-learn, matplotlib, pillow, transformers. Bring as wheels (all pure Python but
# wcwidth): open_clip_torch (+ ftfy, wcwidth), inf-cl==1.2.1, liger-kernel, and for the tests that
# compare against them info-nce-pytorch==0.1.4 and diffusers (tests skip without them). Recipe of
# the device README, here in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl open_clip_torch ftfy wcwidth inf-cl==1.2.1 liger-kernel info-nce-pytorch==0.1.4 diffusers
# then carry `.whl` and begin the device command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; scripts/gpu_check.sh
# A peer whose wheel is absent is skipped: its benchmark rows say "not installed", and the tests
# that need a missing package skip themselves.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

DRY=0 SMOKE=0 DO_BUILD=1 DO_TESTS=1 DO_BENCH=1
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --smoke) SMOKE=1 ;;
    --skip-build) DO_BUILD=0 ;;
    --skip-tests) DO_TESTS=0 ;;
    --skip-bench) DO_BENCH=0 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {print}' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
BUILD_S="${GPU_CHECK_BUILD_S:-120}"
TESTS_S="${GPU_CHECK_TESTS_S:-200}"
BENCH_S="${GPU_CHECK_BENCH_S:-135}"
LOGDIR="${LOGDIR:-$ROOT/benchmarks/results/gpu_check_logs}"
WORKERS="${PYTEST_WORKERS:-8}"
JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
export DGKERNELS_COMPILE_WORKERS="${DGKERNELS_COMPILE_WORKERS:-6}"
unset TRITON_INTERPRET
STATUS=0
START=$(date +%s)

say() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

# run NAME SECONDS CMD...: the command under a hard time limit, its output in $LOGDIR/NAME.log
run() {
  local name="$1" secs="$2"
  shift 2
  if [ "$DRY" = 1 ]; then
    echo "would run ($name, <= ${secs}s): $*"
    return 0
  fi
  mkdir -p "$LOGDIR"
  say "$name: $* (limit ${secs}s, log $LOGDIR/$name.log)"
  local rc=0
  timeout --signal=TERM --kill-after=15 "$secs" "$@" >"$LOGDIR/$name.log" 2>&1 || rc=$?
  tail -n 15 "$LOGDIR/$name.log"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    say "$name: TIMED OUT after ${secs}s"
  elif [ "$rc" != 0 ]; then
    say "$name: FAILED (exit $rc)"
  else
    say "$name: ok"
  fi
  if [ "$rc" != 0 ] && [ "$STATUS" = 0 ]; then STATUS=$rc; fi
  return 0
}

if [ "$SMOKE" = 0 ] && [ "$DRY" = 0 ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (use --smoke for the CPU dry run)" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi

# 1. build: the CUDA kernels for sm_90 only (one architecture keeps nvcc within the budget)
if [ "$DO_BUILD" = 1 ] && [ "$SMOKE" = 0 ]; then
  run build "$BUILD_S" env DGKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" \
    "$PY" setup.py build_ext --inplace
  if [ "$DRY" = 0 ]; then
    "$PY" -c "import dgkernels; print({k: (v.available, v.reason) for k, v in dgkernels.backends().items()})" || true
  fi
fi

# 2. the whole suite (pytest-xdist when present: the CPU-bound tests are most of its time)
if [ "$DO_TESTS" = 1 ]; then
  XDIST=()
  if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "$WORKERS" --dist loadgroup); fi
  if [ "$SMOKE" = 1 ]; then
    run tests "$TESTS_S" "$PY" -m pytest tests/test_gpu_bench_smoke.py -q -p no:cacheprovider
  else
    run tests "$TESTS_S" "$PY" -m pytest tests -q -p no:cacheprovider -rfEs "${XDIST[@]}"
  fi
fi

# 3. the benchmarks, writing rows as they go (their own budget leaves the timeout a margin)
if [ "$DO_BENCH" = 1 ]; then
  BENCH=("$PY" benchmarks/gpu_bench.py --budget-s "$((BENCH_S - 25))")
  if [ "$SMOKE" = 1 ]; then
    BENCH+=(--smoke --out "${BENCH_OUT:-$LOGDIR/gpu_smoke.md}")
  elif [ -n "${BENCH_OUT:-}" ]; then
    BENCH+=(--out "$BENCH_OUT")
  fi
  run bench "$BENCH_S" "${BENCH[@]}"
fi

say "done, exit status $STATUS"
exit "$STATUS"
