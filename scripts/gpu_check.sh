#!/usr/bin/env bash
# One-run GPU check of dgkernels on one H100/H200 (sm_90), no network. It spends its minutes only on
# what a GPU can show; everything else (the CPU suite, the sm_80/sm_90 compile and resource checks)
# already runs on every CPU machine.
#
# Time budget per step (seconds; environment overrides). Limits sum to 400 s, plus about 20 s of
# start-up and the kill-after margins: the whole script ends within 7.5 minutes, under the 8.
#   0. facts      ~5 s    nvidia-smi, python/torch/triton versions, into $LOGDIR/summary.md
#   1. build      GPU_CHECK_BUILD_S=110  the compiled extension with CUDA, sm_90 only, in place
#   2. tests      GPU_CHECK_TESTS_S=150  GPU-marked and CUDA-specific tests only
#                 (scripts/gpu_test_select.py), -v, GPU_CHECK_TEST_TIMEOUT_S=60 per test (pytest-timeout,
#                 signal method: a hung test fails alone), one fixed launch configuration per kernel
#                 (DGKERNELS_TRITON_FIXED_CONFIG=1: no autotuning; every config is compile-checked
#                 elsewhere), pytest-xdist when present
#   3. bench      GPU_CHECK_BENCH_S=140  benchmarks/gpu_bench.py: ceilings, then the small and medium
#                 rows of every op (contrastive, heads, prompt), then the largest N rows and the
#                 largest-N search last; a warm-up per size, so a row times the kernel, not tuning
# Every step runs under `timeout --signal=INT` (then KILL 15 s later): pytest and the benchmark see
# a KeyboardInterrupt and still print which tests failed / keep their finished rows. Every step
# writes as it goes: its log in $LOGDIR/<step>.log (pytest -v: one line per test), the benchmark's
# table row by row, and one line per finished step in $LOGDIR/summary.md. A failing step does not
# stop the later ones; the exit status is the first failure's.
#
# Usage: scripts/gpu_check.sh [--dry] [--print] [--skip-build] [--skip-tests] [--skip-bench]
#   --dry    no GPU needed: every step end to end on this machine's CPU under TRITON_INTERPRET=1 at
#            tiny sizes - no CUDA build; the test step runs the GPU run's very pytest command on
#            the first 2 selected tests of each file (`--gpu-select-sample`); the benchmark its smoke
#            sizes, writing the table's skeleton (--smoke is the same)
#   --print  print the commands and the time budget, run nothing (--dry-run is the same)
# LOGDIR (default benchmarks/results/gpu_check_logs), BENCH_OUT (the table; default
# benchmarks/results/gpu_<device>.md, in --dry $LOGDIR/gpu_dry.md), PYTHON (python3), MAX_JOBS,
# PYTEST_WORKERS (8).
#
# What the machine needs. Its python3 (3.12) has torch 2.11.0, triton 3.6.0, numpy, pytest,
# pytest-timeout, pytest-xdist (and more: /work/.library/device/KINDS.md). Carry as wheels the ones
# listed in scripts/gpu_carry_wheels.txt (scripts/gpu_rehearsal.sh downloads them and checks they
# install offline), e.g. in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl -r scripts/gpu_carry_wheels.txt
# then carry `.whl` and begin the device command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; scripts/gpu_check.sh
# A peer whose wheel is absent is skipped: its benchmark rows say "not installed", and the tests
# that need a missing package skip themselves.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

DRY=0 PRINT=0 DO_BUILD=1 DO_TESTS=1 DO_BENCH=1
for arg in "$@"; do
  case "$arg" in
    --dry|--smoke) DRY=1 ;;
    --print|--dry-run) PRINT=1 ;;
    --skip-build) DO_BUILD=0 ;;
    --skip-tests) DO_TESTS=0 ;;
    --skip-bench) DO_BENCH=0 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {print}' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
BUILD_S="${GPU_CHECK_BUILD_S:-110}"
TESTS_S="${GPU_CHECK_TESTS_S:-150}"
BENCH_S="${GPU_CHECK_BENCH_S:-140}"
TEST_TIMEOUT_S="${GPU_CHECK_TEST_TIMEOUT_S:-60}"
LOGDIR="${LOGDIR:-$ROOT/benchmarks/results/gpu_check_logs}"
WORKERS="${PYTEST_WORKERS:-8}"
JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
else
  unset TRITON_INTERPRET
fi
STATUS=0
START=$(date +%s)

say() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

