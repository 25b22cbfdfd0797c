"""Classification heads: per-domain fan-out and cross-entropy, head agreement, mapper projection and
fused cosine cross-entropy. Primitives (.ops) and their backends, declared here:
  reference: .reference (plain PyTorch, full intermediates); cpp + cuda: .extension (csrc/heads:
  ATen GEMMs on row tiles + one fused row pass per tile); triton: .triton (imported on first use).
"""
from .. import _dispatch, _triton_signature
from .._dispatch import Backend
from . import ops
from .api import cosine_cross_entropy, domain_cross_entropy, domain_fanout, head_agreement, mapper_project

OPS = ("domain_fanout", "domain_cross_entropy", "head_agreement", "mapper_project", "cosine_cross_entropy")
_TILES = "ATen GEMMs on row tiles + a fused row pass per tile"
BACKENDS = (
    Backend("heads", "reference", "dgkernels.heads.reference", "plain PyTorch, [B, D, K] / [B, K] logits materialised"),
    Backend("heads", "cpp", "dgkernels.heads.extension", f"csrc/heads/cpu.cpp: {_TILES}"),
    Backend("heads", "cuda", "dgkernels.heads.extension", f"csrc/heads/cuda.cu: {_TILES}"),
    Backend("heads", "triton", "dgkernels.heads.triton", "Triton GEMM and row kernels, fused cosine CE",
            dtypes=_dispatch.TRITON_DTYPES, names=ops.TRITON_NAMES, limits="refusal"),
)
for _backend in BACKENDS:  # the reference implements the forward primitives (its backward: autograd)
    _dispatch.register(_backend, ops.PRIMITIVES[::2] if _backend.name == "reference" else ops.PRIMITIVES)
for _op, _primitive in zip(OPS, ops.PRIMITIVES[::2]):
    _dispatch.register_public(_op, _primitive)
_triton_signature.register_module("dgkernels.heads.triton")

__all__ = list(OPS)
