"""cpp / cuda backends of the prompt primitives: the compiled extension's kernels (csrc/prompt),
torch.ops.dgkernels.prompt_*, dispatched on the tensors' device (CPU or CUDA kernels). They run
inside the custom ops of .ops, so they need no fake kernels of their own.
"""
from __future__ import annotations

import torch

from .. import _extension

_extension.load()  # registers torch.ops.dgkernels.* (a missing build is reported by dgkernels.backends())

# primitive -> the extension's op (csrc/prompt/cpu.cpp, TORCH_LIBRARY_FRAGMENT)
KERNELS = {"assemble_tokens": "prompt_assemble", "index_add_rows": "prompt_index_add_rows",
           "prefix_attention": "prompt_prefix_attention", "prefix_attention_backward": "prompt_prefix_attention_backward",
           "eot_head": "prompt_eot_head", "eot_head_backward": "prompt_eot_head_backward"}
_CUDA_F64_TOKENS = 128  # csrc/prompt/cuda.cu check_attention: the float64 kernel's score buffer


def __getattr__(primitive: str):
    if primitive not in KERNELS:
        raise AttributeError(primitive)
    return getattr(torch.ops.dgkernels, KERNELS[primitive])


def refusal(primitive: str, call) -> str:
    """The size limit of csrc/prompt: the float64 CUDA attention takes prefixes and suffixes of at
    most 128 tokens (call.dtypes[0] is the activation dtype)."""
    if primitive.startswith("prefix_attention") and call.device == "cuda" and call.dtypes[:1] == (torch.float64,):
        longest = max(call.size("prefix_len", 0), call.size("suffix_len", 0))
        if longest > _CUDA_F64_TOKENS:
            return (f"the float64 CUDA prompt attention takes prefixes and suffixes of at most {_CUDA_F64_TOKENS} "
                    f"tokens, got {longest}")
    return ""
