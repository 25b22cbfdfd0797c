"""Public head ops: validation, backend choice, autograd wiring, reduction.

Index checks (`domain`, `target` in range) run on the host before any kernel launch in eager
mode: one min/max reduction per index tensor plus a device->host copy, i.e. one synchronisation
per call on GPU. That is the price of turning an out-of-range index into a ValueError instead of
garbage or a device-side assert. Under torch.compile the checks are traced device-side asserts
instead (see dgkernels._validate). The fused backends run behind the custom ops of .ops, the same
calls in eager and compiled code; the reference is plain PyTorch.
"""
from __future__ import annotations

import torch

from .. import _dispatch
from .._validate import (check_choice, check_index, check_positive_scalar, check_same_device, check_same_dtype,
                         check_tensor)
from . import ops
from . import reference as _ref

REDUCTIONS = ("mean", "sum", "none")


def _check_heads(features, weight, bias, *, weight_dims=(3,), bias_name="bias"):
    check_tensor("features", features, dims=2)
    check_tensor("weight", weight, dims=weight_dims)
    if bias is not None:
        check_tensor(bias_name, bias)
    device = check_same_device(features=features, weight=weight, bias=bias)
    check_same_dtype(features=features, weight=weight, bias=bias)
    return device


def _check_fanout(features, weight, bias):
    device = _check_heads(features, weight, bias)
    D, K, F = weight.shape
    if features.shape[1] != F:
        raise ValueError(f"features [B, F] and weight [D, K, F] disagree on F: features {tuple(features.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (D, K):
        raise ValueError(f"bias must have shape [D, K] = {(D, K)} to match weight {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")
    return device


def _select(op, device, backend, dtype, **sizes):
    """The backend name for inputs of `dtype` and the op's `sizes` (each backend declares its own
    limits); a constant while torch.compile traces."""
    return _dispatch.select_name(op, device, backend, _dispatch.call_facts(device, dtype, **sizes))


def domain_fanout(features, weight, bias=None, *, backend=None):
    """Every domain head on every sample: logits[b, d, k] = features[b] . weight[d, k] + bias[d, k].

    features [B, F], weight [D, K, F], bias [D, K] or None -> [B, D, K].
    """
    device = _check_fanout(features, weight, bias)
    name = _select("domain_fanout", device, backend, features.dtype)
    if name == "reference":
        return _ref.domain_fanout(features, weight, bias)
    return ops.domain_fanout(features, weight, bias, name)


def domain_cross_entropy(features, weight, bias, domain, target, *, all_heads=False, reduction="mean",
                         label_smoothing=0.0, backend=None):
    """Cross-entropy of each sample under its own domain's head, without building [B, D, K].

    features [B, F], weight [D, K, F], bias [D, K] or None, domain [B] (int, head of each sample;
    may be None when all_heads=True), target [B] (int class). all_heads=True: the mean over all D
    heads of each head's cross-entropy. reduction 'mean' | 'sum' | 'none' ([B]); label_smoothing as
    in F.cross_entropy. Gradients flow to features, weight and bias.
    """
    device = _check_fanout(features, weight, bias)
    D, K, _ = weight.shape
    B = features.shape[0]
    check_choice("reduction", reduction, REDUCTIONS)
    _check_smoothing(label_smoothing)
    if domain is None:
        if not all_heads:
            raise ValueError("domain [B] is required unless all_heads=True")
    else:
        check_index("domain", domain, D, length=B)
    check_index("target", target, K, length=B)
    check_same_device(features=features, domain=domain, target=target)
    name = _select("domain_cross_entropy_rows", device, backend, features.dtype)
    if name == "reference":
        return _ref.domain_cross_entropy(features, weight, bias, domain, target, all_heads=all_heads,
                                         reduction=reduction, label_smoothing=label_smoothing)
    args = (features, weight, bias, None if all_heads else domain, target, bool(all_heads), float(label_smoothing))
    return ops.domain_cross_entropy(args, reduction, name).to(features.dtype)


def head_agreement(features, weight, bias=None, *, kind="kl", reduction="mean", backend=None):
    """Disagreement among the D domain heads on each sample (what a domain-removing map drives down).

    p_d = softmax(features @ weight[d].T + bias[d]) for each head d.
    kind='kl': mean_d KL(p_d || m) with m = mean_d p_d, i.e. the generalised Jensen-Shannon
      divergence H(m) - mean_d H(p_d) (bounded by log D; 0 iff all heads agree).
    kind='sym_kl': mean over the D(D-1)/2 unordered head pairs of KL(p_d||p_e) + KL(p_e||p_d)
      (needs D >= 2).
    reduction over samples: 'mean' (default) | 'sum' | 'none' ([B]). Fused with the fan-out: the
    backward recomputes the logits block by block instead of keeping [B, D, K].
    """
    device = _check_fanout(features, weight, bias)
    check_choice("kind", kind, tuple(ops.KINDS))
    check_choice("reduction", reduction, REDUCTIONS)
    if kind == "sym_kl" and weight.shape[0] < 2:
        raise ValueError(f"kind='sym_kl' needs at least 2 heads, got weight {tuple(weight.shape)}")
    D, K, _ = weight.shape
    name = _select("head_agreement_rows", device, backend, features.dtype, D=D, K=K)
    if name == "reference":
        return _ref.head_agreement(features, weight, bias, kind=kind, reduction=reduction)
    return ops.head_agreement((features, weight, bias, ops.KINDS[kind]), reduction, name).to(features.dtype)


def mapper_project(features, weight, bias=None, *, domain=None, residual=True, normalize=True, backend=None):
    """Linear map of the features, optionally removing it from them, optionally L2-normalised.

    residual=True: f' = f - (f W^T + b) (removal of the mapped domain-specific component);
    residual=False: f' = f W^T + b. weight [E, F] (E == F when residual) shared by all samples, or
    [D, E, F] with domain [B] picking each sample's map (bias [E] or [D, E]). normalize=True
    returns f' / max(||f'||, 1e-12) as F.normalize does.
    """
    check_tensor("features", features, dims=2)
    check_tensor("weight", weight, dims=(2, 3))
    if bias is not None:
        check_tensor("bias", bias)
    device = check_same_device(features=features, weight=weight, bias=bias, domain=domain)
    check_same_dtype(features=features, weight=weight, bias=bias)
    B, F = features.shape
    E = weight.shape[-2]
    if weight.shape[-1] != F:
        raise ValueError(f"weight [.., E, F] must end in F = {F} (features {tuple(features.shape)}), "
                         f"got weight {tuple(weight.shape)}")
    if residual and E != F:
        raise ValueError(f"residual=True needs a square map (E == F), got weight {tuple(weight.shape)}")
    if weight.dim() == 3:
        if domain is None:
            raise ValueError(f"per-domain weight {tuple(weight.shape)} needs domain [B]")
        check_index("domain", domain, weight.shape[0], length=B)
    elif domain is not None:
        raise ValueError(f"domain given but weight {tuple(weight.shape)} is one shared map; use [D, E, F]")
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:-1]):
        raise ValueError(f"bias must have shape {tuple(weight.shape[:-1])} for weight {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")
    name = _select("mapper_project_rows", device, backend, features.dtype)
    if name == "reference":
        return _ref.mapper_project(features, weight, bias, domain=domain, residual=residual, normalize=normalize)
    return ops.mapper_project(features, weight, bias, domain, bool(residual), bool(normalize), name)[0]


