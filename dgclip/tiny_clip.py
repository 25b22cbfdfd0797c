"""The embedded tiny CLIP: an open_clip config small enough for a CPU.

The config is registered with open_clip through `open_clip.add_model_config` (a JSON file written
into the cache directory), so open_clip builds it like any other model; nothing in open_clip is
edited. Weights come from `dgclip pretrain` (see dgclip/pretrain.py) and are cached under
``<cache>/tiny-digits/weights.pt``. This module does not know the backbone wrapper:
`dgclip.backbone` imports it (one direction only) and wraps the model in a `CLIPBackbone`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from .paths import default_cache_dir

__all__ = ["EMBEDDED_MODELS", "TINY_DIGITS_CONFIG", "register_configs", "weights_path", "build_tiny_model",
           "tiny_transform"]

# 32x32 images, 8x8 patches (16 tokens + class token), 3 vision / 2 text layers of width 64,
# 64-d embeddings, 24-token context (fits CoOp's 16 context tokens + a class name).
TINY_DIGITS_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
EMBEDDED_MODELS = {"tiny-digits": TINY_DIGITS_CONFIG}
# Digits images are greyscale strokes on black: normalise around their own statistics.
TINY_MEAN = (0.2, 0.2, 0.2)
TINY_STD = (0.3, 0.3, 0.3)


def _cache(cache_dir: Optional[Path]) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def register_configs(cache_dir: Optional[Path] = None) -> None:
    """Write the embedded configs as JSON and hand them to open_clip (idempotent)."""
    import open_clip

    cfg_dir = _cache(cache_dir) / "model_configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    missing = False
    for name, cfg in EMBEDDED_MODELS.items():
        path = cfg_dir / f"{name}.json"
        text = json.dumps(cfg, indent=2)
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        missing |= name not in open_clip.list_models()
    if missing:
        open_clip.add_model_config(cfg_dir)


def weights_path(name: str = "tiny-digits", cache_dir: Optional[Path] = None) -> Path:
    return _cache(cache_dir) / name / "weights.pt"


def build_tiny_model(name: str = "tiny-digits", cache_dir: Optional[Path] = None, device="cpu"):
    """A randomly initialised embedded model, its tokenizer and eval transform."""
    import open_clip

    register_configs(cache_dir)
    # open_clip warns "No pretrained weights loaded ... initialized randomly" on the root logger;
    # the embedded weights are loaded right after from the project's cache, so that is misleading.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(name, pretrained=None, device=device)
    finally:
        root.setLevel(level)
    tokenizer = open_clip.get_tokenizer(name)
    return model, tokenizer


def tiny_transform(image_size: int = 32, train: bool = False):
    from torchvision import transforms as T  # noqa: F401  (torchvision ships with open_clip)

    ops = [T.Grayscale(num_output_channels=3), T.Resize((image_size, image_size))]
    ops += [T.ToTensor(), T.Normalize(TINY_MEAN, TINY_STD)]
    return T.Compose(ops)
