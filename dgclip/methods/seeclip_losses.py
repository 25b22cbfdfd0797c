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


COH_CENTROIDS = ("released", "image", "batch")


def cohesion_loss(unknown: torch.Tensor, known: torch.Tensor, centroid: str = "released",
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """L_coh on L2-normalised text features.

    centroid="released" (the released code's form): MSE(mean_b u_b, mean_b t_{b, y_b}), the batch
    mean of the unknown text feature against the batch mean of each sample's OWN-class text
    feature, over the known samples (labels < C; needs `labels`).
    "image": MSE(u_b, mean_k t_{b,k}) per image; "batch": MSE(u_b, mean_{b,k} t_{b,k}).
    """
    t = F.normalize(known, dim=-1)
    if centroid == "released":
        if labels is None:
            raise ValueError("coh_centroid='released' needs the labels")
        keep = labels < known.shape[1]
        if not bool(keep.any()):
            return unknown.new_zeros(())
        rows = torch.nonzero(keep).squeeze(1)
        own = t[rows, labels[rows]]  # [N_known, E]
        return F.mse_loss(F.normalize(unknown[rows], dim=-1).mean(0), own.mean(0))
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
