"""Prompt-text encoding: exact truncation and shared-prefix reuse over an open_clip text tower.

Public: encode_text, encode_prompts, PromptEncoder. Three ops with per-backend implementations
(registered with dgkernels._dispatch): prompt assembly + positional embedding, shared-prefix
causal attention, EOT gather + ln_final + projection + L2 norm.
"""
from .. import _dispatch
from . import reference as _reference
from .api import OP_ASSEMBLE, OP_ATTENTION, OP_HEAD, encode_prompts, encode_text
from .encoder import PromptEncoder

for _op in (OP_ASSEMBLE, OP_ATTENTION, OP_HEAD):
    _dispatch.register(_op, "reference", _reference)

__all__ = ["encode_text", "encode_prompts", "PromptEncoder"]
