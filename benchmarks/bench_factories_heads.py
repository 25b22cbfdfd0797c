"""Input builders for the head-op benchmarks (also used in spawned processes for peak memory).

make(op, impl, B, D, K, F) returns a zero-argument callable running forward + backward of `op`
with implementation `impl`: "fused" (dgkernels, automatic backend), "torch" (the plain PyTorch
composition, dgkernels.heads.reference: einsum/bmm + F.cross_entropy) or "liger" (Liger-Kernel's
fused linear cross-entropy, cosine_cross_entropy on CUDA only).
"""
from __future__ import annotations

import torch

OPS = ("domain_fanout", "domain_cross_entropy", "domain_cross_entropy_all", "head_agreement", "mapper_project",
       "mapper_project_domain", "cosine_cross_entropy", "cosine_cross_entropy_per_sample")


def make(op, impl, B, D, K, F, device="cpu", dtype=torch.float32, seed=0):
    import dgkernels
    from dgkernels.heads import reference as ref

    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    x = leaf(B, F)
    dom = torch.randint(0, D, (B,), generator=g).to(device)
    tgt = torch.randint(0, K, (B,), generator=g).to(device)
    backend = "reference" if impl == "torch" else None
    if op in ("domain_fanout", "domain_cross_entropy", "domain_cross_entropy_all", "head_agreement"):
        w, b = leaf(D, K, F, scale=F ** -0.5), leaf(D, K, scale=0.1)
        if op == "domain_fanout":
            gout = torch.randn(B, D, K, generator=g).to(device, dtype)
            return lambda: dgkernels.domain_fanout(x, w, b, backend=backend).backward(gout)
        if op == "head_agreement":
            return lambda: dgkernels.head_agreement(x, w, b, backend=backend).backward()
        all_heads = op.endswith("_all")
        return lambda: dgkernels.domain_cross_entropy(x, w, b, dom, tgt, all_heads=all_heads,
                                                      backend=backend).backward()
    if op.startswith("mapper_project"):
        per_domain = op.endswith("_domain")
        w = leaf(*((D, F, F) if per_domain else (F, F)), scale=0.5 * F ** -0.5)
        b = leaf(*((D, F) if per_domain else (F,)), scale=0.01)
        gout = torch.randn(B, F, generator=g).to(device, dtype)
        return lambda: dgkernels.mapper_project(x, w, b, domain=dom if per_domain else None,
                                                backend=backend).backward(gout)
    per_sample = op.endswith("_per_sample")
    c = leaf(B, K, F) if per_sample else leaf(K, F)
    s = torch.tensor(100.0, device=device, requires_grad=True)
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss()

        def run():
            xn = torch.nn.functional.normalize(x, dim=-1) * s
            loss_fn(torch.nn.functional.normalize(c, dim=-1), xn, tgt).backward()
        return run
    return lambda: dgkernels.cosine_cross_entropy(x, c, s, tgt, backend=backend).backward()


def make_cpu(op, impl, B, D, K, F):
    """Factory for benchmarks/_memory.cpu_peak_mib (spawned process).

    A first call on a tiny copy of the problem loads the code paths (MKL/oneDNN kernels, thread
    pools) before the baseline RSS is taken; otherwise those one-off pages (~0.5 GiB here) swamp
    the difference between implementations."""
    make(op, impl, min(B, 8), D, K, F, seed=1)()
    return make(op, impl, B, D, K, F)
