"""Inputs and runnable closures for the prompt-encoding benchmarks (also used in spawned memory probes)."""
from __future__ import annotations

import functools
import logging

import torch

WIDTH = 512


@functools.lru_cache(maxsize=2)
def vitb16_text_model(device: str = "cpu", precision: str = "fp32"):
    """open_clip ViT-B-16 (random weights; a tiny vision tower: only the text tower is timed), frozen."""
    import open_clip

    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, precision=precision, device=device,
                                   vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16))
    return model.eval().requires_grad_(False)


def prompt_inputs(groups: int, classes: int, n_ctx: int = 16, device: str = "cpu", seed: int = 0):
    """prefix [G, 1+M, W] (requires grad), suffix [K, 8, W], lengths in [3, 8] (class name + '.' + EOT)."""
    gen = torch.Generator().manual_seed(seed)
    prefix = (torch.randn(groups, 1 + n_ctx, WIDTH, generator=gen) * 0.02).to(device).requires_grad_()
    suffix = (torch.randn(classes, 8, WIDTH, generator=gen) * 0.02).to(device)
    lengths = torch.randint(3, 9, (classes,), generator=gen)
    return prefix, suffix, lengths


def full_tokens(groups: int, classes: int, n_ctx: int, lengths: torch.Tensor, device: str = "cpu"):
    """77-token rows with EOT where the prompts have it (the open_clip encode_text peer)."""
    n = groups * classes
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 49405, (n, 77), generator=gen)
    eot = (n_ctx + lengths).repeat(groups)
    tokens[torch.arange(n), eot] = 49407
    tokens[torch.arange(77).unsqueeze(0) > eot.unsqueeze(1)] = 0
    return tokens.to(device)


def make_run(impl: str, groups: int, classes: int, n_ctx: int = 16, device: str = "cpu", threads: int | None = None,
             chunk_size: int | None = None, checkpoint: bool = False, precision: str = "fp32"):
    """A zero-argument closure running one forward + backward of `impl`."""
    import dgkernels
    from dgkernels.prompt.reference import naive_encode_prompts

    if threads:
        torch.set_num_threads(threads)
    model = vitb16_text_model(device, precision)
    prefix, suffix, lengths = prompt_inputs(groups, classes, n_ctx, device)
    if impl in ("open_clip", "encode_text"):
        tokens = full_tokens(groups, classes, n_ctx, lengths, device)
        pos = model.positional_embedding  # the gradient target: makes backward traverse the tower

        def run():
            pos.requires_grad_(True)
            try:
                fn = model.encode_text if impl == "open_clip" else functools.partial(dgkernels.encode_text, model)
                out = fn(tokens, normalize=True)
                (grad,) = torch.autograd.grad(out.float().sum(), pos)
            finally:
                pos.requires_grad_(False)
            return grad
        return run

    if impl == "naive":
        fn = naive_encode_prompts
    else:
        backend = None if impl == "dgkernels" else impl  # "reference", "cpp", "triton", "cuda"
        fn = functools.partial(dgkernels.encode_prompts, backend=backend, chunk_size=chunk_size, checkpoint=checkpoint)

    def run():
        out = fn(model, prefix, suffix, lengths)
        (grad,) = torch.autograd.grad(out.float().sum(), prefix)
        return grad
    return run
