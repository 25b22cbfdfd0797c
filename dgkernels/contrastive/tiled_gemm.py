"""cpp / cuda backends of the contrastive primitive: csrc/contrastive, a tiled GEMM per block of
logits followed by ATen exp / reduce ops on that tile (cuBLAS on CUDA), never a full N x M matrix.

Not one fused kernel: each tile is a library GEMM plus a few elementwise/reduction kernels, issued
in order (csrc/contrastive/tiled.h). Both backends call the same ops; the dispatcher of
torch.ops.dgkernels.contrastive_lse_* picks the CPU or CUDA kernel from the device. `scale` is a
one-element tensor on the inputs' device: the CUDA kernels read it from device memory (no host
sync per call), the CPU kernels read its value on the host (no device to wait for).
"""
from __future__ import annotations

import torch

from .. import _extension

_extension.load()  # registers torch.ops.dgkernels.* (a missing build is reported by dgkernels.backends())


def contrastive_lse(q, k, scale, exclude_diag: bool, want_cols: bool):
    return torch.ops.dgkernels.contrastive_lse_fwd(q, k, scale, exclude_diag, want_cols)


def contrastive_lse_backward(q, k, scale, exclude_diag: bool, lse_r, lse_c, w_r, w_c):
    dq, dk, ds = torch.ops.dgkernels.contrastive_lse_bwd(q, k, scale, exclude_diag, lse_r, lse_c, w_r, w_c)
    return dq, dk, ds.reshape(())
