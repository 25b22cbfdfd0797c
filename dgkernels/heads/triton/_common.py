"""Helpers shared by the head kernels' launchers."""
from __future__ import annotations

import torch
import triton

from ..._triton_signature import interpreting  # noqa: F401 - the launchers' name for it

TILE_ELEMS = 1 << 22  # logits exist only as row tiles of at most this many float32 elements


def op_dtype(t):
    """GEMM operand dtype: the input's for bf16/fp16 (tensor cores), else float32."""
    return t.dtype if t.dtype in (torch.bfloat16, torch.float16) else torch.float32


def fp32_precision() -> str:
    """tl.dot input precision for float32 operands, as torch.get_float32_matmul_precision() asks:
    'highest' -> IEEE products, 'high'/'medium' -> TF32 tensor cores."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def launch_prec(dtype) -> str:
    """The PREC constexpr a launch passes: fp32_precision() for float32 operands; "ieee" for half
    ones, whose dots ignore it, so that 'high'/'medium' launch the variant COMPILE_SPECS compiled
    rather than an unchecked PREC="tf32" copy of it."""
    return fp32_precision() if dtype == torch.float32 else "ieee"


def check_fp64(x):
    if x.dtype == torch.float64:
        raise NotImplementedError("the triton head kernels run float32/bfloat16/float16 (float64: use cpp or reference)")


def tile_rows(per_row, rows):
    return max(1, min(rows, TILE_ELEMS // max(per_row, 1)))


def row_block(E):
    return max(16, triton.next_power_of_2(E))


def groups(domain, D):
    """Rows sorted by domain (stable) and the D + 1 group offsets (one device->host copy)."""
    order = torch.sort(domain.long(), stable=True)[1]
    counts = torch.bincount(domain.long(), minlength=D).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return order, offsets
