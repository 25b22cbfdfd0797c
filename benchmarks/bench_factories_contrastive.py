"""Input builders for the contrastive benchmarks: each returns a zero-argument callable running
forward + backward once (used for timing in-process and for peak memory in a spawned process)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import dgkernels


def _features(n, d, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device=device, dtype=dtype).requires_grad_()
    y = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device=device, dtype=dtype).requires_grad_()
    return x, y


def naive_clip(x, y, s):
    """The textbook loss: logits matmul + cross_entropy in both directions."""
    logits = s * x @ y.t()
    labels = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def clip_loss_fn(impl: str):
    """impl: naive | open_clip | inf_cl | reference | cpp | cuda | triton (features already unit-norm)."""
    if impl == "naive":
        return naive_clip
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        loss = ClipLoss()
        return lambda x, y, s: loss(x, y, s)
    if impl == "inf_cl":
        from inf_cl import cal_inf_loss

        return lambda x, y, s: 0.5 * (cal_inf_loss(x, y, scale=s) + cal_inf_loss(y, x, scale=s))
    return lambda x, y, s: dgkernels.clip_loss(x, y, s, normalize=False, backend=impl)


def info_nce_fn(impl: str):
    if impl == "info_nce_pytorch":
        from info_nce import info_nce

        return lambda q, p: info_nce(q, p, temperature=0.07)
    return lambda q, p: dgkernels.info_nce(q, p, temperature=0.07, backend=impl)


def supcon_naive(views, t):
    """SupContrast-style materialised loss (contrast_mode='all', no labels)."""
    n, v, _ = views.shape
    z = F.normalize(torch.cat(torch.unbind(views, dim=1)), dim=-1)
    logits = (z @ z.t() / t).fill_diagonal_(float("-inf"))
    pos = torch.arange(n * v, device=z.device).remainder(n)
    same = (pos[:, None] == pos[None, :]).fill_diagonal_(False)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(log_prob.masked_fill(~same, 0).sum(1) / same.sum(1)).mean()


def multiview_fn(impl: str):
    if impl == "naive":
        return supcon_naive
    return lambda views, t: dgkernels.multiview_info_nce(views, t, backend=impl)


def make_clip(impl: str, n: int, d: int, dtype: str = "float32", device: str = "cpu"):
    x, y = _features(n, d, getattr(torch, dtype), device)
    s = torch.tensor(14.3, device=device, requires_grad=True)
    fn = clip_loss_fn(impl)

    def run():
        x.grad = y.grad = s.grad = None
        fn(x, y, s).backward()

    return run


def make_info_nce(impl: str, n: int, d: int, dtype: str = "float32", device: str = "cpu"):
    q, p = _features(n, d, getattr(torch, dtype), device)
    fn = info_nce_fn(impl)

    def run():
        q.grad = p.grad = None
        fn(q, p).backward()

    return run


def make_multiview(impl: str, n: int, d: int, v: int = 2, dtype: str = "float32", device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    views = torch.randn(n, v, d, generator=g).to(device=device, dtype=getattr(torch, dtype)).requires_grad_()
    fn = multiview_fn(impl)

    def run():
        views.grad = None
        fn(views, 0.1).backward()

    return run
