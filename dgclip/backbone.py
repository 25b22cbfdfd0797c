"""Frozen open_clip backbones and one-pass feature extraction.

`load_backbone` builds an open_clip CLIP (pretrained weights, random weights with
``pretrained="none"``, or the project's embedded tiny CLIP), freezes it and wraps it in
`CLIPBackbone`. `CLIPBackbone.image_features` runs the frozen image tower once and returns the
pooled embedding, optionally the projected patch tokens (SeeCLIP) and per-layer token statistics
(GOPro), captured with forward hooks that live only for that call (no monkey-patching).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

import dgkernels

from . import tiny_clip
from .paths import default_cache_dir

__all__ = ["ImageFeatures", "CLIPBackbone", "load_backbone", "load_tiny_backbone", "default_cache_dir",
           "BackboneError"]


class BackboneError(RuntimeError):
    """A backbone could not be built (unknown name, missing weights offline, ...)."""



@dataclass
class ImageFeatures:
    """Outputs of one frozen image-tower forward.

    pooled:     [B, E] image embedding (= model.encode_image, not normalised).
    patches:    [B, P, E] final patch tokens -> ln_post -> proj (None unless asked for).
    layer_mean: [B, L, W] per-layer token mean over all tokens (None unless asked for).
    layer_std:  [B, L, W] per-layer population std over all tokens.
    """

    pooled: torch.Tensor
    patches: Optional[torch.Tensor] = None
    layer_mean: Optional[torch.Tensor] = None
    layer_std: Optional[torch.Tensor] = None

    def to(self, *args, **kwargs) -> "ImageFeatures":
        return replace(self, **{f.name: (getattr(self, f.name).to(*args, **kwargs)
                                         if getattr(self, f.name) is not None else None)
                                for f in fields(self)})

    def index(self, idx) -> "ImageFeatures":
        return replace(self, **{f.name: (getattr(self, f.name)[idx]
                                         if getattr(self, f.name) is not None else None)
                                for f in fields(self)})

    def __len__(self) -> int:
        return self.pooled.shape[0]

    @staticmethod
    def cat(items: list["ImageFeatures"]) -> "ImageFeatures":
        out = {}
        for f in fields(ImageFeatures):
            vals = [getattr(it, f.name) for it in items]
            out[f.name] = None if any(v is None for v in vals) else torch.cat(vals)
        return ImageFeatures(**out)

    def has(self, *, patches: bool = False, layer_stats: bool = False) -> bool:
        return (not patches or self.patches is not None) and (
            not layer_stats or self.layer_mean is not None)


class CLIPBackbone(nn.Module):
    """A frozen open_clip CLIP plus its tokenizer and preprocessing transforms.

    The wrapped model never trains: parameters have requires_grad=False and `train()` is a no-op
    that keeps it in eval mode. On CUDA the towers run under bf16 autocast (LayerNorms compute in
    fp32 under autocast); on CPU they run in fp32 unless ``autocast_dtype`` says otherwise.
    """

    def __init__(self, model: nn.Module, tokenizer, *, name: str = "custom", pretrained: str = "none",
                 preprocess_train=None, preprocess_val=None, autocast_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.pretrained = pretrained
        self.preprocess_train = preprocess_train
        self.preprocess_val = preprocess_val
        self._autocast_dtype = autocast_dtype
        self.weights_id = ""  # identifies the weights in feature-cache keys
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        visual = getattr(model, "visual", None)
        self._is_vit = visual is not None and hasattr(visual, "transformer") and hasattr(visual, "ln_post")

    # frozen forever
    def train(self, mode: bool = True):  # noqa: D401 - nn.Module API
        super().train(False)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, nn.Linear):
            return proj.out_features
        if proj is not None:
            return proj.shape[1]
        return self.model.visual.output_dim

    @property
    def text_width(self) -> int:
        return self.model.token_embedding.weight.shape[1]

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().item())

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def num_layers(self) -> int:
        self._require_vit("layer statistics")
        return len(self.model.visual.transformer.resblocks)

    @property
    def vision_width(self) -> int:
        self._require_vit("layer statistics")
        return int(self.model.visual.transformer.width)

    def autocast(self):
        dev = self.device
        dtype = self._autocast_dtype
        if dtype is None and dev.type == "cuda":
            dtype = torch.bfloat16
        if dtype is None or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=dev.type, dtype=dtype)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model.encode_image(images.to(self.device)).float()

    @torch.no_grad()
    def encode_text(self, texts) -> torch.Tensor:
        tokens = self.tokenize(texts) if isinstance(texts, (list, tuple)) else texts.to(self.device)
        with self.autocast():
            # exact drop-in for model.encode_text, truncated to the longest EOT
            return dgkernels.encode_text(self.model, tokens).float()

    def _require_vit(self, what: str):
        if not self._is_vit:
            raise BackboneError(f"{what} need an open_clip VisionTransformer image tower; "
                                f"{self.name} has {type(getattr(self.model, 'visual', None)).__name__}")

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, *, patches: bool = False,
                       layer_stats: bool = False) -> ImageFeatures:
        """One frozen image-tower forward; hooks capture what the flags ask for."""
        if not (patches or layer_stats):
            return ImageFeatures(pooled=self.encode_image(images))
        self._require_vit("patch tokens and layer statistics")
        visual = self.model.visual
        if getattr(visual, "attn_pool", None) is not None:
            raise BackboneError("patch tokens are not defined for attention-pooled towers (CoCa)")
        batch_first = getattr(visual.transformer, "batch_first", True)
        captured: dict[str, object] = {"layers": []}
        handles = []

        def to_nld(x):
            return x if batch_first else x.transpose(0, 1)

        if layer_stats:
            def block_hook(_module, _inp, out):
                captured["layers"].append(to_nld(out[0] if isinstance(out, tuple) else out))
            handles += [blk.register_forward_hook(block_hook) for blk in visual.transformer.resblocks]
        if patches:
            def tower_hook(_module, _inp, out):
                captured["tokens"] = to_nld(out[0] if isinstance(out, tuple) else out)
            handles.append(visual.transformer.register_forward_hook(tower_hook))
        try:
            with self.autocast():
                pooled = self.model.encode_image(images.to(self.device))
                out = ImageFeatures(pooled=pooled.float())
                if patches:
                    tokens = captured["tokens"][:, 1:]  # drop the class token
                    tok = visual.ln_post(tokens)
                    if visual.proj is not None:
                        tok = tok @ visual.proj
                    out.patches = tok.float()
            if layer_stats:
                layers = torch.stack([x.float() for x in captured["layers"]], dim=1)  # [B, L, N, W]
                out.layer_mean = layers.mean(dim=2)
                out.layer_std = layers.std(dim=2, unbiased=False)
        finally:
            for h in handles:
                h.remove()
        return out


def _weights_hint(name: str, pretrained: str, cache_dir: Optional[Path]) -> str:
    where = cache_dir if cache_dir is not None else "the Hugging Face cache (~/.cache/huggingface)"
    return (f"could not load weights for {name!r} / {pretrained!r} (offline or not cached). "
            f"Put the checkpoint in {where} (open_clip's cache_dir), or pass a local file path as "
            f"--pretrained /path/to/weights.bin, or use --pretrained none for random weights.")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the Hugging Face endpoint, bounded by `timeout` (DNS included)."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    result = []

    def probe():
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def _offline_unless_reachable(pretrained) -> Iterator[None]:
    """Hub tags only: when the hub cannot be reached (checked once, a few seconds at most), load
    from the local cache alone, so a missing checkpoint fails at once instead of after ~50 s of
    download retries. HF_HUB_OFFLINE=1 set by the user skips the check."""
    if pretrained is None or Path(str(pretrained)).exists() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    if _hub_reachable():
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def load_backbone(name: str, pretrained: str = "openai", *, cache_dir: Optional[os.PathLike] = None,
                  device="cpu", precision: str = "auto") -> CLIPBackbone:
    """Build a frozen CLIP backbone.

    name: an open_clip model name (``ViT-B-16``), or an embedded tiny model (``tiny-digits``).
    pretrained: an open_clip tag (``openai``), a file path, or ``none`` for random weights. For the
        embedded model, the default loads the weights written by ``dgclip pretrain``.
    precision: ``auto`` (fp32 weights; bf16 autocast on CUDA), ``fp32`` (no autocast) or ``bf16``
        (bf16 autocast on any device).
    """
    import open_clip

    cache_dir = Path(cache_dir) if cache_dir is not None else None
    autocast = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}
    if precision not in autocast:
        raise ValueError(f"precision must be one of {sorted(autocast)}, got {precision!r}")
    if name in tiny_clip.EMBEDDED_MODELS:
        return load_tiny_backbone(name, pretrained, cache_dir=cache_dir, device=device,
                                            autocast_dtype=autocast[precision])
    if name not in open_clip.list_models():
        raise BackboneError(f"unknown model {name!r}: choose an open_clip model "
                            f"(open_clip.list_models()) or one of {sorted(tiny_clip.EMBEDDED_MODELS)}")
    random_init = pretrained is None or str(pretrained).lower() == "none"
    try:
        with torch.random.fork_rng(devices=[]), _offline_unless_reachable(None if random_init else pretrained):
            torch.manual_seed(0)  # random init is reproducible
            model, pre_train, pre_val = open_clip.create_model_and_transforms(
                name, pretrained=None if random_init else pretrained, device=device,
                cache_dir=str(cache_dir) if cache_dir is not None else None)
    except (RuntimeError, OSError, ValueError) as exc:  # hub / file errors surface as these
        raise BackboneError(_weights_hint(name, pretrained, cache_dir) + f" (cause: {exc})") from exc
    tokenizer = open_clip.get_tokenizer(name)
    return CLIPBackbone(model, tokenizer, name=name, pretrained="none" if random_init else str(pretrained),
                        preprocess_train=pre_train, preprocess_val=pre_val,
                        autocast_dtype=autocast[precision])


def load_tiny_backbone(name: str, pretrained: Optional[str], *, cache_dir: Optional[Path] = None,
                       device="cpu", autocast_dtype=None):
    """The embedded tiny CLIP (random seed-0 weights for "none", else `dgclip pretrain`'s)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights ("none") are reproducible across runs and ranks
        model, tokenizer = tiny_clip.build_tiny_model(name, cache_dir, device="cpu")
    weights_id = "random-seed0"
    tag = "none" if pretrained is not None and str(pretrained).lower() == "none" else "dgclip-pretrain"
    if tag != "none":
        path = Path(pretrained) if pretrained not in (None, "", "openai", "dgclip-pretrain", "default") \
            else tiny_clip.weights_path(name, cache_dir)
        if not path.exists():
            raise BackboneError(
                f"no weights for the embedded model {name!r} at {path}: run `dgclip pretrain` first "
                f"(writes them there), or pass --pretrained none for random weights.")
        st = path.stat()
        weights_id = f"{path}:{st.st_size}:{st.st_mtime_ns}"
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
    model.to(device)
    tf = tiny_clip.tiny_transform(tiny_clip.TINY_DIGITS_CONFIG["vision_cfg"]["image_size"])
    bb = CLIPBackbone(model, tokenizer, name=name, pretrained=tag, preprocess_train=tf,
                      preprocess_val=tf, autocast_dtype=autocast_dtype)
    bb.weights_id = weights_id
    return bb
