"""GOPro's three training views, built in the data loader from the raw (PIL) image.

original: random resized crop + horizontal flip; moco: MoCo-v3 style (crop scale 0.08-1, colour
jitter 0.4/0.4/0.2/0.1 with p=0.8, grayscale p=0.2, Gaussian blur sigma 0.1-2, flip); augmix:
the original view's crop + flip, then AugMix (3 chains of 1-3 ops, severity 1, Dirichlet(1,1,1)
weights, Beta(1,1) mix) over TPT's op list (augmix_ops="tpt": shear, translate, rotate,
posterize, solarize, autocontrast, equalize; no colour/contrast/brightness/sharpness ops), or
torchvision's full list ("torchvision").
Every view is augmented at the image's own resolution and then passed through the backbone's
`base_transform` (resize, crop, to tensor, normalise), so the augmentations see raw pixels, never
normalised tensors (the released code's mistake), and each view is of its own image.
"""
from __future__ import annotations

import random

from PIL import Image, ImageFilter
from torchvision import transforms as T


class PILGaussianBlur:
    """Blur with a radius drawn uniformly from [sigma_min, sigma_max] (MoCo v3's recipe)."""

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 2.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.sigma_min, self.sigma_max)))


class _OwnSizeCrop:
    """RandomResizedCrop back to the image's own size (the base transform resizes afterwards),
    bicubic as the CoOp/GOPro configs (INPUT.INTERPOLATION "bicubic"; Dassl's own default is
    bilinear)."""

    def __init__(self, scale: tuple[float, float]):
        self.scale = scale

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        return T.RandomResizedCrop((h, w), scale=self.scale, interpolation=T.InterpolationMode.BICUBIC)(img)


def _flip(hflip: bool) -> list:
    # Mirroring changes what a digit (or text) means: a dataset-level switch, on for natural images.
    return [T.RandomHorizontalFlip()] if hflip else []


def original_view(crop_scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True) -> T.Compose:
    return T.Compose([_OwnSizeCrop(crop_scale), *_flip(hflip)])


def moco_view(blur_p: float = 1.0, crop_scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True) -> T.Compose:
    return T.Compose([
        _OwnSizeCrop(crop_scale),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([PILGaussianBlur(0.1, 2.0)], p=blur_p),
        *_flip(hflip),
    ])


AUGMIX_OPS = ("tpt", "torchvision")


def augmix_view(ops: str = "tpt", crop_scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True) -> T.Compose:
    if ops not in AUGMIX_OPS:
        raise ValueError(f"augmix_ops must be one of {AUGMIX_OPS}, got {ops!r}")
    # torchvision's all_ops=False is exactly AugMix's original (and TPT's) list
    mix = T.AugMix(severity=1, mixture_width=3, chain_depth=-1, alpha=1.0, all_ops=ops == "torchvision")
    return T.Compose([_OwnSizeCrop(crop_scale), *_flip(hflip), mix])


class MultiViewTransform:
    """PIL image -> {"original": tensor, "moco": tensor, "augmix": tensor}."""

    def __init__(self, base_transform, *, crop_scale: tuple[float, float] = (0.08, 1.0), blur_p: float = 1.0,
                 hflip: bool = True, augmix_ops: str = "tpt"):
        self.base = base_transform
        self.views = {"original": original_view(crop_scale, hflip), "moco": moco_view(blur_p, crop_scale, hflip),
                      "augmix": augmix_view(augmix_ops, crop_scale, hflip)}

    def __call__(self, img: Image.Image) -> dict:
        img = img.convert("RGB")
        return {name: self.base(aug(img)) for name, aug in self.views.items()}
