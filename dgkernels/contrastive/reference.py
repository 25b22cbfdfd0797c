"""Reference backend of the contrastive family: plain differentiable PyTorch.

The one primitive every loss of the family is built from: the row (and column) log-sum-exp of
the scaled similarity matrix S = scale * Q @ K^T. Here S is materialised ([N, M]); this is the
test oracle and the benchmark baseline, and runs at the input dtype (PyTorch's own precision).
"""
from __future__ import annotations

import torch

from .._validate import acc_dtype


def contrastive_lse(q: torch.Tensor, k: torch.Tensor, scale, exclude_diag: bool, want_cols: bool):
    """(lse_r [N], lse_c [M] or [0] without want_cols) in float32 (float64 for float64 inputs).

    lse_r[i] = logsumexp_j scale * q_i.k_j ; lse_c[j] = logsumexp_i scale * q_i.k_j ;
    exclude_diag drops the entries i == j (requires N == M).
    """
    logits = (q @ k.transpose(0, 1)) * scale
    if exclude_diag:
        eye = torch.eye(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device)
        logits = logits.masked_fill(eye, float("-inf"))
    acc = acc_dtype(q.dtype)
    lse_r = torch.logsumexp(logits, dim=1).to(acc)
    lse_c = torch.logsumexp(logits, dim=0).to(acc) if want_cols else lse_r.new_empty(0)
    return lse_r, lse_c
