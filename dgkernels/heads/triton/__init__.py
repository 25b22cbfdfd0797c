"""Triton backend of the head ops: one module per op, kernels beside their launchers.

Same scheme as the compiled backend (csrc/heads/heads.h): logits exist only as row tiles of at
most _common.TILE_ELEMS elements; a tiled `tl.dot` GEMM kernel (matmul) builds them and the
gradients' GEMMs, and one fused row kernel per op does the per-row work (cross_entropy_rows,
agreement, mapper). The cosine cross-entropy is fused Cut-Cross-Entropy style (cosine,
cosine_per_sample). Logits and their gradients are float32; GEMM operands are the input dtype for
bf16/fp16 (tensor cores), float32 gradient tiles cast row-scaled against them (small gradients
keep their precision), and float32 inputs multiply at torch.get_float32_matmul_precision().
CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; float32/bfloat16/float16.
"""
from . import agreement, cosine, cosine_per_sample, cross_entropy_rows, mapper, matmul
from .agreement import agree_backward, agree_forward
from .cosine import cosce_backward, cosce_forward
from .domain_ce import dce_backward, dce_forward
from .fanout import fanout_backward, fanout_forward
from .mapper import mapper_backward, mapper_forward

# every kernel x every constexpr variant and block size the launchers can pick
COMPILE_SPECS = [*matmul.SPECS, *cross_entropy_rows.SPECS, *agreement.SPECS, *mapper.SPECS, *cosine.SPECS,
                 *cosine_per_sample.SPECS]


def refusal(primitive: str, call) -> str:
    """The size limit of these kernels (devices and dtypes are declared in dgkernels.heads): for
    head_agreement, one row's D x K logits within the register tile (agreement.MAX_TILE)."""
    if primitive.startswith("head_agreement"):
        return agreement.tile_refusal(call.size("D"), call.size("K"))
    return ""


__all__ = ["refusal", "fanout_forward", "fanout_backward", "dce_forward", "dce_backward", "agree_forward", "agree_backward",
           "mapper_forward", "mapper_backward", "cosce_forward", "cosce_backward", "COMPILE_SPECS"]
