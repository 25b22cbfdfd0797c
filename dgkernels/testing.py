"""Tolerances and comparisons used by the tests (and available to users checking a backend).

Rule: a backend's error against a float64 reference may be at most `factor` (2) times PyTorch's
own error at the same low precision, plus a floor of a few ulps of the dtype. The tolerance thus
follows from the dtype and from the problem's own conditioning, never from the kernel under test.
"""
from __future__ import annotations

import torch

# Unit roundoff of each dtype: the floor of every tolerance.
EPS = {
    torch.float64: 2.0 ** -53,
    torch.float32: 2.0 ** -24,
    torch.bfloat16: 2.0 ** -8,
    torch.float16: 2.0 ** -11,
}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN anywhere -> inf)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_to_fp64(actual: torch.Tensor, expected_fp64: torch.Tensor, baseline: torch.Tensor | None = None,
                         *, dtype: torch.dtype | None = None, factor: float = 2.0, ulps: float = 8.0, name: str = "") -> None:
    """Check `actual` against a float64 reference.

    `baseline`: the same quantity computed by plain PyTorch at the low precision under test (its
    error measures how hard the problem is at that dtype). Allowed error: factor * baseline error
    + ulps * eps(dtype) [+ ulps * eps for float32 accumulation].
    """
    if actual.shape != expected_fp64.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected_fp64.shape)}")
    dtype = dtype or actual.dtype
    floor = ulps * EPS.get(dtype, EPS[torch.float32])
    allowed = floor
    base_err = None
    if baseline is not None:
        base_err = rel_error(baseline, expected_fp64)
        allowed = factor * base_err + floor
    err = rel_error(actual, expected_fp64)
    if not err <= allowed:
        raise AssertionError(f"{name}: relative error {err:.3e} > allowed {allowed:.3e} "
                             f"(dtype {dtype}, baseline error {base_err}, floor {floor:.1e})")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so unwritten elements show up."""
    return t.fill_(float("nan"))
