"""Optimiser and schedule helpers shared by the methods of this package."""
from __future__ import annotations

import math

import torch


def make_optimizer(kind: str, params, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    """params: parameters or param-group dicts (a group's own "lr" etc. win over the arguments)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}; expected 'sgd', 'adamw' or 'adam'")


def cosine_with_constant_warmup(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                                warmup_lr: float = 1e-5) -> torch.optim.lr_scheduler.LambdaLR:
    """CoOp's schedule: a constant warm-up lr for `warmup_steps`, then cosine from the base lr to 0
    over the remaining steps (total_steps <= 0: constant base lr after warm-up)."""
    base = [g["lr"] for g in optimizer.param_groups]

    def factor(i: int, base_lr: float) -> float:
        if i < warmup_steps:
            return warmup_lr / base_lr
        if total_steps <= 0:
            return 1.0
        t = min(1.0, (i - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda i, b=b: factor(i, b) for b in base])
