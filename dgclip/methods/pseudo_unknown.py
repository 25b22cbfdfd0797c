"""Pseudo-unknown generation for SeeCLIP, behind one interface.

A generator takes an `UnknownRequest` (the frozen features of a training batch, its labels and
domains) and returns `PseudoUnknowns` (pooled and patch features of synthetic samples that should
sit near the known classes without belonging to any of them), or None when it makes nothing.

- `FeatureSpaceUnknowns` (default, no extra weights): mixes the frozen features of two images of
  different classes and perturbs them; see its docstring for the exact recipe.
- `PixelCompositeUnknowns` ("pixel_composite"): composites of two known images of different
  classes made in PIXEL space (overlay or half-splice), encoded by the frozen image tower: for
  digits they look like unseen digits (8 ~ 3 over 0), unlike feature mixtures.
- `DiffusionUnknowns` (optional extra, needs `diffusers` + `transformers`): Stable Diffusion 1.5
  images conditioned on perturbed class tokens, with the known class names as negative prompt,
  encoded by the frozen backbone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F


@dataclass
class UnknownRequest:
    pooled: torch.Tensor  # [B, E] frozen image features
    patches: torch.Tensor  # [B, P, E] frozen projected patch features
    labels: torch.Tensor  # [B] known-class labels
    domains: torch.Tensor  # [B] source-domain indices
    images: torch.Tensor | None = None  # [B, 3, H, W] in [0, 1] (pixel generators only)


@dataclass
class PseudoUnknowns:
    pooled: torch.Tensor  # [N, E]
    patches: torch.Tensor  # [N, P, E]
    domains: torch.Tensor  # [N] the source domain each sample was made from


class PseudoUnknownGenerator(Protocol):
    def __call__(self, request: UnknownRequest, *, generator: torch.Generator | None = None) -> PseudoUnknowns | None: ...


def count_for(batch_size: int, ratio: float) -> int:
    """Pseudo-unknowns for B images of one source domain: max(1, int(ratio * B)) as SeeCLIP's
    released scripts (0 when ratio is 0 or there are no images)."""
    if ratio <= 0 or batch_size == 0:
        return 0
    return max(1, int(ratio * batch_size))


def per_domain_anchors(domains: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """min(B_d, count_for(B, ratio)) random anchor indices from EACH source domain d present in
    the batch (B = the whole batch: the paper's max(1, int(0.1 B)) per source domain).

    Batched: a random key per image, ranked within its domain; the first count_for(B_d) of each
    domain are its anchors. Returned in domain order.
    """
    dom = domains.cpu()
    b = dom.numel()
    if b == 0 or ratio <= 0:
        return torch.zeros(0, dtype=torch.long, device=domains.device)
    key = torch.rand(b, generator=generator)
    order = torch.argsort(dom.double() * 2.0 + key)  # by domain, random within a domain (key < 1)
    uniq, counts = torch.unique(dom, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    group = torch.searchsorted(uniq, dom[order])
    rank = torch.arange(b) - starts[group]
    quota = torch.clamp(torch.full_like(counts, count_for(b, ratio)), max=counts)
    return order[rank < quota[group]].to(domains.device)


def different_class_partner(labels: torch.Tensor, anchors: torch.Tensor, generator: torch.Generator | None,
                            domains: torch.Tensor | None = None) -> torch.Tensor:
    """For each anchor index, a random batch index whose label differs (the anchor itself if none
    does); with `domains`, the partner also comes from the anchor's own source domain."""
    scores = torch.rand(anchors.numel(), labels.numel(), generator=generator).to(labels.device)
    bad = labels[anchors][:, None] == labels[None, :]
    if domains is not None:
        bad = bad | (domains[anchors][:, None] != domains[None, :])
    scores = scores.masked_fill(bad, -1.0)
    partner = scores.argmax(1)
    return torch.where(bad.all(1), anchors, partner)


class FeatureSpaceUnknowns:
    """Pseudo-unknowns made in feature space (INFERRED stand-in for the paper's diffusion module).

    For max(1, int(ratio * B_d)) anchors of each source domain d: pick a partner of another
    class from the same domain, interpolate
    x = lam * x_a + (1 - lam) * x_b with lam ~ U(mix_low, mix_high) (near two known classes, of
    neither), for the pooled and the patch features alike, then add one Gaussian vector
    eps ~ N(0, (noise_std * rms)^2) to the pooled feature and to every patch (rms = the sample's
    root-mean-square feature value, so noise_std is relative to the feature scale). SeeCLIP's
    semantic tokens are convex combinations of patches, so every token of the synthetic sample is
    the mixed token plus exactly eps: the paper's "v_k + N(0, 0.2^2)" perturbation.
    """

    def __init__(self, ratio: float = 0.1, noise_std: float = 0.2, mix_low: float = 0.3, mix_high: float = 0.7):
        if not 0.0 <= mix_low <= mix_high <= 1.0:
            raise ValueError(f"need 0 <= mix_low <= mix_high <= 1; got mix_low={mix_low}, mix_high={mix_high}")
        if ratio < 0 or noise_std < 0:
            raise ValueError(f"ratio and noise_std must be >= 0; got ratio={ratio}, noise_std={noise_std}")
        self.ratio, self.noise_std, self.mix_low, self.mix_high = ratio, noise_std, mix_low, mix_high

    @torch.no_grad()
    def __call__(self, request: UnknownRequest, *, generator: torch.Generator | None = None) -> PseudoUnknowns | None:
        pooled, patches, labels = request.pooled, request.patches, request.labels
        dev = pooled.device
        # random draws on the CPU generator, then moved: same samples on every device
        anchors = per_domain_anchors(request.domains, self.ratio, generator)
        n = anchors.numel()
        if n == 0:
            return None
        partners = different_class_partner(labels, anchors, generator, request.domains)
        lam = self.mix_low + (self.mix_high - self.mix_low) * torch.rand(n, 1, generator=generator).to(dev, pooled.dtype)
        mixed = lam * pooled[anchors] + (1 - lam) * pooled[partners]
        mixed_patches = lam[:, :, None] * patches[anchors] + (1 - lam[:, :, None]) * patches[partners]
        eps = torch.randn(n, pooled.shape[-1], generator=generator).to(dev, pooled.dtype)
        rms = mixed.pow(2).mean(-1, keepdim=True).sqrt()
        prms = mixed_patches.pow(2).mean((-2, -1), keepdim=True).sqrt()
        return PseudoUnknowns(
            pooled=mixed + self.noise_std * rms * eps,
            patches=mixed_patches + self.noise_std * prms * eps[:, None, :],
            domains=request.domains[anchors],
        )


class PixelCompositeUnknowns:
    """Pseudo-unknown images composed from known ones in pixel space, encoded by the frozen tower.

    For max(1, int(ratio * B_d)) anchors of each source domain d and a partner of another class
    from the same domain (images in [0, 1]): with probability 1/2 the pixel-wise maximum of the
    two (an overlay: for white-on-black strokes both shapes at once), otherwise a splice of the
    anchor's top (or left) half with the partner's other half. The result belongs to neither
    class but keeps the domain's style; `encode_images` ([N, 3, H, W] in [0, 1] -> (pooled,
    patches)) runs the frozen tower on it. INFERRED stand-in for the paper's diffusion images on
    data where unseen classes are recombinations of known parts (digits).
    """

    def __init__(self, encode_images: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], ratio: float = 0.1):
        if ratio < 0:
            raise ValueError(f"ratio must be >= 0, got {ratio}")
        self.encode_images, self.ratio = encode_images, ratio

    @staticmethod
    def compose(a: torch.Tensor, b: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
        """a, b [N, C, H, W]; mode [N] in {0: overlay, 1: top/bottom splice, 2: left/right splice}."""
        h, w = a.shape[-2:]
        top = (torch.arange(h, device=a.device) < h // 2).view(1, 1, h, 1).expand_as(a)
        left = (torch.arange(w, device=a.device) < w // 2).view(1, 1, 1, w).expand_as(a)
        m = mode.view(-1, 1, 1, 1)
        return torch.where(m == 0, torch.maximum(a, b),
                           torch.where(m == 1, torch.where(top, a, b), torch.where(left, a, b)))

    @torch.no_grad()
    def __call__(self, request: UnknownRequest, *, generator: torch.Generator | None = None) -> PseudoUnknowns | None:
        if request.images is None:
            raise ValueError("the pixel_composite generator needs the batch's images (request.images)")
        anchors = per_domain_anchors(request.domains, self.ratio, generator)
        n = anchors.numel()
        if n == 0:
            return None
        partners = different_class_partner(request.labels, anchors, generator, request.domains)
        coin = torch.rand(n, generator=generator) < 0.5
        side = torch.randint(1, 3, (n,), generator=generator)
        mode = torch.where(coin, torch.zeros_like(side), side).to(request.images.device)
        images = self.compose(request.images[anchors], request.images[partners], mode)
        pooled, patches = self.encode_images(images)
        return PseudoUnknowns(pooled=pooled, patches=patches, domains=request.domains[anchors])


SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class DiffusionUnknowns:
    """Pseudo-unknown images from a Stable Diffusion pipeline (`diffusers`), encoded by the backbone.

    Per anchor image (max(1, int(ratio * B)) per source domain d): the paper's positive prompt
    "a [source domain] of an unknown class" (prompt_template.format(domain name of d)); the
    text-encoder outputs at the "unknown class" token positions get Gaussian noise of std
    token_noise_std * rms (INFERRED reading of "perturbing extracted semantic tokens ... as control
    conditions": the perturbation lives in the diffusion model's own conditioning space);
    negative prompt = all known class names; guidance 15, 20 steps (paper). The images are
    encoded by `encode_images` ([N, 3, H, W] in [0, 1] -> (pooled, patches)).
    """

    def __init__(self, pipeline, classnames: list[str], encode_images: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 *, ratio: float = 0.1, guidance_scale: float = 15.0, num_inference_steps: int = 20,
                 token_noise_std: float = 0.2, prompt_template: str = "a {} of an unknown class",
                 domain_names: list[str] | None = None, height: int | None = None, width: int | None = None):
        self.pipe = pipeline
        self.classnames = list(classnames)
        self.encode_images = encode_images
        self.ratio, self.guidance_scale, self.steps = ratio, guidance_scale, num_inference_steps
        self.token_noise_std, self.template = token_noise_std, prompt_template
        self.height, self.width = height, width
        self.negative_prompt = ", ".join(self.classnames)
        self.domain_names = list(domain_names) if domain_names else None  # None: "photo" for every domain

    def domain_name(self, d: int) -> str:
        return self.domain_names[d] if self.domain_names else "photo"

    @classmethod
    def from_pretrained(cls, classnames: list[str], encode_images, *, model_id: str = SD15_MODEL_ID,
                        device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None,
                        cache_dir: str | None = None, local_files_only: bool = False, **kwargs) -> "DiffusionUnknowns":
        """Load a Stable Diffusion pipeline (SD 1.5 by default) from the Hugging Face hub or a local path."""
        try:
            from diffusers import StableDiffusionPipeline
        except ModuleNotFoundError as exc:  # the optional extra
            raise ModuleNotFoundError("the diffusion pseudo-unknown generator needs `pip install diffusers transformers`") from exc
        if torch_dtype is None:
            torch_dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                model_id, torch_dtype=torch_dtype, cache_dir=cache_dir, local_files_only=local_files_only,
                safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError) as exc:  # missing files offline / not a path nor a repo id
            raise OSError(f"could not load the diffusion model {model_id!r} (offline? put the weights in the Hugging Face cache "
                          f"or pass model_id=<local folder>; cache_dir={cache_dir!r}): {exc}") from exc
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, classnames, encode_images, **kwargs)

    def _unknown_token_mask(self, prompts: list[str], length: int, device) -> torch.Tensor:
        """[N, length] True at the tokens of "unknown class" (the last words of the paper's prompt),
        after the SOS token."""
        tok = self.pipe.tokenizer
        n_all = torch.tensor([len(ids) for ids in tok(prompts, add_special_tokens=False).input_ids], device=device)
        n_tail = len(tok("unknown class", add_special_tokens=False).input_ids)
        pos = torch.arange(length, device=device)[None, :]
        end = 1 + n_all[:, None]
        return (pos >= end - n_tail) & (pos < end)

    @torch.no_grad()
    def __call__(self, request: UnknownRequest, *, generator: torch.Generator | None = None) -> PseudoUnknowns | None:
        labels = request.labels
        anchors = per_domain_anchors(request.domains, self.ratio, generator)
        n = anchors.numel()
        if n == 0:
            return None
        prompts = [self.template.format(self.domain_name(d)) for d in request.domains[anchors].tolist()]
        device = self.pipe.device
        embeds, negative = self.pipe.encode_prompt(prompts, device, 1, True, negative_prompt=[self.negative_prompt] * n)
        mask = self._unknown_token_mask(prompts, embeds.shape[1], device)
        rms = embeds.float().pow(2).mean((-2, -1), keepdim=True).sqrt()
        noise = torch.randn(embeds.shape, generator=generator).to(device, torch.float32)
        embeds = (embeds.float() + self.token_noise_std * rms * noise * mask[..., None]).to(embeds.dtype)
        images = self.pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=self.guidance_scale,
                           num_inference_steps=self.steps, output_type="pt", height=self.height, width=self.width,
                           generator=generator).images  # [N, 3, H, W] in [0, 1]
        pooled, patches = self.encode_images(images.to(request.pooled.device, torch.float32))
        return PseudoUnknowns(pooled=pooled, patches=patches, domains=request.domains[anchors])


GENERATORS = ("feature", "pixel_composite", "diffusion", "none")


def build_generator(kind: str, **kwargs) -> PseudoUnknownGenerator | None:
    """'feature', 'pixel_composite', 'diffusion' (kwargs for DiffusionUnknowns.from_pretrained) or 'none'."""
    if kind == "none":
        return None
    if kind == "feature":
        return FeatureSpaceUnknowns(**kwargs)
    if kind == "pixel_composite":
        return PixelCompositeUnknowns(**kwargs)
    if kind == "diffusion":
        return DiffusionUnknowns.from_pretrained(**kwargs)
    raise ValueError(f"unknown pseudo-unknown generator {kind!r}; expected one of {GENERATORS}")


def denormalize_images(x: torch.Tensor, mean, std) -> torch.Tensor:
    """The backbone's normalised input -> pixels in [0, 1] (inverse of the Normalize step)."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0, 1)


def normalize_images(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> the backbone's input (bicubic resize to size x size, then normalise)."""
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std
