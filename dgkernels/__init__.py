"""dgkernels: fused kernels for the hot paths of CLIP prompt learning.

Every public op takes a `backend=` keyword ("triton", "cuda", "cpp", "reference" or None for
automatic); DGKERNELS_BACKEND sets it globally. `dgkernels.backends()` says what runs here.
Importing this package never initialises CUDA and works without Triton or the compiled extension.
"""
from ._dispatch import BACKENDS, BackendStatus, BackendUnavailableError, backends, explain, use_backend

from .prompt import PromptEncoder, encode_prompts, encode_text

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendStatus", "BackendUnavailableError", "backends", "explain", "use_backend",
           "encode_text", "encode_prompts", "PromptEncoder"]
