"""The embedded default: rotated digits from scikit-learn's bundled 8x8 digits.

1,797 digit images are split once (fixed seed) into two disjoint pools:
  * the DG pool (1,080 images): six disjoint chunks of 180, one per domain, rotated by
    0, 15, 30, 45, 60, 75 degrees (as RotatedMNIST in DomainBed) and written as 32x32 PNGs in the
    DomainBed layout ``<root>/rotated_digits/rot<angle>/<digit>/<n>.png``;
  * the pretraining pool (717 images): only ever seen by `dgclip pretrain` (dgclip/pretrain.py),
    with augmentations biased toward small angles, so strongly rotated domains are a real shift.
Rendering is batched (affine_grid + grid_sample), no per-image Python loop except file writing.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .catalog import ROTATIONS, get_spec

__all__ = ["digit_pools", "render_digits", "ensure_rotated_digits", "IMAGE_SIZE", "DG_POOL_SIZE"]

IMAGE_SIZE = 32
DG_POOL_SIZE = 1080
_POOL_SEED = 20240601


def digit_pools() -> dict:
    """{'dg': (images [N,8,8] float in 0..1, labels), 'pretrain': (...)}, disjoint and fixed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32) / 16.0
    labels = d.target.astype(np.int64)
    perm = np.random.RandomState(_POOL_SEED).permutation(len(labels))
    dg, pre = perm[:DG_POOL_SIZE], perm[DG_POOL_SIZE:]
    return {"dg": (images[dg], labels[dg]), "pretrain": (images[pre], labels[pre])}


def render_digits(images: np.ndarray | torch.Tensor, angles_deg, *, size: int = IMAGE_SIZE,
                  scale=1.0, shift=(0.0, 0.0)) -> torch.Tensor:
    """Batched render: 8x8 digits -> [N, size, size] in 0..1, rotated counter-clockwise.

    The digit fills 3/4 of the canvas before rotation (so rotated corners stay inside).
    scale / shift (in canvas fractions) may be per image ([N]) or scalars.
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    n = x.shape[0]
    x = F.interpolate(x[:, None], size=(size * 3 // 4,) * 2, mode="bilinear", align_corners=False)
    pad = (size - x.shape[-1]) // 2
    x = F.pad(x, (pad, size - x.shape[-1] - pad, pad, size - x.shape[-1] - pad))
    a = torch.as_tensor(angles_deg, dtype=torch.float32).expand(n) * (math.pi / 180.0)
    s = torch.as_tensor(scale, dtype=torch.float32).expand(n)
    sh = torch.as_tensor(shift, dtype=torch.float32)
    sh = sh.expand(n, 2) if sh.dim() == 1 else sh
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    # output->input sampling grid: inverse rotation (counter-clockwise image rotation)
    theta = torch.stack([torch.stack([cos, -sin, sh[:, 0]], 1), torch.stack([sin, cos, sh[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0].clamp(0, 1)


def _complete(base: Path) -> bool:
    return (base / ".complete").is_file()


def ensure_rotated_digits(root: os.PathLike) -> Path:
    """Write rotated-digits under root (once); atomic: built in a temp dir, then renamed."""
    from PIL import Image

    spec = get_spec("rotated-digits")
    root = Path(root)
    base = root / spec.dirname
    if _complete(base):
        return base
    if base.exists():
        raise RuntimeError(f"{base} exists but is incomplete (no .complete marker); remove it to rebuild")
    root.mkdir(parents=True, exist_ok=True)
    images, labels = digit_pools()["dg"]
    chunk = len(labels) // len(ROTATIONS)
    tmp = Path(tempfile.mkdtemp(prefix=".rotated_digits.", dir=root))
    try:
        for d_idx, (dom, angle) in enumerate(zip(spec.domains, ROTATIONS)):
            sl = slice(d_idx * chunk, (d_idx + 1) * chunk)
            arr = (render_digits(images[sl], float(angle)).numpy() * 255).round().astype(np.uint8)
            for c in spec.classes:
                (tmp / dom / c).mkdir(parents=True, exist_ok=True)
            for i, (img, lab) in enumerate(zip(arr, labels[sl])):  # file writing only
                Image.fromarray(img, mode="L").save(tmp / dom / str(lab) / f"{d_idx}_{i:04d}.png")
        (tmp / ".complete").write_text("rotated-digits v1\n")
        tmp.rename(base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return base