note() {  # one line of the summary, written at once
  if [ "$PRINT" = 0 ]; then
    mkdir -p "$LOGDIR"
    echo "$*" >>"$LOGDIR/summary.md"
  fi
}

# run NAME SECONDS CMD...: the command under a hard time limit (SIGINT first), output in $LOGDIR/NAME.log
run() {
  local name="$1" secs="$2"
  shift 2
  if [ "$PRINT" = 1 ]; then
    echo "would run ($name, <= ${secs}s): $*"
    return 0
  fi
  mkdir -p "$LOGDIR"
  say "$name: $* (limit ${secs}s, log $LOGDIR/$name.log)"
  local rc=0 t0
  t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$secs" "$@" >"$LOGDIR/$name.log" 2>&1 || rc=$?
  tail -n 25 "$LOGDIR/$name.log"
  local verdict="ok"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    verdict="TIMED OUT after ${secs}s (exit $rc)"
  elif [ "$rc" != 0 ]; then
    verdict="FAILED (exit $rc)"
  fi
  say "$name: $verdict"
  note "| $name | $verdict | $(($(date +%s) - t0)) s of ${secs} s | $name.log |"
  if [ "$rc" != 0 ] && [ "$STATUS" = 0 ]; then STATUS=$rc; fi
  return 0
}

if [ "$PRINT" = 0 ]; then
  mkdir -p "$LOGDIR"
  {
    echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')$([ "$DRY" = 1 ] && echo ' (DRY: CPU, TRITON_INTERPRET=1)')"
    echo
    echo "budget: build ${BUILD_S} s, tests ${TESTS_S} s (${TEST_TIMEOUT_S} s per test), bench ${BENCH_S} s"
    echo
    echo "| step | result | time | log |"
    echo "|---|---|---|---|"
  } >"$LOGDIR/summary.md"
fi

if [ "$DRY" = 0 ] && [ "$PRINT" = 0 ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (use --dry for the CPU rehearsal)" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
if [ "$PRINT" = 0 ]; then
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" \
    2>&1 | tee -a "$LOGDIR/facts.log"
fi

# 1. build: the CUDA kernels for sm_90 only (one architecture keeps nvcc within the budget)
if [ "$DO_BUILD" = 1 ]; then
  if [ "$DRY" = 1 ]; then
    say "build: skipped in --dry (no CUDA here; the CPU extension, if built, is used)"
    note "| build | skipped (dry) | 0 s | |"
  else
    run build "$BUILD_S" env DGKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" \
      "$PY" setup.py build_ext --inplace
    if [ "$PRINT" = 0 ]; then
      "$PY" -c "import dgkernels; print({k: (v.available, v.reason) for k, v in dgkernels.backends().items()})" \
        2>&1 | tee -a "$LOGDIR/facts.log" || true
    fi
  fi
fi

# 2. GPU-marked and CUDA-specific tests, fixed launch configurations, a time limit per test
if [ "$DO_TESTS" = 1 ]; then
  PYT=("$PY" -m pytest tests -p gpu_test_select -p no:cacheprovider -v -rfEs --junitxml="$LOGDIR/tests.xml")
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    PYT+=(-o "timeout=$TEST_TIMEOUT_S" -o timeout_method=signal)
  fi
  if [ "$DRY" = 1 ]; then
    PYT+=(--gpu-select-sample 2)
  elif "$PY" -c "import xdist" 2>/dev/null; then
    PYT+=(-n "$WORKERS" --dist loadgroup)
  fi
  run tests "$TESTS_S" env PYTHONPATH="$ROOT/scripts:$PYTHONPATH" DGKERNELS_TRITON_FIXED_CONFIG=1 "${PYT[@]}"
fi

# 3. the benchmarks, writing rows as they go (their own budget leaves the time limit a margin)
if [ "$DO_BENCH" = 1 ]; then
  BENCH=("$PY" benchmarks/gpu_bench.py --budget-s "$((BENCH_S - 25))")
  if [ "$DRY" = 1 ]; then
    BENCH+=(--smoke --out "${BENCH_OUT:-$LOGDIR/gpu_dry.md}")
  elif [ -n "${BENCH_OUT:-}" ]; then
    BENCH+=(--out "$BENCH_OUT")
  fi
  run bench "$BENCH_S" "${BENCH[@]}"
fi

say "done, exit status $STATUS"
note ""
note "exit status $STATUS after $(($(date +%s) - START)) s"
exit "$STATUS"
