"""Plain differentiable PyTorch versions of the head ops: the test oracle and the benchmark baseline.

These build the full intermediates ([B, D, K] logits, [B, K] cosine logits) on purpose: they are
the composition the fused backends are measured against. Inputs are validated by api.py. The
`*_rows` functions are the per-sample primitives every backend implements (dgkernels.heads.ops);
the public ops reduce them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._validate import acc_dtype


def domain_fanout(features, weight, bias=None):
    logits = torch.einsum("bf,dkf->bdk", features, weight)
    return logits if bias is None else logits + bias


def domain_cross_entropy_rows(features, weight, bias, domain, target, all_heads, label_smoothing):
    logits = domain_fanout(features, weight, bias)  # [B, D, K]
    B, D, K = logits.shape
    if all_heads:
        return F.cross_entropy(logits.reshape(B * D, K), target.repeat_interleave(D), reduction="none",
                               label_smoothing=label_smoothing).view(B, D).mean(1)
    own = logits[torch.arange(B, device=logits.device), domain.long()]
    return F.cross_entropy(own, target, reduction="none", label_smoothing=label_smoothing)


def domain_cross_entropy(features, weight, bias, domain, target, *, all_heads=False, reduction="mean",
                         label_smoothing=0.0):
    return _reduce(domain_cross_entropy_rows(features, weight, bias, domain, target, all_heads, label_smoothing),
                   reduction)


def head_agreement_rows(features, weight, bias, kind):
    """kind 0 ('kl'): mean_d KL(p_d || mean_e p_e) (generalised Jensen-Shannon divergence);
    kind 1 ('sym_kl'): mean over unordered head pairs of KL(p_d||p_e) + KL(p_e||p_d)."""
    lp = torch.log_softmax(domain_fanout(features, weight, bias), dim=-1)  # [B, D, K]
    D = lp.shape[1]
    p = lp.exp()
    if kind in (0, "kl"):
        log_mean = torch.logsumexp(lp, dim=1, keepdim=True) - math.log(D)
        return (p * (lp - log_mean)).sum(-1).mean(1)
    pair = (p.unsqueeze(2) * (lp.unsqueeze(2) - lp.unsqueeze(1))).sum((1, 2, 3))  # ordered pairs
    return pair / (D * (D - 1) / 2)


def head_agreement(features, weight, bias=None, *, kind="kl", reduction="mean"):
    return _reduce(head_agreement_rows(features, weight, bias, kind), reduction)


def mapper_project(features, weight, bias=None, *, domain=None, residual=True, normalize=True):
    if domain is None:
        mapped = F.linear(features, weight, bias)
    else:
        every = torch.einsum("bf,def->bde", features, weight)  # every domain's map, then pick
        mapped = every[torch.arange(features.shape[0], device=features.device), domain.long()]
        if bias is not None:
            mapped = mapped + bias[domain.long()]
    out = features - mapped if residual else mapped
    return F.normalize(out, dim=-1) if normalize else out


def mapper_project_rows(features, weight, bias, domain, residual, normalize):
    """(mapped features, their norms before normalisation in float32/64, or [0] without normalize)."""
    out = mapper_project(features, weight, bias, domain=domain, residual=residual, normalize=False)
    if not normalize:
        return out, out.new_empty(0, dtype=acc_dtype(out.dtype))
    norm = torch.linalg.vector_norm(out.to(acc_dtype(out.dtype)), dim=-1)
    return F.normalize(out, dim=-1), norm


def cosine_cross_entropy(features, class_embeds, logit_scale, target, *, normalize=True, label_smoothing=0.0,
                         reduction="mean", ignore_index=-100):
    if normalize:
        features = F.normalize(features, dim=-1)
        class_embeds = F.normalize(class_embeds, dim=-1)
    if class_embeds.dim() == 2:
        logits = features @ class_embeds.t()
    else:
        logits = torch.einsum("be,bke->bk", features, class_embeds)
    logits = logit_scale * logits
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def cosine_cross_entropy_rows(features, class_embeds, logit_scale, target, normalize, label_smoothing, ignore_index):
    return cosine_cross_entropy(features, class_embeds, logit_scale, target, normalize=normalize,
                                label_smoothing=label_smoothing, reduction="none", ignore_index=ignore_index)


def _reduce(per, reduction):
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per
