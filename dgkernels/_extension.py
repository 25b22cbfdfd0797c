"""Loading of the compiled backend `dgkernels._C`, with the reason recorded when it is missing.

Importing `dgkernels._C` runs its static TORCH_LIBRARY registrations, after which the kernels are
reachable as `torch.ops.dgkernels.<name>`. A missing or broken build never breaks `import
dgkernels`: the reason is kept and reported by `dgkernels.backends()` and by any call that asks
for the `cpp` or `cuda` backend.
"""
from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def load() -> tuple[bool, bool, str]:
    """Returns (cpu_kernels, cuda_kernels, reason_if_missing)."""
    try:
        import torch  # noqa: F401 - the extension links against libtorch

        importlib.import_module("dgkernels._C")
    except ImportError as exc:
        msg = str(exc)
        if "No module named" in msg:
            reason = ("dgkernels._C is not built (installed with DGKERNELS_SKIP_EXTENSION=1, a failed "
                      "compile, or running from a source tree without `pip install --no-build-isolation -e .`)")
        else:
            reason = f"dgkernels._C failed to load: {msg} (rebuild against the installed torch)"
        return False, False, reason
    import torch

    info = torch.ops.dgkernels.build_info()
    has_cuda = "cuda" in info.split(",")
    return True, has_cuda, "" if has_cuda else "dgkernels._C was built without CUDA kernels (no toolkit or DGKERNELS_BUILD_CUDA=0)"
