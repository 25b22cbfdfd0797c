"""Fused contrastive losses (InfoNCE, CLIP, multi-view SupCon) that never hold the N x M logits.

Backends of the one primitive (row/column log-sum-exp of scale * Q K^T):
  reference: .reference (materialises S); cpp + cuda: torch.ops.dgkernels.contrastive_lse_* from
  csrc/contrastive (via .compiled); triton: .triton (imported lazily).
"""
from .. import _dispatch, _triton_signature
from . import compiled, reference
from .api import InfoNCE, clip_loss, info_nce, multiview_info_nce

OPS = ("info_nce", "clip_loss", "multiview_info_nce")
_triton = _dispatch.LazyModule("dgkernels.contrastive.triton")
for _op in OPS:
    _dispatch.register(_op, "reference", reference)
    _dispatch.register(_op, "cpp", compiled)
    _dispatch.register(_op, "cuda", compiled)
    _dispatch.register(_op, "triton", _triton)
_triton_signature.register_module("dgkernels.contrastive.triton")

__all__ = ["InfoNCE", "clip_loss", "info_nce", "multiview_info_nce"]
