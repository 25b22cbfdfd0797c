"""Roofline estimates for every row of benchmarks/gpu_bench.py on one H100, and the launch grids.

    python benchmarks/roofline.py [--out benchmarks/results/gpu_roofline.md]

No GPU is needed: every number here is arithmetic on the shapes and on the ceilings below. The
predicted time of a row is the largest of its ceilings (tensor-core flops, HBM bytes, exponentials
and, for the fused contrastive backward, the L2 traffic of its fp32 gradient atomics): the time
the kernels cannot beat, not a forecast of what they reach. gpu_bench.py measures the real rows
and the same ceilings on the machine it runs on; set the two tables side by side.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# Ceilings (where each comes from):
MM_TFLOPS = 798.0  # bf16 8192^3 torch.mm on this workplace's H100 (/work/.library/device/KINDS.md, 2026-11-13)
HBM_GBS = 3000.0  # device-to-device copy on that H100, bytes read + written (same source)
EXP_TPS = 3.9  # exp2 per second (T/s): 16 MUFU ops / clock / SM x 132 SMs x 1.83 GHz (DESIGN.md section 4)
L2_GBS = 5500.0  # ASSUMED L2 bandwidth of an H100 for fp32 reductions; not measured in this project
SMS = 132


def _ms(flops=0.0, hbm=0.0, exps=0.0, l2=0.0) -> tuple[float, str]:
    parts = {"tensor cores": flops / (MM_TFLOPS * 1e12), "HBM": hbm / (HBM_GBS * 1e9),
             "exp unit": exps / (EXP_TPS * 1e12), "L2 atomics": l2 / (L2_GBS * 1e9)}
    bound = max(parts, key=parts.get)
    return parts[bound] * 1e3, bound


def _fused_bwd_l2(tri, dtype, n: int, d: int) -> float:
    """L2 bytes of the fused backward's fp32 gradient atomics at its first config for (dtype, d)."""
    hold = tri._dq_hold("bwd", dtype, "tf32", d)["DQ_HOLD"]
    cfg = tri._configs("bwd", dtype, "tf32", hold)[0]
    dk_l2 = n * n * d * 4 / cfg["BLOCK_M"]  # dK atomics, one BLOCK_N x D tile per tile pair
    # dQ: one BLOCK_M x D tile per tile pair, or once per row block and column split when held
    dq_l2 = n * d * 4 * tri.column_split(n, n)[0] if hold else n * n * d * 4 / cfg["BLOCK_N"]
    return dk_l2 + dq_l2


