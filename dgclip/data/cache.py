"""On-disk cache of frozen image features, keyed by model, dataset, files (split), transform and
requested fields. Written atomically (temp file + rename)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..backbone import CLIPBackbone, ImageFeatures

__all__ = ["feature_cache_key", "compute_features"]


def feature_cache_key(backbone: CLIPBackbone, dataset: str, paths: list[str], transform, *,
                      patches: bool, layer_stats: bool, weights_id: str = "") -> str:
    h = hashlib.sha256()
    h.update(json.dumps([backbone.name, backbone.pretrained, weights_id, dataset, repr(transform),
                         patches, layer_stats]).encode())
    h.update("\n".join(paths).encode())
    return h.hexdigest()[:24]


def compute_features(backbone: CLIPBackbone, dataset, *, batch_size: int = 256, patches=False,
                     layer_stats=False, cache_dir: Path | None = None, key: str | None = None,
                     progress: bool = False) -> ImageFeatures:
    """Features of every item of `dataset` ((image, label, domain) items), cached if key given."""
    path = Path(cache_dir) / f"{key}.pt" if cache_dir is not None and key else None
    if path is not None and path.exists():
        return ImageFeatures(**torch.load(path, map_location="cpu", weights_only=True))
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out = []
    for images, _, _ in tqdm(loader, desc="features", disable=not progress, leave=False):
        out.append(backbone.image_features(images, patches=patches, layer_stats=layer_stats).to("cpu"))
    feats = ImageFeatures.cat(out)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".pt.tmp")
        torch.save({k: v for k, v in feats.__dict__.items()}, tmp)
        tmp.replace(path)
    return feats
