"""Dassl's learning-rate schedule for the CoOp-suite configs, epoch by epoch.

`CosineAnnealingLR(T_max=MAX_EPOCH)` stepped once per epoch, behind a "constant" warm-up that
holds WARMUP_CONS_LR for WARMUP_EPOCH epochs, with WARMUP_RECOUNT (Dassl
`dassl/optim/lr_scheduler.py` L35-54, L128-141; `defaults.py` L185; CoOp configs set 1 epoch at
1e-5). Worked through that code: epoch 0 runs at the warm-up lr, epoch e >= 1 at
lr * (1 + cos(pi * (e - 1) / MAX_EPOCH)) / 2, so the last epoch never reaches 0.
The lr is constant within an epoch; this LambdaLR is stepped once per optimiser step (as the
methods step their schedulers) and reads the epoch off the step count.
"""
from __future__ import annotations

import math

import torch

__all__ = ["dassl_epoch_lr", "dassl_scheduler"]


def dassl_epoch_lr(epoch: int, base_lr: float, max_epoch: int, warmup_epochs: int = 1,
                   warmup_lr: float = 1e-5) -> float:
    if epoch < warmup_epochs:
        return warmup_lr
    e = epoch - warmup_epochs if warmup_epochs > 0 else epoch
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * e / max_epoch))


def dassl_scheduler(optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, max_epoch: int,
                    warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> torch.optim.lr_scheduler.LambdaLR:
    if steps_per_epoch < 1 or max_epoch < 1:
        raise ValueError(f"steps_per_epoch and max_epoch must be >= 1, got {steps_per_epoch}, {max_epoch}")
    for g in optimizer.param_groups:  # LambdaLR multiplies the group's initial lr
        g.setdefault("initial_lr", g["lr"])
    bases = [g["initial_lr"] for g in optimizer.param_groups]

    def factor(step: int, base: float) -> float:
        return dassl_epoch_lr(step // steps_per_epoch, base, max_epoch, warmup_epochs, warmup_lr) / base

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s, b=b: factor(s, b) for b in bases])
