"""The packed-window prompt attention of the Triton backend (dgkernels/prompt/packing.py and the
attention kernels of dgkernels/prompt/triton.py) against the reference op, values and gradients.

Half-precision windows are 64 packed rows (fp32: 16), so the layouts below put several sequences
in one window, let sequences cross window boundaries, give a group one sequence, interleave the
groups (the launcher then permutes rows), and use no prefix or a prefix longer than one 64-key
block of the dk/dv kernel."""
import pytest
import torch

from dgkernels import _dispatch
from dgkernels.prompt import ops as prompt_ops
from dgkernels.prompt import packing, reference
from dgkernels.prompt.api import OP_ATTENTION
from dgkernels.testing import assert_close_to_fp64

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _triton_impl(device):
    why = _dispatch.explain(OP_ATTENTION, device)["triton"]
    if why:
        pytest.skip(why)
    return prompt_ops.bound("triton")


def _problem(lengths, groups, heads, dim, lp, n_groups=None, fused=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    t = int(lengths.sum())
    n_groups = max(groups) + 1 if n_groups is None else n_groups
    if fused:  # strided views of one qkv projection, as the text tower passes them
        q, k, v = torch.randn(t, 3, heads, dim, generator=g, dtype=torch.float64).unbind(1)
        kp, vp = torch.randn(n_groups, lp, 2, heads, dim, generator=g, dtype=torch.float64).unbind(2)
    else:
        q, k, v = (torch.randn(t, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
        kp, vp = (torch.randn(n_groups, lp, heads, dim, generator=g, dtype=torch.float64) for _ in range(2))
    rest = (torch.cumsum(lengths, 0) - lengths, lengths, torch.tensor(groups), int(lengths.max()), dim ** -0.5)
    return (q, k, v, kp, vp), rest


def _run(fn, tensors, rest, dtype, device, scale=1.0):
    # same strides as the inputs (the strided views stay strided leaves)
    leaves = [torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device).copy_(t).requires_grad_()
              for t in tensors]
    out = fn(*leaves, *[r.to(device) if isinstance(r, torch.Tensor) else r for r in rest])
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * w.to(device, dtype)).sum() * scale, leaves)
    return [t.detach().cpu() for t in (out, *grads)]


CASES = {
    # 13 sequences of 2..9 tokens in one group: several per 64-row window, one crossing into the next
    "many_short": dict(lengths=[5, 9, 3, 7, 2, 8, 6, 4, 9, 5, 3, 7, 6], groups=[0] * 13, heads=2, dim=16, lp=5),
    # windows of two groups; group 1 holds a single 70-token sequence (longer than a window)
    "long_and_single": dict(lengths=[30, 41, 3, 70, 1], groups=[0, 0, 0, 1, 2], heads=1, dim=32, lp=17),
    # groups interleaved (packed order is a permutation), odd head dim, one-token sequences
    "interleaved": dict(lengths=[3, 1, 7, 2, 5, 1, 4], groups=[1, 0, 2, 0, 1, 2, 0], heads=3, dim=12, lp=3),
    # no prefix: plain block-diagonal causal attention
    "no_prefix": dict(lengths=[1, 4, 1, 66], groups=[0, 1, 1, 2], heads=2, dim=8, lp=0),
    # a prefix longer than one 64-key block of the dk/dv kernel
    "long_prefix": dict(lengths=[6, 3, 9], groups=[0, 0, 0], heads=1, dim=64, lp=70),
    # sequences ending exactly at window boundaries (64, 128), strided q/k/v/kp/vp views
    "aligned_views": dict(lengths=[32, 32, 64, 1], groups=[0, 0, 0, 0], heads=2, dim=16, lp=2, fused=True),
}


