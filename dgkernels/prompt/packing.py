"""Row windows of the packed prompt-attention kernels (the tables the Triton launchers pass).

The suffix tokens of the sequences of one prefix group are packed into windows of `window` rows
(several short sequences per window; a sequence may cross a window boundary), so one program of
the attention kernels owns a dense [window, *] tile: Hopper's wgmma needs 64 rows per warp group,
while a class-name suffix is 3-10 tokens.

Rows are taken in "packed order": the sequences sorted by group (stable), each sequence's rows in
order. The encoder's layout (text_tower.PackedLayout: sequence n = g*K + k at cumulative starts)
is already in that order, so `row` is then the identity; any other grouping is permuted here.
Within packed order a sequence is contiguous, so for packed rows i, j:
    key j is visible from query i  <=>  seq[j] == seq[i] and j <= i,
and a window [w0, w1) needs the suffix keys [kfirst, w1), kfirst = the first row of the sequence
holding w0; a key window [w0, w1) is seen by the queries [w0, qlast), qlast = the end of the
sequence holding w1 - 1. Windows never span two groups (the prefix keys are the group's).

Every layer of one encode passes the same three layout tensors (and its backward the same again),
so `cached_windows` keeps the last few tables, keyed on those tensor objects (weak references:
a tensor freed and its memory reused can never match) and their in-place version counters.
Everything is built with device tensor ops, no host synchronisation: the number of windows is
data-dependent, so the grid takes the bound cdiv(T, window) + G (each group wastes at most one
partial window) and the surplus windows are empty (w0 == w1: the program returns at once).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

# columns of the window table
W0, W1, GROUP, KFIRST, QLAST = range(5)


@dataclass
class Windows:
    row: torch.Tensor  # [T] int32: the original row of packed row i
    seq: torch.Tensor  # [T] int32: the sequence of packed row i (its rank in packed order)
    table: torch.Tensor  # [n, 5] int32: w0, w1, group, kfirst, qlast per window
    count: int  # n, the grid bound (host integer)


def max_windows(total: int, groups: int, window: int) -> int:
    return -(-total // window) + groups


def pack_windows(seq_start: torch.Tensor, seq_len: torch.Tensor, seq_group: torch.Tensor, total: int,
                 groups: int, window: int) -> Windows:
    """Window tables for `total` packed rows (the sequences' lengths sum to `total`, as the
    reference op assumes) and prefix groups 0..groups-1 (seq_group indexes the prefix tensors)."""
    dev = seq_len.device
    seq_start, seq_len, seq_group = seq_start.long(), seq_len.long(), seq_group.long()
    order = torch.argsort(seq_group, stable=True)
    lens = seq_len[order]
    pstart = torch.cumsum(lens, 0) - lens  # first packed row of each sequence (packed order)
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), lens, output_size=total)
    pos = torch.arange(total, device=dev) - pstart[seq]
    row = seq_start[order][seq] + pos
    # rows of each group in packed order: [gstart, gend)
    grows = torch.zeros(groups, dtype=torch.long, device=dev).scatter_add_(0, seq_group, seq_len)
    gend = torch.cumsum(grows, 0)
    gstart = gend - grows
    nwin = (grows + window - 1) // window
    wend = torch.cumsum(nwin, 0)
    n = max_windows(total, groups, window)
    w = torch.arange(n, device=dev)
    g = torch.searchsorted(wend, w, right=True)
    valid = g < groups
    gc = g.clamp(max=max(groups - 1, 0))
    w0 = gstart[gc] + (w - (wend[gc] - nwin[gc])) * window
    w1 = torch.minimum(w0 + window, gend[gc])
    w0 = torch.where(valid, w0, 0)
    w1 = torch.where(valid, w1, 0)
    if total:
        first = pstart[seq[w0.clamp(max=total - 1)]]
        last_seq = seq[(w1 - 1).clamp(min=0, max=total - 1)]
        qlast = pstart[last_seq] + lens[last_seq]
    else:
        first = qlast = torch.zeros_like(w0)
    table = torch.stack([w0, w1, gc, torch.where(valid, first, 0), torch.where(valid, qlast, 0)], 1)
    return Windows(row.int().contiguous(), seq.int().contiguous(), table.int().contiguous(), n)


_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 8


def cached_windows(seq_start: torch.Tensor, seq_len: torch.Tensor, seq_group: torch.Tensor, total: int,
                   groups: int, window: int) -> Windows:
    """pack_windows, reused while the same layout tensors (same objects, unmodified) come back."""
    layout = (seq_start, seq_len, seq_group)
    key = (tuple(id(t) for t in layout), total, groups, window)
    versions = tuple(t._version for t in layout)
    hit = _CACHE.get(key)
    if hit is not None:
        refs, vers, win = hit
        if vers == versions and all(r() is t for r, t in zip(refs, layout)):
            _CACHE.move_to_end(key)
            return win
    win = pack_windows(seq_start, seq_len, seq_group, total, groups, window)
    _CACHE[key] = (tuple(weakref.ref(t) for t in layout), versions, win)
    _CACHE.move_to_end(key)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return win
