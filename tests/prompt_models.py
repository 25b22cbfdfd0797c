"""Random-weight open_clip models for the prompt tests (built through open_clip.create_model)."""
from __future__ import annotations

import copy
import functools
import logging

import torch

open_clip = __import__("pytest").importorskip("open_clip")

TINY_VISION = dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16)
TINY_TEXT = dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2)
VITB16_TEXT = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)


def _create(text_cfg: dict, precision: str, embed_dim: int, custom_text: bool, seed: int):
    torch.manual_seed(seed)
    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights" warnings
    model = open_clip.create_model("ViT-B-16", pretrained=None, precision=precision, embed_dim=embed_dim,
                                   vision_cfg=dict(TINY_VISION), text_cfg=dict(text_cfg),
                                   force_custom_text=custom_text)
    # Random init leaves LayerNorms at (1, 0) and biases at 0: perturb them so their use is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("ln" in name or name.endswith("bias")) and not name.startswith("visual"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@functools.lru_cache(maxsize=None)
def model(kind: str = "tiny", precision: str = "fp32", custom_text: bool = False, ls: bool = False):
    cfg = dict(TINY_TEXT if kind == "tiny" else VITB16_TEXT)
    if ls:
        cfg["ls_init_value"] = 0.5
    embed = 24 if kind == "tiny" else 512
    return _create(cfg, precision, embed, custom_text, seed=1)


@functools.lru_cache(maxsize=None)
def fp64_twin(kind: str = "tiny", precision: str = "fp32", custom_text: bool = False, ls: bool = False):
    """The same weights (as rounded in `precision`) in a float64 model: the oracle."""
    low = model(kind, precision, custom_text, ls)
    if precision == "fp32":
        twin = copy.deepcopy(low)
    else:
        twin = model(kind, "fp32", custom_text, ls)
        twin = copy.deepcopy(twin)
        twin.load_state_dict(low.state_dict())
    return twin.double().eval()


def random_tokens(n: int, eot: list[int], context: int = 77, vocab: int = 49408) -> torch.Tensor:
    """Rows [SOS, random words..., EOT, 0...] with EOT (the largest id) at the given positions."""
    tokens = torch.randint(1, vocab - 2, (n, context))
    tokens[:, 0] = vocab - 2
    for i, e in enumerate(eot):
        tokens[i, e] = vocab - 1
        tokens[i, e + 1:] = 0
    return tokens
