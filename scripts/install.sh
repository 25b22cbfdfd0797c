#!/usr/bin/env bash
# Installs dgkernels + dgclip from this checkout, compiling dgkernels._C.
# torch must be installed before the build (the extension links against it), hence two steps and
# --no-build-isolation: an isolated build would compile against a different torch download.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python -m pip}"
$PIP install "torch>=2.4" "setuptools>=69" wheel ninja pybind11
MAX_JOBS="${MAX_JOBS:-2}" $PIP install --no-build-isolation -e ".[dgclip,test,docs]"
python -c "import dgkernels; [print(f'  {k:9s} {\"yes\" if v.available else \"no: \" + v.reason}') for k, v in dgkernels.backends().items()]"
