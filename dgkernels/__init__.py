"""dgkernels: fused kernels for the hot paths of CLIP prompt learning.

Every public op takes a `backend=` keyword ("triton", "cuda", "cpp", "reference" or None for
automatic); DGKERNELS_BACKEND sets it globally. `dgkernels.backends()` says what runs here.
Importing this package never initialises CUDA and works without Triton or the compiled extension.
"""
from ._dispatch import BACKENDS, BackendStatus, BackendUnavailableError, backends, explain, use_backend

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendStatus", "BackendUnavailableError", "backends", "explain", "use_backend"]

# contrastive: InfoNCE / CLIP / multi-view losses without the N x N matrix
from .contrastive import InfoNCE, clip_loss, info_nce, multiview_info_nce

__all__ += ["info_nce", "InfoNCE", "clip_loss", "multiview_info_nce"]

# heads: per-domain classifiers, mapper, fused cosine cross-entropy
from .heads import cosine_cross_entropy, domain_cross_entropy, domain_fanout, head_agreement, mapper_project

__all__ += ["domain_fanout", "domain_cross_entropy", "head_agreement", "mapper_project", "cosine_cross_entropy"]

# prompt: exact, truncated, prefix-shared prompt-text encoding
from .prompt import PromptEncoder, encode_prompts, encode_text

__all__ += ["encode_text", "encode_prompts", "PromptEncoder"]