def _slab_bwd_hbm(slab, dtype, n: int, d: int, esize: int) -> float:
    """HBM bytes the slab backward adds to the compulsory ones: G written and read twice (GR, GCT),
    dK's fp32 read-modify-write once per slab, dQ's split-K partial tiles written and read."""
    import torch

    rows = slab._slab_rows(n, n, d, esize)
    slabs = -(-n // rows)
    splits = slab._splits(rows, d, n, dtype, torch.device("cpu"))  # not a GPU: plans for 132 SMs
    return 4 * n * n * esize + (2 * slabs - 1) * n * d * 4 + (2 * splits * n * d * 4 if splits > 1 else 0)


def contrastive_rows(ns, ds, dtypes):
    """(op, N, D, dtype, backward, fwd GFLOP, fwd+bwd GFLOP, HBM MB, L2 atomic MB, predicted fwd ms,
    fwd+bwd ms, bound): the backward auto picks, and where that is the slab backward, also the fused
    one it replaces (the benchmark's "fused backward (atomics)" rows)."""
    import torch

    from dgkernels.contrastive import triton as tri
    from dgkernels.contrastive import triton_slab as slab

    rows = []
    for dname in dtypes:
        dtype = getattr(torch, dname)
        esize = 2
        for d in ds:
            dp = -(-d // 16) * 16
            auto_slab = slab.wanted(dp, tri._dq_hold("bwd", dtype, "tf32", dp)["DQ_HOLD"])
            for op in ("clip_loss", "info_nce", "multiview_info_nce"):
                for n in ns:
                    sym = op != "info_nce"  # row and column statistics (clip, supcon on the joint matrix)
                    fwd = 2 * n * n * d  # S once; the symmetric loss takes both directions from one tile
                    fb = 8 * n * n * d  # forward S, backward S recomputed, dQ and dK GEMMs
                    exps_f = (2 if sym else 1) * n * n
                    hbm = 2 * n * d * esize + 2 * n * d * 4 + 2 * n * d * esize  # inputs, fp32 grads, cast out
                    f_ms, _ = _ms(flops=fwd, hbm=2 * n * d * esize, exps=exps_f)
                    variants = ["slab", "fused"] if auto_slab else ["fused"]
                    for bwd in variants:
                        if bwd == "slab":
                            extra, l2 = _slab_bwd_hbm(slab, dtype, n, dp, esize), 0.0
                        else:
                            extra, l2 = 0.0, _fused_bwd_l2(tri, dtype, n, dp)
                        fb_ms, bound = _ms(flops=fb, hbm=hbm + extra, exps=2 * exps_f, l2=l2)
                        rows.append((op, n, d, dname, bwd, fwd / 1e9, fb / 1e9, (hbm + extra) / 1e6, l2 / 1e6, f_ms,
                                     fb_ms, bound))
    return rows


def grid_rows(ns=(1024, 4096, 65536)):
    from dgkernels.contrastive import triton as tri

    out = []
    for n in ns:
        splits, cols = tri.column_split(n, n)
        for kernel in ("fwd", "bwd"):
            bms = sorted({c[0] for c in tri.CONFIGS[(kernel, "half")]})
            progs = [-(-n // bm) * splits for bm in bms]
            out.append((n, kernel, "/".join(map(str, bms)), splits, cols, "/".join(map(str, progs)),
                        "/".join(f"{p / SMS:.1f}" for p in progs), "/".join(str(-(-n // bm)) for bm in bms)))
    return out


def slab_grid_rows(ns=(1024, 4096, 65536), d=512):
    """Per slab of the slab backward at N = M, bf16: (N, slab rows, slabs, G programs, dQ GEMM tiles x
    splits, dK GEMM programs)."""
    import torch

    from dgkernels.contrastive import triton_slab as slab

    g, _ = slab._cfg("g", torch.bfloat16)
    mm, _ = slab._cfg("gemm", torch.bfloat16)
    out = []
    for n in ns:
        rows = slab._slab_rows(n, n, d, 2)
        r = min(rows, n)
        splits = slab._splits(rows, d, n, torch.bfloat16, torch.device("cpu"))  # plans for 132 SMs
        tiles = -(-r // mm["BLOCK_M"]) * -(-d // mm["BLOCK_N"])
        out.append((n, rows, -(-n // rows), -(-r // g["BLOCK_M"]) * -(-n // g["BLOCK_N"]), f"{tiles} x {splits}",
                    -(-n // mm["BLOCK_M"]) * -(-d // mm["BLOCK_N"])))
    return out


def cosine_grid(B=4096, K=345, E=512):
    import torch

    from dgkernels.heads.triton import cosine

    cfg = cosine.cce_config(torch.bfloat16, E)
    lse = -(-B // cfg["lse"][0]["BLOCK_M"])
    dx = lse * -(-E // cfg["dx"][0]["BLOCK_EO"])
    dx_before = lse * -(-E // min(256, cfg["dx"][0]["BLOCK_E"]))  # 256 output features per program before
    blocks = -(-K // cfg["dc"][0]["BLOCK_K"]) * -(-E // cfg["dc"][0]["BLOCK_EO"])
    splits, rows = cosine.row_split(B, K, E, blocks, cfg["dc"][0]["BLOCK_M"])
    return [("lse (forward)", lse, lse), ("dx", dx_before, dx), ("dc", blocks, blocks * splits)], splits, rows


def head_rows(B=4096, D=4, K=345, F=512, esize=2):
    """Dominant work of each head op, forward+backward (benchmarks/bench_factories_heads.py shapes)."""
    gemm = {  # flops: forward GEMM x 3 (forward, and the input and weight gradients)
        "domain_fanout": 6 * B * F * D * K, "domain_cross_entropy": 6 * B * F * K,
        "domain_cross_entropy_all": 6 * B * F * D * K, "head_agreement": 6 * B * F * D * K,
        "mapper_project": 6 * B * F * F, "mapper_project_domain": 6 * B * F * F,
        "cosine_cross_entropy": 6 * B * K * F, "cosine_cross_entropy_per_sample": 6 * B * K * F}
    hbm = {op: (B * F + D * K * F) * esize * 3 for op in gemm}
    hbm["mapper_project"] = hbm["mapper_project_domain"] = (B * F * 2 + D * F * F) * esize * 3
    hbm["cosine_cross_entropy"] = (B * F + K * F) * esize * 3
    # per-sample classes: c [B, K, F] read by the forward and the backward, its gradient written
    hbm["cosine_cross_entropy_per_sample"] = B * K * F * esize * 3
    out = []
    for op, fl in gemm.items():
        ms, bound = _ms(flops=fl, hbm=hbm[op])
        out.append((op, fl / 1e9, hbm[op] / 1e6, ms, bound))
    return out


def prompt_rows(G=32, K=345, n_ctx=16, width=512, layers=12, mean_suffix=5.5):
    """ViT-B-16 text tower, frozen, backward to the prompt vectors only (activation gradients: about
    the forward's flops again). Per token and layer 24 w^2 flops (QKV and output 8 w^2, MLP 16 w^2)
    plus attention 4 L w over context L."""
    def tower(tokens, ctx):
        return 2 * tokens * layers * (24 * width ** 2 + 4 * ctx * width)

    naive = tower(G * K * 77, 77)
    # exact truncation at the EOT (1 + n_ctx + suffix + EOT tokens) and the shared prefix computed
    # once per group (causal: its states do not depend on the suffix)
    ctx = 1 + n_ctx + mean_suffix + 1
    fused = tower(G * (1 + n_ctx), 1 + n_ctx) + tower(G * K * (mean_suffix + 1), ctx)
    weights = layers * 12 * width ** 2 * 2
    return [("naive (77 tokens per prompt)", naive / 1e12, *_ms(flops=naive, hbm=weights)),
            ("dgkernels (truncated, shared prefix)", fused / 1e12, *_ms(flops=fused, hbm=weights))]


def markdown() -> str:
    lines = ["# Roofline estimates of the GPU benchmark rows (H100) and the launch grids", "",
             "Generated by `python benchmarks/roofline.py` without a GPU: arithmetic on the shapes. Ceilings: "
             f"bf16 tensor cores {MM_TFLOPS:g} TFLOP/s and HBM {HBM_GBS:g} GB/s (read + written), both measured "
             "on this workplace's H100 (/work/.library/device/KINDS.md); the exponential unit "
             f"{EXP_TPS:g} T exp/s (16 per clock per SM, 132 SMs, 1.83 GHz); L2 {L2_GBS:g} GB/s for the fp32 "
             "gradient atomics, an ASSUMED figure (not measured here). Predicted = the largest ceiling's time: "
             "what the kernels cannot beat, not what they reach; every figure is unmeasured on a GPU.", "",
             "## Contrastive losses (2 N^2 D forward, 8 N^2 D forward+backward)", "",
             "Two backwards (dgkernels/contrastive/triton.py and triton_slab.py). **fused**: one kernel "
             "recomputes each tile and adds dQ and dK to fp32 buffers with atomics: L2 atomics = dQ and dK "
             "tiles added once per (row block, column block) pair, N^2 D 4 (1/BLOCK_N + 1/BLOCK_M) bytes at "
             "the first half-precision backward config, L2-bound at about "
             f"{6 / (4 * (1 / 64 + 1 / 128)) * L2_GBS / 1e3:.0f} TFLOP/s of its 6 N^2 D (64 flops per byte); "
             "where D fits its register accumulator of dQ (D <= 64 in half precision: HOLD_CONFIGS) dQ is "
             "written once per row block and column split instead. **slab** (auto from D = 256 where dQ is "
             "not held): G written in row slabs in the input dtype (twice: GR and its transpose), dQ and dK "
             "as GEMMs whose output tiles stay on chip, no atomics; its HBM adds 4 N^2 (element size) bytes of "
             "G, dK's fp32 read-modify-write once per slab of R = 2 D rows and dQ's split-K partials "
             "(about D / 2 flops per byte: tensor-core bound from D = 512 at these ceilings). "
             "HBM = compulsory bytes (inputs, fp32 gradients, their cast) plus the slab traffic.", "",
             "| op | N | D | dtype | backward | fwd GFLOP | fwd+bwd GFLOP | HBM MB | L2 atomics MB | "
             "predicted fwd ms | predicted fwd+bwd ms | bound (fwd+bwd) |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    import gpu_bench  # the benchmark's own sizes: one estimate per row it measures

    s = gpu_bench.sizes(False)
    for op, n, d, dn, bwd, f, fb, hbm, l2, fms, fbms, bound in contrastive_rows(
            s["ns"] + s["large_ns"], s["ds"], s["dtypes"]):
        lines.append(f"| {op} | {n} | {d} | {dn} | {bwd} | {f:.4g} | {fb:.4g} | {hbm:.4g} | {l2:.4g} | {fms:.3g} | "
                     f"{fbms:.3g} | {bound} |")
    lines += ["", "## Contrastive launch grids at N = M (half precision, 132 SMs)", "",
              "Programs = row blocks x column splits (dgkernels.contrastive.triton.column_split); one value "
              "per BLOCK_M the autotuner may pick. Before the column split: the row blocks alone.", "",
              "| N | kernel | BLOCK_M | column splits | columns per split | programs | waves on 132 SMs | "
              "programs without the split |",
              "|---:|---|---|---:|---:|---|---|---|"]
    for n, kernel, bms, splits, cols, progs, waves, before in grid_rows():
        lines.append(f"| {n} | {kernel} | {bms} | {splits} | {cols} | {progs} | {waves} | {before} |")
    lines += ["", "Slab backward (D = 512, bf16; dgkernels.contrastive.triton_slab), per slab: the G kernel "
              "one program per 128 x 64 tile, the dQ GEMM 128 x 128 output tiles x split-K programs, the dK "
              "GEMM 128 x 128 output tiles over all M rows of dK.", "",
              "| N | slab rows | slabs | G programs | dQ programs (tiles x splits) | dK programs |",
              "|---:|---:|---:|---:|---|---:|"]
    for n, rows, slabs, gp, dq, dk in slab_grid_rows():
        lines.append(f"| {n} | {rows} | {slabs} | {gp} | {dq} | {dk} |")
    cg, splits, rows = cosine_grid()
    lines += ["", "## cosine_cross_entropy grids, B = 4096, K = 345, E = 512 (bf16)", "",
              f"The class-gradient kernel (dc) splits the rows into {splits} ranges of {rows} "
              "(dgkernels.heads.triton.cosine.row_split), its partial gradients summed in a fixed order.", "",
              "| kernel | programs before | programs now |", "|---|---:|---:|"]
    for name, before, now in cg:
        lines.append(f"| {name} | {before} | {now} |")
    lines += ["", "## Head ops, forward+backward, B = 4096, D = 4, K = 345, F = 512 (bf16)", "",
              "Flops: the op's GEMM three times (forward, input and weight gradients); HBM: operands read "
              "three times (a lower bound). At these sizes most ops are a few microseconds of work: "
              "launch latency (several kernels, about 5 us each) will dominate the measured rows.", "",
              "| op | GFLOP | HBM MB | predicted ms | bound |", "|---|---:|---:|---:|---|"]
    for op, fl, hbm, ms, bound in head_rows():
        lines.append(f"| {op} | {fl:.3g} | {hbm:.4g} | {ms:.3g} | {bound} |")
    lines += ["", "## Prompt encoding, K = 345, G = 32, 16 context tokens, ViT-B-16 text tower (bf16)", "",
              "Forward and the backward to the prompt vectors (activation gradients only: about 2x the "
              "forward's flops); suffixes of 3-8 tokens (mean 5.5) as benchmarks/gpu_bench.py draws them.", "",
              "| encoder | TFLOP | predicted ms | bound |", "|---|---:|---:|---|"]
    for name, tf, ms, bound in prompt_rows():
        lines.append(f"| {name} | {tf:.3g} | {ms:.3g} | {bound} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu_roofline.md"))
    args = ap.parse_args(argv)
    text = markdown()
    with open(args.out, "w") as f:
        f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
