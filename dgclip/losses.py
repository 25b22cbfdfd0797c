"""Contrastive loss entry point for dgclip: `dgkernels.clip_loss` when it is available.

Until the dgkernels op lands, `clip_loss` falls back to a plain-PyTorch symmetric InfoNCE with the
same signature (features gathered across ranks with gradients when a process group is given or
initialised), so callers never change.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["clip_loss"]


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x, group=group), dim=0)


def _reference_clip_loss(image_features, text_features, logit_scale, *, normalize=True, group=None):
    if normalize:
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
    all_img, all_txt = _gather(image_features, group), _gather(text_features, group)
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    n = image_features.shape[0]
    target = torch.arange(n, device=image_features.device) + rank * n
    li = logit_scale * image_features @ all_txt.t()
    lt = logit_scale * text_features @ all_img.t()
    return 0.5 * (F.cross_entropy(li.float(), target) + F.cross_entropy(lt.float(), target))


def clip_loss(image_features, text_features, logit_scale, *, normalize=True, group=None):
    """Symmetric CLIP loss over the (global) batch; delegates to dgkernels when present."""
    try:
        import dgkernels

        fn = getattr(dgkernels, "clip_loss", None)
    except ImportError:  # pragma: no cover
        fn = None
    if fn is not None:
        return fn(image_features, text_features, logit_scale, normalize=normalize, group=group)
    return _reference_clip_loss(image_features, text_features, logit_scale, normalize=normalize, group=group)
