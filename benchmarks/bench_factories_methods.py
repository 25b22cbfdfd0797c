"""One training step (forward + backward + optimiser step) of DALSCLIP, GOPro or SeeCLIP.

Variants of the same method, same weights, same batch:
  dgkernels  every op on its automatic backend (compiled/Triton kernels where they exist);
  reference  every dgkernels op forced to its plain PyTorch reference (DGKERNELS_BACKEND=reference;
             for prompt encoding: every prompt at the full context length, no prefix sharing);
  naive      the released-code style peer: prompts run at the full context length through
             open_clip's own modules (dgkernels.prompt.reference.naive_encode_prompts), the other
             ops on the reference backend.
The frozen image tower is not part of the step: its outputs (pooled, patches, per-layer stats) are
random tensors of the real shapes, identical for every variant.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

import dgkernels
from dgkernels.prompt.reference import naive_encode_prompts

# Default: a CPU-sized CLIP ("bench-clip-small": the ViT-B/16 image-side shapes GOPro and SeeCLIP
# read, 12 layers x 768 wide, 196 patches, and a 77-token text tower of width 256 with 4 layers).
# DGCLIP_BENCH_MODEL=ViT-B-16 runs the full ViT-B/16 text tower (too slow / too much memory for a
# shared 2-core CPU with K = 65: its naive peer alone keeps ~15 GB of activations).
MODEL = os.environ.get("DGCLIP_BENCH_MODEL", "bench-clip-small")
SMALL_CONFIG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}
BATCH = {"gopro": 4, "seeclip": 8, "dalsclip": 32}  # GOPro's paper batch; CPU-sized for the others


class NaiveEncoder(nn.Module):
    """The same prompts as a dgkernels.PromptEncoder, encoded the CoOp way (77 tokens, open_clip modules)."""

    def __init__(self, encoder):
        super().__init__()
        self.inner = encoder

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        enc = self.inner
        ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0)
        sos = enc.sos_embedding.to(ctx.dtype).view(1, 1, -1).expand(ctx.shape[0], 1, -1)
        return naive_encode_prompts(enc.text, torch.cat([sos, ctx], 1), enc.suffix_embedding.to(ctx.dtype),
                                    enc.suffix_lengths, normalize=enc.normalize)


def _register_small(name: str) -> None:
    import json
    import tempfile

    import open_clip

    if name in open_clip.list_models():
        return
    folder = tempfile.mkdtemp(prefix="dgclip-bench-")
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(SMALL_CONFIG, f)
    open_clip.add_model_config(folder)


def build_backbone(name: str = MODEL):
    """A frozen CLIP with random weights (nothing is downloaded)."""
    import open_clip

    from dgclip.backbone import CLIPBackbone

    if name == "bench-clip-small":
        _register_small(name)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    return CLIPBackbone(model, open_clip.get_tokenizer(name), name=name)


def fake_features(backbone, n: int, seed: int = 0):
    from dgclip.backbone import ImageFeatures

    g = torch.Generator().manual_seed(seed)
    e, w, l = backbone.embed_dim, backbone.vision_width, backbone.num_layers
    grid = backbone.image_size // backbone.model.visual.patch_size[0]
    return ImageFeatures(pooled=torch.randn(n, e, generator=g), patches=torch.randn(n, grid * grid, e, generator=g),
                         layer_mean=torch.randn(n, l, w, generator=g), layer_std=torch.rand(n, l, w, generator=g))


def make_step(method: str = "gopro", k: int = 7, variant: str = "dgkernels", backbone=None, batch: int | None = None):
    """A zero-argument callable running one training step of `method` with K classes."""
    from dgclip.methods import get_method
    from dgclip.methods.base import Batch

    backbone = backbone or build_backbone()
    b = batch or BATCH[method]
    classes = [f"class number {i}" for i in range(k)]
    torch.manual_seed(0)
    m = get_method(method)(backbone, classes, 3, {})
    m.to(backbone.device)  # placement is the caller's job (the engine's in a run)
    m.configure_optimizers(1000)
    if variant == "naive":
        for name, child in list(m.named_children()):
            if isinstance(child, dgkernels.PromptEncoder):
                setattr(m, name, NaiveEncoder(child))
    labels = torch.arange(b) % k
    domains = torch.arange(b) % 3
    m.train()
    if method == "gopro":
        feats = fake_features(backbone, 3 * b)

        def losses():
            return m.losses_from_features(feats, labels)
    elif method == "seeclip":
        feats = fake_features(backbone, b)
        cached = Batch(images=None, labels=labels, domains=domains, features=feats)

        def losses():
            return m.losses(*m.training_inputs(cached, generator=torch.Generator().manual_seed(0)))
    elif method == "dalsclip":
        pooled = fake_features(backbone, b).pooled
        m.steps_done.fill_(m.head_steps)  # the mapping stage: prompts + mapper + agreement

        def losses():
            return m.losses(pooled, labels, domains)
    else:
        raise ValueError(f"unknown method {method!r}")

    def step():
        ctx = contextlib.nullcontext() if variant == "dgkernels" else dgkernels.use_backend("reference")
        with ctx:
            m.step(losses()["loss"])

    return step
