"""Images cross from the loader to the device as uint8; the float conversion and the normalisation
run on the device, once per batch (the idea of timm's PrefetchLoader and FFCV).

Why: a transform's trailing ToTensor + Normalize turn a 150 KB uint8 image into 600 KB of float32
in three passes. Done in a worker, that is ~40% of its CPU per image (measured on a 2-core
machine, one thread, 32 RandomResizedCrop 224 px JPEGs: 89 ms per batch with them, 56 ms
without), and 4x the bytes through shared memory and the pinned host-to-device copy. On an
accelerator the same arithmetic is one elementwise pass over the batch.

`split_device_stage(transform)` returns (host_transform, device_stage): the host transform ends
in `ToUint8` instead of ToTensor + Normalize, and `device_stage` (a `DeviceNormalize`, or None
when the transform does not end that way and images stay float) is applied to the collated batch
once it is on its device. uint8 images stay in the [H, W, C] layout PIL decodes to, so the host
never transposes (stacking 32 CHW views of HWC pixels took 4.8 ms on one thread here, 1.3 ms for
contiguous HWC); the device stage transposes while it converts. It repeats ToTensor's and
Normalize's operations in their order (x / 255, then - mean, then / std, in float32), so on the
CPU the images are bit-identical to the host transform's, [B, C, H, W] and contiguous; on CUDA
the / 255 divides by a device tensor, because dividing by a CPU scalar would make PyTorch
multiply by its reciprocal (one ulp apart).

Where the device stage runs (`stage_in_loader`): on an accelerator, after the batch's copy to it.
When the run's device is the CPU, "the device" is the cores the loader workers run on, and a stage
in the main process would be serial work beside them (measured here, 2 workers: normalising in the
main process took its share of the 2 cores and left 2 workers at 0.99x the images/s of 0 workers),
so the loader applies it right after collation, in the workers, still batched and into the
shared-memory batch.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

__all__ = ["ToUint8", "DeviceNormalize", "split_device_stage", "finish_images", "stage_in_loader"]

# PIL modes whose pixels are 8-bit: to_tensor(img) == pil_to_tensor(img) / 255 exactly for these.
_BYTE_MODES = frozenset({"L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "HSV", "LAB", "RGBX", "La", "RGBa"})


class ToUint8:
    """Host half of ToTensor: PIL image -> uint8 [H, W, C] (the transpose and / 255 happen on the device).

    A PIL image whose pixels are not bytes (modes "I", "F", "I;16", ...) or an ndarray goes through
    to_tensor itself, as ToTensor would ([C, H, W]; to_tensor does not divide those by 255 either);
    mode "1" is converted to "L" first (to_tensor maps it to 0/1, "L" gives 0/255, i.e. 0/1 after
    / 255). A float tensor passes through, like open_clip's MaybeToTensor; a uint8 tensor is refused
    (its layout is unknown, and Normalize would have refused it too).
    """

    def __call__(self, pic):
        if isinstance(pic, torch.Tensor):
            if not pic.is_floating_point():
                raise TypeError(f"ToUint8 takes PIL images or float tensors, got a {pic.dtype} tensor")
            return pic
        if isinstance(pic, Image.Image):
            if pic.mode == "1":
                pic = pic.convert("L")
            if pic.mode in _BYTE_MODES:
                return torch.from_numpy(np.array(pic, copy=True)).view(pic.size[1], pic.size[0], len(pic.getbands()))
        return TF.to_tensor(pic)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DeviceNormalize:
    """Device half of ToTensor + Normalize, on a batch on any device: uint8 [..., H, W, C] ->
    float32 [..., C, H, W] (contiguous) / 255, then (x - mean) / std; a float batch [..., C, H, W]
    (see ToUint8) is only normalised.
    The per-device constants are made once per device (a fresh CUDA tensor per batch would copy
    from the host and wait for it).
    """

    def __init__(self, mean, std):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if any(s == 0 for s in self.std):
            raise ValueError(f"std evaluated to zero after conversion to float: {self.std}")
        self._consts: dict = {}

    def _constants(self, device: torch.device):
        key = str(device)
        if key not in self._consts:
            shape = (len(self.mean), 1, 1)
            self._consts[key] = (torch.tensor(255.0, device=device),
                                 torch.tensor(self.mean, device=device).view(shape),
                                 torch.tensor(self.std, device=device).view(shape))
        return self._consts[key]

    def __call__(self, images: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The normalised batch; written into `out` (float32 [..., C, H, W], contiguous) when given."""
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        channels = images.shape[-1] if images.dtype == torch.uint8 else images.shape[-3] if images.dim() >= 3 else 0
        if images.dim() < 3 or channels != len(self.mean):
            raise ValueError(f"images have {channels} channels, the normalisation {len(self.mean)} "
                             f"(shape {tuple(images.shape)}; uint8 is [..., H, W, C], float [..., C, H, W])")
        scale, mean, std = self._constants(images.device)
        src = images.movedim(-1, -3) if images.dtype == torch.uint8 else images
        if out is None:  # one pass: transpose and convert
            x = src.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        else:
            if out.shape != src.shape or out.dtype != torch.float32 or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous float32 {tuple(src.shape)}, got {out.dtype} "
                                 f"{tuple(out.shape)}")
            x = out.copy_(src)
        if images.dtype == torch.uint8:
            x.div_(scale)
        return x.sub_(mean).div_(std)

    def output_shape(self, images: torch.Tensor) -> tuple:
        return tuple(images.movedim(-1, -3).shape) if images.dtype == torch.uint8 else tuple(images.shape)

    def __getstate__(self):  # the cached device tensors stay behind (a CUDA tensor cannot be pickled to a worker)
        return {"mean": self.mean, "std": self.std, "_consts": {}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def split_device_stage(transform: Callable) -> tuple[Callable, Optional[DeviceNormalize]]:
    """(host transform, device stage) for `transform`; (transform, None) when it cannot be split.

    Splits a torchvision Compose whose last two steps are a ToTensor (or subclass, e.g. open_clip's
    MaybeToTensor) and a Normalize; a Compose whose last step is such a Compose (a method's
    augmentation followed by the backbone's transform); and GOPro's MultiViewTransform (its views
    share one base transform). The input transform is not modified.
    """
    from ..methods.views import MultiViewTransform

    if isinstance(transform, MultiViewTransform):
        host, stage = split_device_stage(transform.base)
        if stage is None:
            return transform, None
        out = copy.copy(transform)
        out.base = host
        return out, stage
    if not isinstance(transform, T.Compose) or not transform.transforms:
        return transform, None
    steps = list(transform.transforms)
    if len(steps) >= 2 and isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize):
        return T.Compose(steps[:-2] + [ToUint8()]), DeviceNormalize(steps[-1].mean, steps[-1].std)
    host, stage = split_device_stage(steps[-1])
    if stage is None:
        return transform, None
    return T.Compose(steps[:-1] + [host]), stage


def finish_images(images, stage: Optional[DeviceNormalize]):
    """Apply the device stage to a batch's images (a tensor or a dict of views), where they are."""
    if stage is None or images is None:
        return images
    return {k: stage(v) for k, v in images.items()} if isinstance(images, dict) else stage(images)


def stage_in_loader(device) -> bool:
    """Whether the loader applies the device stage itself (a CPU run; see the module docstring)."""
    return torch.device(device).type == "cpu"
