"""cpp / cuda backend: the compiled kernels of csrc/contrastive (torch.ops.dgkernels.contrastive_lse_*).

Both backends call the same ops; the dispatcher picks the CPU or CUDA kernel from the device.
`scale` is a one-element tensor on the inputs' device: the CUDA kernels read it from device memory
(no host sync per call), the CPU kernels read its value on the host (no device to wait for).
Fake (meta) kernels are registered here so torch.compile can trace through the ops.
"""
from __future__ import annotations

import torch

from .. import _extension


def refusal(op: str, call) -> str:
    """csrc/contrastive runs every floating dtype (float64 accumulates in float64) and any size."""
    return ""


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_forward(q, k, scale, exclude_diag: bool, want_cols: bool):
    return torch.ops.dgkernels.contrastive_lse_fwd(q, k, scale, exclude_diag, want_cols)


def lse_backward(q, k, scale, exclude_diag: bool, lse_r, lse_c, w_r, w_c):
    return torch.ops.dgkernels.contrastive_lse_bwd(q, k, scale, exclude_diag, lse_r, lse_c, w_r, w_c)


def _register_fakes() -> None:
    if not _extension.load()[0] or not hasattr(torch.ops.dgkernels, "contrastive_lse_fwd"):
        return

    @torch.library.register_fake("dgkernels::contrastive_lse_fwd")
    def _fwd_fake(q, k, scale, exclude_diag, want_cols):
        acc = _acc(q.dtype)
        return q.new_empty((q.shape[0],), dtype=acc), k.new_empty((k.shape[0] if want_cols else 0,), dtype=acc)

    @torch.library.register_fake("dgkernels::contrastive_lse_bwd")
    def _bwd_fake(q, k, scale, exclude_diag, lse_r, lse_c, w_r, w_c):
        acc = _acc(q.dtype)
        return q.new_empty(q.shape, dtype=acc), k.new_empty(k.shape, dtype=acc), q.new_empty((), dtype=acc)


_register_fakes()
