"""Dassl's image transforms as the CoOp configs set them (`configs/trainers/CoOp/vit_b16_ep50.yaml`
L8-13; Dassl `dassl/data/transforms/transforms.py` L206-354).

train: RandomResizedCrop(size, scale=(0.08, 1), bicubic) -> RandomHorizontalFlip(0.5) -> ToTensor
       -> Normalize(CLIP mean/std)
test:  Resize(shorter side = size, bicubic) -> CenterCrop(size) -> ToTensor -> Normalize, which is
       what open_clip's validation transform for the OpenAI ViT-B/16 does; the backbone's own
       validation transform is used for testing.
"""
from __future__ import annotations

from torchvision import transforms as T

__all__ = ["dassl_train_transform", "RRCROP_SCALE"]

RRCROP_SCALE = (0.08, 1.0)  # Dassl defaults.py L40 (INPUT.RRCROP_SCALE), not overridden by CoOp


def _find(tf, kind):
    steps = getattr(tf, "transforms", [tf])
    for s in steps:
        if isinstance(s, kind):
            return s
    return None


def dassl_train_transform(eval_transform) -> T.Compose:
    """The Dassl train transform at the size and normalisation of the backbone's eval transform
    (the output size is its CenterCrop's, or its Resize's when that is a fixed (h, w)); steps of the
    eval transform that are neither geometry nor tensor conversion (e.g. a grayscale conversion a
    model needs) run first, unchanged."""
    steps = list(getattr(eval_transform, "transforms", [eval_transform]))
    norm = _find(eval_transform, T.Normalize)
    crop = _find(eval_transform, T.CenterCrop)
    resize = _find(eval_transform, T.Resize)
    size = None
    if crop is not None:
        size = crop.size
    elif resize is not None and isinstance(resize.size, (tuple, list)) and len(resize.size) == 2:
        size = resize.size
    if norm is None or size is None:
        raise ValueError("the backbone's eval transform has no CenterCrop (or fixed Resize) and Normalize to take "
                         f"the size and normalisation from: {eval_transform!r}")
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    keep = [s for s in steps if not isinstance(s, (T.Resize, T.CenterCrop, T.ToTensor, T.Normalize))
            and type(s).__name__ not in ("MaybeToTensor", "_convert_to_rgb")]
    return T.Compose([
        *keep,
        T.RandomResizedCrop(size, scale=RRCROP_SCALE, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(norm.mean, norm.std),
    ])