def cosine_cross_entropy(features, class_embeds, logit_scale, target, *, normalize=True, label_smoothing=0.0,
                         reduction="mean", ignore_index=-100, backend=None):
    """Cross-entropy over logit_scale * normalize(features) @ normalize(class_embeds).T, fused.

    features [B, E]; class_embeds [K, E] shared, or [B, K, E] per sample (instance-conditioned
    prompts); logit_scale a positive float or one-element tensor (gets a gradient when it requires
    one; its dtype may differ from the features'); target [B] in [0, K) or ignore_index. The [B, K]
    logits are never stored: the fused backends stream over blocks of classes/rows with an online
    log-sum-exp and recompute in the backward. label_smoothing, reduction and ignore_index behave
    as in F.cross_entropy (mean = over non-ignored samples).
    """
    check_tensor("features", features, dims=2)
    check_tensor("class_embeds", class_embeds, dims=(2, 3))
    check_positive_scalar("logit_scale", logit_scale)
    device = check_same_device(features=features, class_embeds=class_embeds, target=target,
                               logit_scale=logit_scale if isinstance(logit_scale, torch.Tensor) else None)
    check_same_dtype(features=features, class_embeds=class_embeds)
    check_choice("reduction", reduction, REDUCTIONS)
    _check_smoothing(label_smoothing)
    B, E = features.shape
    if class_embeds.shape[-1] != E or (class_embeds.dim() == 3 and class_embeds.shape[0] != B):
        want = "[K, E] or [B, K, E]"
        raise ValueError(f"class_embeds must be {want} with B = {B}, E = {E} (features {tuple(features.shape)}), "
                         f"got {tuple(class_embeds.shape)}")
    K = class_embeds.shape[-2]
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_index("target", target, K, length=B, ignore_index=ignore_index)
    name = _select("cosine_cross_entropy_rows", device, backend, features.dtype)
    if name == "reference":
        return _ref.cosine_cross_entropy(features, class_embeds, logit_scale, target, normalize=normalize,
                                         label_smoothing=label_smoothing, reduction=reduction,
                                         ignore_index=ignore_index)
    if isinstance(logit_scale, torch.Tensor):
        scale = logit_scale
    else:
        # a fill kernel (torch.full): no host->device copy, which on CUDA waits for the stream
        scale = torch.full((), float(logit_scale), dtype=torch.float32, device=device)
    args = (features, class_embeds, scale, target, bool(normalize), float(label_smoothing), int(ignore_index))
    return ops.cosine_cross_entropy(args, reduction, name).to(features.dtype)


def _check_smoothing(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {value!r}")
