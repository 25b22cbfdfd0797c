#!/usr/bin/env bash
# Installs dgkernels + dgclip from this checkout, compiling dgkernels._C, and says what it does.
#
#   scripts/install.sh            torch as pip resolves it (on Linux: the CUDA build, about 5 GB with
#                                 its CUDA libraries); CUDA kernels too where nvcc is found
#   scripts/install.sh --cpu      CPU only: the CPU build of torch (download.pytorch.org/whl/cpu) and
#                                 DGKERNELS_BUILD_CUDA=0 (no CUDA libraries, no nvcc compile)
#   scripts/install.sh --dry-run  print the plan and stop
#
# torch must be installed before the build (the extension links against it), hence two steps and
# --no-build-isolation: an isolated build would compile against a different torch download.
# Environment: PIP (default "python -m pip"), MAX_JOBS (parallel compile jobs, default 2),
# DGKERNELS_BUILD_CUDA (auto | 1 | 0), TORCH_CUDA_ARCH_LIST (default "8.0;9.0" without a visible GPU),
# TORCH_CPU_INDEX (where --cpu finds the CPU builds; default https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python -m pip}"
EXTRAS="dgclip,test,docs"
CPU_ONLY=0
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU_ONLY=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
export MAX_JOBS="${MAX_JOBS:-2}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

find_nvcc() {
  for c in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc "$(command -v nvcc 2>/dev/null || true)"; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return; }
  done
}
torch_now=$(python -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda)" 2>/dev/null || echo "not installed")
nvcc=$(find_nvcc || true)

echo "== dgkernels + dgclip install plan =="
echo "python:  $(python -c 'import sys; print(sys.version.split()[0])') ($(command -v python))"
echo "torch:   $torch_now"
if [ "$CPU_ONLY" = 1 ]; then
  export DGKERNELS_BUILD_CUDA=0
  echo "step 1:  torch + torchvision, CPU builds, from $TORCH_CPU_INDEX (about 0.2 GB download,"
  echo "         1 GB on disk; the default CUDA build brings about 5 GB: torch, nvidia-* libraries, triton)"
  echo "step 2:  compile dgkernels._C: CPU kernels only (csrc/**/*.cpp; about 2 min on 2 cores)"
  echo "         (DGKERNELS_BUILD_CUDA=0: no CUDA kernels)"
else
  echo "step 1:  torch as pip resolves it (\"torch>=2.4\"; kept if already installed)"
  echo "step 2:  compile dgkernels._C: CPU kernels (csrc/**/*.cpp; about 2 min on 2 cores)"
  case "${DGKERNELS_BUILD_CUDA:-auto}" in
    0|false|no|off) echo "         CUDA kernels: no (DGKERNELS_BUILD_CUDA=${DGKERNELS_BUILD_CUDA})" ;;
    *) if [ -n "$nvcc" ]; then
         echo "         CUDA kernels: yes if torch is a CUDA build (nvcc at $nvcc, TORCH_CUDA_ARCH_LIST="
         echo "         ${TORCH_CUDA_ARCH_LIST:-8.0;9.0}): about 8-10 min more on 2 cores; skip with --cpu"
         echo "         or DGKERNELS_BUILD_CUDA=0 (the Triton and PyTorch backends still run on a GPU)"
       else
         echo "         CUDA kernels: no (no nvcc found; set CUDA_HOME to build them)"
       fi ;;
  esac
fi
echo "step 3:  the packages, editable, with extras [$EXTRAS]"
echo "compile jobs: MAX_JOBS=$MAX_JOBS"
[ "$DRY_RUN" = 1 ] && exit 0

start=$SECONDS
echo "== step 1: torch and build tools =="
if [ "$CPU_ONLY" = 1 ]; then
  $PIP install --index-url "$TORCH_CPU_INDEX" "torch>=2.4" torchvision
  # later resolutions (open_clip needs torchvision) then prefer the +cpu builds over PyPI's CUDA ones
  export PIP_EXTRA_INDEX_URL="$TORCH_CPU_INDEX${PIP_EXTRA_INDEX_URL:+ $PIP_EXTRA_INDEX_URL}"
fi
$PIP install "torch>=2.4" "setuptools>=69" wheel ninja pybind11

echo "== step 2+3: compiling dgkernels._C and installing (progress lines below; full log kept) =="
log=$(mktemp -t dgclip-install.XXXXXX.log)
set +e
$PIP install -v --no-build-isolation -e ".[$EXTRAS]" 2>&1 | tee "$log" | while IFS= read -r line; do
  line="${line#"${line%%[![:space:]]*}"}"  # pip indents its build output
  case "$line" in
    "[dgkernels]"*|"Successfully installed"*) printf '  [%4ds] %s\n' $((SECONDS - start)) "${line:0:200}" ;;
    \[[0-9]*/[0-9]*\]*)  # ninja: [k/n] followed by the compile command
      src=$(grep -oE 'csrc/[^ ]+\.(cpp|cu)' <<<"$line" | head -1 || true)
      printf '  [%4ds] compile %s %s\n' $((SECONDS - start)) "${line%%]*}]" "${src:-(link)}" ;;
  esac
done
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "install failed (exit $status); the last 40 lines of $log:" >&2
  tail -40 "$log" >&2
  exit "$status"
fi
echo "== done in $((SECONDS - start)) s (log: $log); backends available: =="
python -c "import dgkernels; [print(f'  {k:9s} {\"yes\" if v.available else \"no: \" + v.reason}') for k, v in dgkernels.backends().items()]"
# dgclip's backbones need open_clip, which needs a torchvision built for this torch (a CPU torch
# beside a CUDA torchvision fails only here, at import)
if python -c "import open_clip" 2>/dev/null; then
  echo "  dgclip    yes (open_clip $(python -c 'import open_clip; print(open_clip.__version__)'))"
else
  echo "  dgclip    NO: importing open_clip fails:" >&2
  python -c "import open_clip" 2>&1 | tail -1 >&2 || true
  echo "            (with --cpu: torchvision must come from the same index as torch: $TORCH_CPU_INDEX)" >&2
  exit 1
fi
echo "next: dgclip --help; dgclip quickstart (the embedded default, a few minutes on a CPU)"
