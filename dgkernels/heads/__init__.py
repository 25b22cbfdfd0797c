"""Classification heads: per-domain fan-out and cross-entropy, head agreement, mapper projection and
fused cosine cross-entropy (reference, cpp/cuda and triton backends)."""
from .. import _dispatch, _extension, _triton_signature
from . import compiled as _compiled
from . import reference as _reference
from .api import cosine_cross_entropy, domain_cross_entropy, domain_fanout, head_agreement, mapper_project

OPS = ("domain_fanout", "domain_cross_entropy", "head_agreement", "mapper_project", "cosine_cross_entropy")
_triton = _dispatch.LazyModule("dgkernels.heads.triton")
for _op in OPS:
    _dispatch.register(_op, "reference", _reference)
    _dispatch.register(_op, "cpp", _compiled)
    _dispatch.register(_op, "cuda", _compiled)
    _dispatch.register(_op, "triton", _triton)
_triton_signature.register_module("dgkernels.heads.triton")
if _extension.load()[0]:
    _compiled.register_fakes()

__all__ = list(OPS)
