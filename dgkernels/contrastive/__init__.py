"""Fused contrastive losses (InfoNCE, CLIP, multi-view SupCon) that never hold the N x M logits.

Every loss is composed around one primitive, `contrastive_lse` (the row/column log-sum-exp of
scale * Q K^T; .ops). Its backends, declared here:
  reference: .reference (materialises S); cpp + cuda: .tiled_gemm (csrc/contrastive: a library GEMM
  and ATen reductions per tile); triton: .triton (fused kernels, imported on first use; at wide D its backward is .triton_slab).
"""
from .. import _dispatch, _triton_signature
from .._dispatch import Backend
from . import ops
from .api import InfoNCE, clip_loss, info_nce, multiview_info_nce

OPS = ("info_nce", "clip_loss", "multiview_info_nce")
BACKENDS = (
    Backend("contrastive", "reference", "dgkernels.contrastive.reference",
            "plain PyTorch, the N x M logits materialised"),
    Backend("contrastive", "cpp", "dgkernels.contrastive.tiled_gemm",
            "csrc/contrastive/cpu.cpp: tiled GEMM + ATen per tile"),
    Backend("contrastive", "cuda", "dgkernels.contrastive.tiled_gemm",
            "csrc/contrastive/cuda.cu: cuBLAS GEMM + ATen per tile, not a fused kernel"),
    Backend("contrastive", "triton", "dgkernels.contrastive.triton", "fused Triton log-sum-exp",
            dtypes=_dispatch.TRITON_DTYPES,
            names=((ops.LSE, "lse_forward"), (ops.LSE_BACKWARD, "lse_backward"))),
)
for _backend in BACKENDS:  # the reference implements the forward primitives (its backward: autograd)
    _dispatch.register(_backend, (ops.LSE,) if _backend.name == "reference" else ops.PRIMITIVES)
for _op in OPS:
    _dispatch.register_public(_op, ops.LSE)
_triton_signature.register_module("dgkernels.contrastive.triton")
_triton_signature.register_module("dgkernels.contrastive.triton_slab")

__all__ = ["InfoNCE", "clip_loss", "info_nce", "multiview_info_nce"]
