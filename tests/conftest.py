import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter. This must be set before any Triton
# kernel module is imported (triton.jit reads it at decoration time); dgkernels imports them lazily.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Where Triton-backend tests put their tensors: the GPU when one is visible (compiled kernels),
# else the CPU (the interpreter set above). Tests of the triton backend must use this, never "cpu".
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_device() -> str:
    return TRITON_DEVICE


def pytest_configure(config):
    # pytest-xdist's marker (scripts/gpu_check.sh runs `-n 8 --dist loadgroup`): tests sharing an
    # expensive session fixture stay in one worker. Registered here so plain pytest knows it too.
    config.addinivalue_line("markers", "xdist_group(name): run in one pytest-xdist worker with --dist loadgroup")


def pytest_collection_finish(session):
    # The sm_80/sm_90 compile behind tests/test_triton_compile.py costs minutes of CPU in its own
    # processes: start it now, beside the rest of the suite, if any selected test needs it. Not in
    # pytest-xdist workers (each collects everything; the one running the tests starts it on demand).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for mod in {getattr(item, "module", None) for item in session.items if "compiled" in getattr(item, "fixturenames", ())}:
        if hasattr(mod, "start_compile"):
            mod.start_compile()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the marker itself: item.keywords also holds the directory names of the test's path
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
