"""Prompt-text encoding: exact truncation and shared-prefix reuse over an open_clip text tower.

Public: encode_text, encode_prompts, PromptEncoder. Three primitives (.ops: custom ops, with
their backward primitives) with per-backend implementations declared below: prompt assembly +
positional embedding, shared-prefix causal attention, EOT gather + ln_final + projection + L2 norm.

Memory budget (ViT-B/16 text tower, W = 512, 12 layers; suffix = class name + "." + EOT, about
5.5 tokens). Saved activations per packed token: about 10 W values per layer (LayerNorm inputs,
q/k/v, attention output, the MLP's 4W hidden), i.e. ~240 KB float32 / ~120 KB bfloat16 per token;
measured peak on CPU, float32, G=8 x K=65, M=4: 987 MiB plain, 333 MiB with chunk_size=130 and
checkpoint=True (~1.9 MiB per sequence in flight).
GOPro step (3 views x B=32 x K=65 = 6,240 sequences, M=4): the naive 77-token encoder keeps
~480k tokens (over 100 GB float32: does not fit an 80 GB GPU); encode_prompts keeps ~34.8k
tokens: ~12 GB float32 / ~6 GB bfloat16 unchunked, and with `chunk_size=512, checkpoint=True`
a fixed ~1.1 GB float32 (~0.6 GB bfloat16): the chunk in flight (~1.9 MiB x 512) plus the packed
suffix inputs (T x W) and the G prefixes' per-layer keys/values; the price is one extra suffix
forward (about +30% time).
"""
from .. import _dispatch, _triton_signature
from .._dispatch import Backend
from . import ops
from .api import OP_ASSEMBLE, OP_ATTENTION, OP_HEAD, encode_prompts, encode_text
from .encoder import PromptEncoder

BACKENDS = (
    Backend("prompt", "reference", "dgkernels.prompt.reference", "plain PyTorch, every prompt at the full context"),
    Backend("prompt", "cpp", "dgkernels.prompt.extension", "csrc/prompt/cpu.cpp", limits="refusal"),
    Backend("prompt", "cuda", "dgkernels.prompt.extension", "csrc/prompt/cuda.cu", limits="refusal"),
    Backend("prompt", "triton", "dgkernels.prompt.triton", "Triton packed-window attention, row and head kernels",
            dtypes=_dispatch.TRITON_DTYPES, names=ops.TRITON_NAMES, limits="refusal"),
)
for _backend in BACKENDS:  # the reference implements the forward primitives (its backward: autograd)
    _dispatch.register(_backend, (OP_ASSEMBLE, OP_ATTENTION, OP_HEAD) if _backend.name == "reference" else ops.PRIMITIVES)
for _op in ("encode_text", "encode_prompts", "PromptEncoder"):  # one backend runs all three; the attention limits most
    _dispatch.register_public(_op, OP_ATTENTION)
_triton_signature.register_module("dgkernels.prompt.triton")

__all__ = ["encode_text", "encode_prompts", "PromptEncoder"]
