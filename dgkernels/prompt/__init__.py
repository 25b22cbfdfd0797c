"""Prompt-text encoding: exact truncation and shared-prefix reuse over an open_clip text tower.

Public: encode_text, encode_prompts, PromptEncoder. Three ops with per-backend implementations
(registered with dgkernels._dispatch): prompt assembly + positional embedding, shared-prefix
causal attention, EOT gather + ln_final + projection + L2 norm.
"""
from .. import _dispatch, _triton_compile
from . import cpp as _cpp
from . import reference as _reference
from .api import OP_ASSEMBLE, OP_ATTENTION, OP_HEAD, encode_prompts, encode_text
from .encoder import PromptEncoder

for _op in (OP_ASSEMBLE, OP_ATTENTION, OP_HEAD):
    _dispatch.register(_op, "reference", _reference)
    _dispatch.register(_op, "cpp", _cpp.OPS)  # torch.ops dispatch on device: CPU and CUDA kernels
    _dispatch.register(_op, "cuda", _cpp.OPS)
    _dispatch.register(_op, "triton", _dispatch.LazyModule("dgkernels.prompt.triton"))
_triton_compile.register_module("dgkernels.prompt.triton")
_cpp.register_fakes()

__all__ = ["encode_text", "encode_prompts", "PromptEncoder"]
