"""`dgclip pretrain`: contrastive pretraining of the embedded tiny CLIP on captioned digits.

Images come only from the pretraining pool (disjoint from the DG pool, see
dgclip/data/embedded.py), rendered on the fly with rotations drawn from a half-normal
(sigma `angle_sigma` degrees, random sign) so small angles dominate, plus scale/shift jitter.
Captions pair each image with a random template ("a photo of the number seven.", ...); half of
them (`oriented_caption_p`) also say how the digit is turned ("a photo of the tilted number
seven."), as some web captions name a style ("a sketch of a dog"), so the text tower knows words
that prompt learning can find. The loss is `dgkernels.clip_loss` (symmetric InfoNCE) at a large
batch. Weights are written atomically to
``<cache>/tiny-digits/weights.pt``; an existing file is reused unless --force.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data.catalog import DIGIT_WORDS
from .data.embedded import digit_pools, render_digits
from dgkernels import clip_loss
from .tiny_clip import TINY_MEAN, TINY_STD, build_tiny_model, weights_path

__all__ = ["PRETRAIN_TEMPLATES", "ORIENTED_TEMPLATES", "ORIENTATIONS", "CaptionTable", "pretrain_tiny_clip",
           "normalise_digits", "DEFAULTS"]

PRETRAIN_TEMPLATES = (
    "a photo of the number {}.", "a photo of the digit {}.", "a handwritten {}.", "the number {}.",
    "an image of the digit {}.", "a drawing of the number {}.", "a picture of a {}.", "a {}.",
)
ORIENTED_TEMPLATES = ("a photo of the {} number {}.", "a {} {}.", "a {} handwritten {}.", "an image of the {} digit {}.")
ORIENTATIONS = ((8.0, "upright"), (25.0, "slightly tilted"), (50.0, "tilted"), (float("inf"), "sideways"))
# lr 1e-3: at 3e-3 some seeds collapse (loss stuck at log(batch), every feature the same).
DEFAULTS = {"steps": 250, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.1, "warmup": 20,
            "angle_sigma": 12.0, "oriented_caption_p": 0.5, "seed": 0}


def normalise_digits(gray: torch.Tensor) -> torch.Tensor:
    """[N, H, W] in 0..1 -> normalised [N, 3, H, W] (the tiny model's eval transform, batched)."""
    x = gray[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(TINY_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(TINY_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _batch(images, labels, gen: torch.Generator, n: int, angle_sigma: float):
    idx = torch.randint(len(labels), (n,), generator=gen)
    ang = torch.randn(n, generator=gen).abs() * angle_sigma * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.12
    gray = render_digits(images[idx], ang, scale=scale, shift=shift)
    gray = (gray + 0.03 * torch.randn(gray.shape, generator=gen)).clamp(0, 1)
    return normalise_digits(gray), labels[idx], ang


class CaptionTable:
    """Every caption tokenised once; captions for a batch are rows picked by index (no tokeniser call)."""

    def __init__(self, tokenizer):
        words = DIGIT_WORDS
        self.plain = tokenizer([t.format(w) for t in PRETRAIN_TEMPLATES for w in words]).view(
            len(PRETRAIN_TEMPLATES), len(words), -1)
        self.oriented = tokenizer([t.format(o, w) for t in ORIENTED_TEMPLATES for _, o in ORIENTATIONS for w in words]
                                  ).view(len(ORIENTED_TEMPLATES), len(ORIENTATIONS), len(words), -1)

    @staticmethod
    def orientation(angle_deg: torch.Tensor) -> torch.Tensor:
        """Index into ORIENTATIONS of each |angle|."""
        return torch.bucketize(angle_deg.abs(), torch.tensor([b for b, _ in ORIENTATIONS[:-1]]))

    def sample(self, labels: torch.Tensor, angle_deg: torch.Tensor, oriented_p: float, gen: torch.Generator) -> torch.Tensor:
        """[N, L] token ids: a random plain template, or with probability oriented_p an oriented one."""
        n = len(labels)
        text = self.plain[torch.randint(len(PRETRAIN_TEMPLATES), (n,), generator=gen), labels]
        oriented = torch.rand(n, generator=gen) < oriented_p
        tmpl = torch.randint(len(ORIENTED_TEMPLATES), (n,), generator=gen)
        return torch.where(oriented[:, None], self.oriented[tmpl, self.orientation(angle_deg), labels], text)


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images, labels) -> float:
    texts = tokenizer([f"a photo of the number {w}." for w in DIGIT_WORDS])
    t = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)
    f = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    return float(((f @ t.t()).argmax(1) == labels).float().mean())


def pretrain_tiny_clip(cache_dir: Optional[Path] = None, *, force: bool = False, progress: bool = True,
                       **overrides) -> Path:
    """Pretrain (or reuse) the tiny CLIP; returns the weights path."""
    cfg = {**DEFAULTS, **overrides}
    out = weights_path("tiny-digits", cache_dir)
    if out.exists() and not force:
        return out
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    model, tokenizer = build_tiny_model("tiny-digits", cache_dir)
    model.train()
    images, labels = (torch.as_tensor(a) for a in digit_pools()["pretrain"])
    captions = CaptionTable(tokenizer)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"])
    steps, warm = cfg["steps"], cfg["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(steps - warm, 1))))
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc="pretrain tiny-digits", disable=not progress)
    t0 = time.time()
    for _ in bar:
        x, y, ang = _batch(images, labels, gen, cfg["batch_size"], cfg["angle_sigma"])
        text = captions.sample(y, ang, cfg["oriented_caption_p"], gen)
        img_f = model.encode_image(x)
        txt_f = model.encode_text(text)
        loss = clip_loss(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    dg_images, dg_labels = (torch.as_tensor(a) for a in digit_pools()["dg"])
    zs = {}
    for angle in (0, 45, 75):
        x = normalise_digits(render_digits(dg_images, float(angle)))
        zs[f"rot{angle}"] = zero_shot_accuracy(model, tokenizer, x, dg_labels)
    meta = {"config": cfg, "seconds": round(time.time() - t0, 1), "zero_shot_dg_pool": zs,
            "templates": PRETRAIN_TEMPLATES, "oriented_templates": ORIENTED_TEMPLATES,
            "orientations": [[b, o] for b, o in ORIENTATIONS]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".pt.tmp")
    torch.save({"model": model.state_dict(), "meta": meta}, tmp)
    tmp.replace(out)
    (out.parent / "pretrain.json").write_text(json.dumps(meta, indent=2))
    return out
