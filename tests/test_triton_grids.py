"""The launch grids of the Triton kernels: the contrastive row-block x column-split grid and the
autotuner's size buckets, and the cosine cross-entropy class-gradient row split. The split paths
are checked against the float64 reference at sizes where the grid has several splits (the split
thresholds are lowered so that the interpreter reaches them at small N)."""
import pytest
import torch

import dgkernels
from test_contrastive import _compare

tri = pytest.importorskip("dgkernels.contrastive.triton")
needs_triton = pytest.mark.skipif(not dgkernels.backends()["triton"].available, reason="triton unavailable")


def test_autotune_buckets_are_powers_of_two_capped():
    assert [tri._bucket(n) for n in (1, 2, 3, 1000, 1024, 1025, 65536, 65537, 10 ** 6)] == \
        [1, 2, 4, 1024, 1024, 2048, 65536, 65536, 65536]


@pytest.mark.parametrize("n,splits", [(1024, 8), (4096, 8), (65536, 1)])
def test_column_split_fills_an_h100(n, splits):
    """N = M on 132 SMs: N = 1024 is limited by the 128 columns a split keeps (64-128 programs);
    N = 4096 reaches two waves (8 splits x 32-64 row blocks); N = 65536 has 512-1024 row blocks
    and needs none."""
    got, cols = tri.column_split(n, n)
    assert got == splits and cols * got >= n and cols * (got - 1) < n and cols % 128 == 0


@needs_triton
@pytest.mark.parametrize("op,n", [("clip_loss", 300), ("info_nce_unpaired", 300), ("multiview", 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contrastive_column_splits_match_reference(op, n, dtype, triton_device):
    assert tri.column_split(300, 300)[0] >= 2
    _compare("triton", op, n, 24, dtype, device=triton_device)


@needs_triton
def test_contrastive_column_splits_with_per_tile_dq_match_reference(triton_device):
    # D = 80 is wider than the held dQ accumulator of half precision: per-tile dQ atomics across splits
    assert tri._dq_hold("bwd", torch.bfloat16, "tf32", 80) == {"DQ_HOLD": 0}
    _compare("triton", "clip_loss", 300, 80, torch.bfloat16, device=triton_device)


@needs_triton
@pytest.mark.parametrize("dtype,B", [(torch.float32, 50), (torch.bfloat16, 150)])
def test_cosine_class_gradient_row_splits_match_reference(dtype, B, triton_device, monkeypatch):
    """The class-gradient kernel's row split (several partial gradients summed) against float64."""
    from test_heads import compare

    from dgkernels.heads.triton import cosine

    monkeypatch.setattr(cosine, "_MIN_SPLIT_BLOCKS", 1)
    block_m = cosine.cce_config(dtype, 24)["dc"][0]["BLOCK_M"]
    assert cosine.row_split(B, 7, 24, 1, block_m)[0] >= 2
    compare("cosine_cross_entropy", {"B": B, "K": 7, "F": 24, "label_smoothing": 0.1}, "triton", dtype,
            device=triton_device)


def test_cosine_class_gradient_grid_fills_an_h100():
    """K = 345 classes, E = 512, B = 4096 (the head benchmark): 6 x 2 class x feature blocks, split
    into 22 row ranges of 192 rows: 264 programs, two waves on 132 SMs."""
    from dgkernels.heads.triton import cosine

    meta = cosine.cce_config(torch.bfloat16, 512)["dc"][0]
    blocks = triton_cdiv(345, meta["BLOCK_K"]) * triton_cdiv(512, meta["BLOCK_EO"])
    splits, rows = cosine.row_split(4096, 345, 512, blocks, meta["BLOCK_M"])
    assert (blocks, splits, rows) == (12, 22, 192)


def triton_cdiv(a, b):
    return -(-a // b)
