"""cpp / cuda backends of the head primitives: the compiled extension's kernels (csrc/heads).

The same kernels serve both backends: torch.ops.dgkernels.heads_* dispatch on the tensors' device
(CPU kernels, or CUDA kernels when built with CUDA), with the primitives' signatures (.ops). They
run inside the custom ops of .ops, so they need no fake kernels of their own.
"""
from __future__ import annotations

import torch

from .. import _extension

_extension.load()  # registers torch.ops.dgkernels.* (a missing build is reported by dgkernels.backends())

# primitive -> the extension's op (csrc/heads/cpu.cpp, TORCH_LIBRARY_FRAGMENT)
KERNELS = {
    "domain_fanout": "heads_fanout", "domain_fanout_backward": "heads_fanout_backward",
    "domain_cross_entropy_rows": "heads_dce_forward", "domain_cross_entropy_rows_backward": "heads_dce_backward",
    "head_agreement_rows": "heads_agree_forward", "head_agreement_rows_backward": "heads_agree_backward",
    "mapper_project_rows": "heads_mapper_forward", "mapper_project_rows_backward": "heads_mapper_backward",
    "cosine_cross_entropy_rows": "heads_cosce_forward", "cosine_cross_entropy_rows_backward": "heads_cosce_backward",
}


def __getattr__(primitive: str):
    if primitive not in KERNELS:
        raise AttributeError(primitive)
    return getattr(torch.ops.dgkernels, KERNELS[primitive])
