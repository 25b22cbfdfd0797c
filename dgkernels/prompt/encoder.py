"""PromptEncoder: a frozen open_clip text tower that owns the tokenised class names."""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .._validate import check_tensor, compiling
from . import api
from .text_tower import resolve, text_module

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class _TextParts(nn.Module):
    """The text-tower modules of an open_clip model, without its vision tower.

    Shares the model's modules (no copy) unless a low-precision copy is asked for; exposes the
    attribute names `resolve` reads on a CLIP."""

    def __init__(self, model, dtype: Optional[torch.dtype]):
        super().__init__()
        text = text_module(model)
        resolve(text)  # refuse unsupported towers up front
        self.transformer = text.transformer
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.ln_final = text.ln_final
        proj = text.text_projection
        if isinstance(proj, nn.Module):
            self.text_projection = proj
        elif proj is None:
            self.text_projection = None
        else:
            self.text_projection = proj  # an nn.Parameter: registered as a parameter of this module
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)
        self.text_pool_type = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
        self.text_eos_id = getattr(text, "text_eos_id", None) if hasattr(text, "text_pool_type") else getattr(text, "eos_id", None)
        if dtype is not None:
            for name in ("transformer", "ln_final", "text_projection", "token_embedding"):
                mod = getattr(self, name)
                if isinstance(mod, nn.Module):
                    setattr(self, name, copy.deepcopy(mod))
            if isinstance(self.text_projection, nn.Parameter):
                self.text_projection = nn.Parameter(self.text_projection.detach().clone())
            self.positional_embedding = nn.Parameter(self.positional_embedding.detach().clone())
            self._to_low_precision(dtype)
        self.requires_grad_(False)

    def _to_low_precision(self, dtype: torch.dtype) -> None:
        """open_clip's precision='bf16'/'fp16': matmul weights low precision, LayerNorms and
        embeddings float32 (LayerNorms then run in float32 here)."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                mod.to(dtype)
            elif isinstance(mod, nn.MultiheadAttention) or hasattr(mod, "in_proj_weight"):
                for attr in ("in_proj_weight", "in_proj_bias"):
                    p = getattr(mod, attr, None)
                    if p is not None:
                        p.data = p.data.to(dtype)
        if isinstance(self.text_projection, nn.Parameter):
            self.text_projection.data = self.text_projection.data.to(dtype)


class PromptEncoder(nn.Module):
    """Encodes learned prompts `[SOS][ctx_1..ctx_M] classname. [EOT]` for K classes at once.

    Holds the frozen text tower of an open_clip model (shared with the model unless `dtype` asks
    for a bfloat16/float16 copy, run with float32 LayerNorms as open_clip's precision='bf16'; a
    shared tower has requires_grad set to False on the model's own text parameters), the
    tokenised class names and their token embeddings. A method owns the context parameters:

        enc = PromptEncoder(model, classnames)
        ctx = nn.Parameter(enc.initial_context(n_ctx=16))          # or phrase="a photo of a"
        feats = enc(ctx)            # ctx [M, W] -> [1, K, E];  [G, M, W] -> [G, K, E]
        feats = enc(ctx_k, class_specific=True)   # [K, M, W] -> [1, K, E]; [G, K, M, W] -> [G, K, E]

    tokenizer: callable list[str] -> [n, context_length] LongTensor (default: open_clip's CLIP BPE
    tokenizer, imported on first use). template: formats each class name ("{}." as CoOp).
    normalize / chunk_size / checkpoint / backend: as in `dgkernels.encode_prompts`.

    Under torch.compile, forward runs the same backend's custom ops over the packed layout of the
    class suffix lengths (known on the host when the encoder is built).
    """

    def __init__(self, model, classnames: Sequence[str], tokenizer: Optional[Callable] = None, *,
                 template: str = "{}.", dtype: Optional[torch.dtype] = None, normalize: bool = True,
                 chunk_size: Optional[int] = None, checkpoint: bool = False, backend: Optional[str] = None):
        super().__init__()
        if isinstance(classnames, str) or len(classnames) == 0:
            raise ValueError("classnames must be a non-empty sequence of strings")
        if dtype is not None and dtype not in _LOW_PRECISION:
            raise ValueError(f"dtype must be None (the model's own) or one of {_LOW_PRECISION}, got {dtype}")
        self.text = _TextParts(model, dtype)
        self.classnames = [str(c) for c in classnames]
        self.template = template
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.checkpoint = checkpoint
        self.backend = backend
        self._tokenizer = tokenizer
        tower = resolve(self.text)
        tokens = self.tokenize([template.format(c.replace("_", " ")) for c in self.classnames])
        eot = tower.pool_index(tokens)  # the pooled position of "SOS name . EOT"
        if int(eot.min()) < 1:
            raise ValueError("a tokenised class name has its pooled token at position 0 (no SOS?)")
        width = int(eot.max())
        with torch.no_grad():
            emb = tower.token_embedding[tokens[:, :width + 1]]
        self.register_buffer("class_tokens", tokens, persistent=False)
        self.register_buffer("sos_embedding", emb[0, 0].clone(), persistent=False)
        self.register_buffer("suffix_embedding", emb[:, 1:].clone(), persistent=False)  # [K, Ls, W]
        self.register_buffer("suffix_lengths", eot.long(), persistent=False)  # EOT at 1 + M + len - 1
        # The same on the host: under torch.compile the lengths enter the trace as constants.
        self._host_lengths = tuple(int(v) for v in eot.tolist())

    # -- tokens ---------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if self._tokenizer is None:
            import open_clip  # deferred: dgkernels never imports open_clip at import time

            self._tokenizer = open_clip.get_tokenizer("ViT-B-16")
        tokens = self._tokenizer(list(texts))
        return torch.as_tensor(tokens).long().to(self.text.token_embedding.weight.device)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def width(self) -> int:
        return self.text.token_embedding.weight.shape[1]

    def context_from_phrase(self, phrase: str) -> torch.Tensor:
        """Token embeddings [M, W] of `phrase` (without SOS/EOT), e.g. "a photo of a" -> M = 4."""
        tokens = self.tokenize([phrase])[0]
        eot = int(resolve(self.text).pool_index(tokens.unsqueeze(0))[0])
        if eot < 2:
            raise ValueError(f"phrase {phrase!r} tokenises to no tokens")
        with torch.no_grad():
            return self.text.token_embedding.weight[tokens[1:eot]].detach().clone().float()

    def initial_context(self, n_ctx: int = 16, phrase: Optional[str] = None, *, classes: Optional[int] = None,
                        std: float = 0.02, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A fresh float32 context tensor: N(0, std^2) [n_ctx, W] (CoOp), or the embeddings of
        `phrase` (then n_ctx = its token count). classes=K gives a class-specific [K, M, W] copy."""
        if phrase is not None:
            ctx = self.context_from_phrase(phrase)
        else:
            if n_ctx < 1:
                raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
            ctx = torch.randn(n_ctx, self.width, generator=generator, device=self.sos_embedding.device) * std
        if classes is not None:
            ctx = ctx.unsqueeze(0).repeat(classes, 1, 1)
        return ctx

    # -- encoding -------------------------------------------------------------------------------
    def forward(self, ctx: torch.Tensor, *, class_specific: bool = False) -> torch.Tensor:
        tower = resolve(self.text)
        k = self.num_classes
        if class_specific:
            check_tensor("ctx", ctx, dims=(3, 4))
            if ctx.shape[-3] != k:
                raise ValueError(f"class-specific ctx must be [K, M, W] or [G, K, M, W] with K = {k}, got {tuple(ctx.shape)}")
            ctx4 = ctx if ctx.dim() == 4 else ctx.unsqueeze(0)
            g, _, m, w = ctx4.shape
            cls = self.suffix_embedding.to(ctx.dtype).unsqueeze(0).expand(g, -1, -1, -1)
            if cls.shape[-1] != w:
                raise ValueError(f"ctx width {w} must equal the text width {cls.shape[-1]}")
            suffix = torch.cat([ctx4, cls], 2)
            if ctx.dim() == 3:
                suffix = suffix[0]
            prefix = self.sos_embedding.to(ctx.dtype).view(1, 1, -1).expand(g, 1, -1)
            lengths = tuple(v + m for v in self._host_lengths) if compiling() else self.suffix_lengths + m
        else:
            check_tensor("ctx", ctx, dims=(2, 3))
            ctx3 = ctx if ctx.dim() == 3 else ctx.unsqueeze(0)
            g, m, w = ctx3.shape
            if w != self.width:
                raise ValueError(f"ctx width {w} must equal the text width {self.width} (ctx {tuple(ctx.shape)})")
            sos = self.sos_embedding.to(ctx.dtype).view(1, 1, -1).expand(g, 1, -1)
            prefix = torch.cat([sos, ctx3], 1)
            suffix = self.suffix_embedding.to(ctx.dtype)
            lengths = self._host_lengths if compiling() else self.suffix_lengths
        suffix, lengths, host = api.validate_prompts(tower, prefix, suffix, lengths, self.chunk_size)
        call = api.call_facts(tower, prefix.device, prefix.dtype, prefix_len=prefix.shape[1], suffix_len=max(host))
        ops = api.prompt_ops(prefix.device, self.backend, call)
        return api.encode_prompts_tower(tower, prefix, suffix, lengths, self.normalize, self.chunk_size,
                                        self.checkpoint, ops, host)

    def extra_repr(self) -> str:
        return (f"classes={self.num_classes}, width={self.width}, normalize={self.normalize}, "
                f"chunk_size={self.chunk_size}, checkpoint={self.checkpoint}, backend={self.backend}")