@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_packed_attention_matches_reference(precision, case, triton_device):
    impl = _triton_impl(triton_device)
    dtype = DTYPES[precision]
    tensors, rest = _problem(**CASES[case])
    assert CASES[case].get("fused", False) is not tensors[0].is_contiguous()
    exact = _run(reference.prefix_attention, tensors, rest, torch.float64, "cpu")
    base = _run(reference.prefix_attention, tensors, rest, dtype, "cpu")
    out = _run(impl.prefix_attention, tensors, rest, dtype, triton_device)
    for o, b, e, what in zip(out, base, exact, ("out", "dq", "dk", "dv", "dkp", "dvp")):
        assert o.dtype == dtype and o.shape == e.shape
        assert torch.isfinite(o).all(), f"{case} {what}: non-finite values"
        assert_close_to_fp64(o, e, b, dtype=dtype, name=f"triton attention {case} {what}")


def test_unused_prefix_group_gets_zero_gradient(triton_device):
    # group 1 has no sequences: no window reads it, its dkp/dvp stay zero
    impl = _triton_impl(triton_device)
    tensors, rest = _problem(lengths=[4, 2], groups=[0, 2], heads=1, dim=16, lp=3, n_groups=3)
    out = _run(impl.prefix_attention, tensors, rest, torch.float32, triton_device)
    exact = _run(reference.prefix_attention, tensors, rest, torch.float64, "cpu")
    assert (out[4][1] == 0).all() and (out[5][1] == 0).all()
    for o, e in zip(out, exact):
        assert_close_to_fp64(o, e, dtype=torch.float32)


def _brute_windows(lengths, groups, window):
    """Windows built sequence by sequence in Python: the oracle of pack_windows."""
    order = sorted(range(len(lengths)), key=lambda n: groups[n])  # stable
    starts = [sum(lengths[:n]) for n in range(len(lengths))]
    row, seq, grp, first, end = [], [], [], [], []
    p = 0
    for rank, n in enumerate(order):
        for i in range(lengths[n]):
            row.append(starts[n] + i)
            seq.append(rank)
            grp.append(groups[n])
            first.append(p)
            end.append(p + lengths[n])
        p += lengths[n]
    wins = []
    for g in range(max(groups) + 1):
        rows = [i for i in range(len(row)) if grp[i] == g]
        for w0 in range(rows[0] if rows else 0, rows[-1] + 1 if rows else 0, window):
            w1 = min(w0 + window, rows[-1] + 1)
            wins.append((w0, w1, g, first[w0], end[w1 - 1]))
    return row, seq, wins


@pytest.mark.parametrize("window", [4, 16, 64])
def test_pack_windows_matches_a_sequence_by_sequence_build(window):
    gen = torch.Generator().manual_seed(window)
    lengths = torch.randint(1, 12, (23,), generator=gen).tolist()
    groups = torch.randint(0, 4, (23,), generator=gen).tolist()
    groups[0] = 3  # at least 4 groups, not sorted
    t = sum(lengths)
    lt = torch.tensor(lengths)
    win = packing.pack_windows(torch.cumsum(lt, 0) - lt, lt, torch.tensor(groups), t, 4, window)
    row, seq, wins = _brute_windows(lengths, groups, window)
    assert win.row.tolist() == row and win.seq.tolist() == seq
    assert win.count == packing.max_windows(t, 4, window) >= len(wins)
    table = [tuple(r) for r in win.table.tolist()]
    assert table[:len(wins)] == wins
    assert all(w0 == w1 for w0, w1, *_ in table[len(wins):])  # the surplus windows are empty
    covered = sorted(i for w0, w1, *_ in wins for i in range(w0, w1))
    assert covered == list(range(t))



def test_cached_windows_reuse_only_the_same_unmodified_layout():
    lengths = torch.tensor([3, 5, 2])
    start, groups = torch.cumsum(lengths, 0) - lengths, torch.tensor([0, 0, 1])
    first = packing.cached_windows(start, lengths, groups, 10, 2, 4)
    assert packing.cached_windows(start, lengths, groups, 10, 2, 4) is first  # the layers of one call
    assert packing.cached_windows(start, lengths, groups, 10, 2, 16) is not first  # another window
    groups[2] = 0  # modified in place: rebuilt, and the new tables say so
    again = packing.cached_windows(start, lengths, groups, 10, 2, 4)
    fresh = packing.pack_windows(start, lengths, groups, 10, 2, 4)
    assert again is not first and torch.equal(again.table, fresh.table) and not torch.equal(again.table, first.table)
