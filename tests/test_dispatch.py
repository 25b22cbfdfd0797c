import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import dgkernels
from dgkernels import _dispatch


def test_backends_report_every_backend_with_reasons():
    status = dgkernels.backends()
    assert set(status) == set(dgkernels.BACKENDS)
    assert status["reference"].available
    for s in status.values():
        assert s.available or s.reason, f"{s.name} unavailable without a reason"


def test_import_does_not_initialise_cuda():
    code = "import dgkernels, torch; dgkernels.backends(); print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_import_works_without_extension_and_triton():
    # sys.modules[name] = None makes `import name` fail: the package still imports and says why.
    code = (
        "import sys, json\n"
        "sys.modules['triton'] = None\n"
        "sys.modules['dgkernels._C'] = None\n"
        "import dgkernels\n"
        "print(json.dumps({k: [v.available, v.reason] for k, v in dgkernels.backends().items()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    status = json.loads(out.stdout)
    assert status["reference"][0]
    for name in ("triton", "cpp", "cuda"):
        assert not status[name][0] and status[name][1], name
    assert "_C" in status["cpp"][1]


def test_unknown_backend_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        _dispatch.requested_backend("fortran")
    monkeypatch.setenv("DGKERNELS_BACKEND", "fortran")
    with pytest.raises(ValueError, match="DGKERNELS_BACKEND"):
        _dispatch.requested_backend(None)


def test_selection_order_and_overrides(monkeypatch):
    cpp_impl, ref_impl = (_dispatch.Backend("_probe", name, "dgkernels.contrastive.reference", "a probe")
                          for name in ("cpp", "reference"))
    _dispatch.register(cpp_impl, ("_probe",))
    _dispatch.register(ref_impl, ("_probe",))
    cpu = torch.device("cpu")
    monkeypatch.delenv("DGKERNELS_BACKEND", raising=False)
    expect_auto = "cpp" if dgkernels.backends()["cpp"] else "reference"
    assert _dispatch.select("_probe", cpu)[0] == expect_auto
    assert _dispatch.select("_probe", cpu, "reference") == ("reference", ref_impl)
    monkeypatch.setenv("DGKERNELS_BACKEND", "reference")
    assert _dispatch.select("_probe", cpu)[0] == "reference"
    monkeypatch.delenv("DGKERNELS_BACKEND")
    with dgkernels.use_backend("reference"):
        assert _dispatch.select("_probe", cpu)[0] == "reference"
    # A backend the op lacks, or one that cannot run these tensors, is refused with a reason.
    with pytest.raises(dgkernels.BackendUnavailableError, match="no triton implementation"):
        _dispatch.select("_probe", cpu, "triton")
    with pytest.raises(dgkernels.BackendUnavailableError, match="cuda"):
        _dispatch.select("_probe", cpu, "cuda")
