"""SeeCLIP's duplex-contrastive and regularisation terms (small, on [N, K, E] text features)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def repulsion_loss(unknown: torch.Tensor, known: torch.Tensor, margin: float = 0.5, sign: float = 1.0) -> torch.Tensor:
    """mean over (b, k) of max(0, sign * (cos(unknown_b, known_{b,k}) - margin)); unknown [N, E], known [N, K, E].

    sign=+1 is the paper's repulsion; sign=-1 (max(0, margin - cos)) the released code's reversed term.
    """
    cos = torch.einsum("ne,nke->nk", F.normalize(unknown, dim=-1), F.normalize(known, dim=-1))
    return F.relu(sign * (cos - margin)).mean()


COH_CENTROIDS = ("image", "batch")


def cohesion_loss(unknown: torch.Tensor, known: torch.Tensor, centroid: str = "image") -> torch.Tensor:
    """MSE between the normalised unknown text feature and a centroid of the normalised known ones.

    centroid="image": per image, the mean over its C known prompts ([N, E]); "batch": one centroid
    over every image and class of the batch (the unknown prompts are pulled to a single point).
    """
    t = F.normalize(known, dim=-1)
    if centroid == "image":
        c = t.mean(dim=1)
    elif centroid == "batch":
        c = t.mean(dim=(0, 1)).expand(unknown.shape[0], -1)
    else:
        raise ValueError(f"coh_centroid must be one of {COH_CENTROIDS}, got {centroid!r}")
    return F.mse_loss(F.normalize(unknown, dim=-1), c)


def l1_regularizer(weight: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    if reduction == "sum":
        return weight.abs().sum()
    if reduction == "mean":
        return weight.abs().mean()
    raise ValueError(f"reg_reduction must be 'sum' or 'mean', got {reduction!r}")
