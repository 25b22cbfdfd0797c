"""dgkernels: fused kernels for the hot paths of CLIP prompt learning.

Every public op takes a `backend=` keyword ("triton", "cuda", "cpp", "reference" or None for
automatic); DGKERNELS_BACKEND sets it globally. `dgkernels.backends()` says what runs here.
Importing this package never initialises CUDA and works without Triton or the compiled extension.
"""
from ._dispatch import BACKENDS, BackendStatus, BackendUnavailableError, backends, explain, use_backend

from .contrastive import InfoNCE, clip_loss, info_nce, multiview_info_nce

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendStatus", "BackendUnavailableError", "backends", "explain", "use_backend",
           "info_nce", "InfoNCE", "clip_loss", "multiview_info_nce"]
