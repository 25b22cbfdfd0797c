"""Argument checks shared by every op: each error names the argument and what it got.

Value checks (index ranges, a positive scale held in a tensor) read tensor data. In eager mode
they run on the host and raise ValueError (except a scale tensor on an accelerator: it gets the
device-side assert described next, so a learnable logit scale costs no sync per call). Inside
torch.compile they cannot (a host read is a graph break and, on GPU, a synchronisation), so there
they become one traced `torch._assert_async` per check, a device-side assert that fails the call
at run time (RuntimeError on CPU; on CUDA a device-side assert, which poisons the CUDA context),
or nothing at all with DGKERNELS_COMPILED_CHECKS=0 (read when a function is traced). Shape,
dtype and device checks are static and run in both modes with the same messages.
"""
from __future__ import annotations

import math
import os
from typing import Iterable

import torch

_COMPILED_CHECKS_ENV = "DGKERNELS_COMPILED_CHECKS"


def compiling() -> bool:
    """True while torch.compile (dynamo) traces the calling code."""
    return torch.compiler.is_compiling()


def _compiled_checks() -> bool:
    return os.environ.get(_COMPILED_CHECKS_ENV, "1").strip() not in ("0", "off", "false", "")


def _device_assert(cond: torch.Tensor, msg: str) -> None:
    if _compiled_checks():
        torch._assert_async(cond.all(), msg)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every kernel and statistic: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, t, *, dims: int | Iterable[int] | None = None, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    if dims is not None:
        allowed = (dims,) if isinstance(dims, int) else tuple(dims)
        if t.dim() not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")


def check_index(name: str, t, size: int, *, length: int | None = None, ignore_index: int | None = None) -> None:
    """An integer index tensor whose values lie in [0, size) (ignore_index excepted)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {t.shape[0]}")
    if t.numel() == 0:
        return
    if compiling():
        ok = (t >= 0) & (t < size)
        if ignore_index is not None:
            ok = ok | (t == ignore_index)
        _device_assert(ok, f"{name} values must lie in [0, {size})")
        return
    valid = t if ignore_index is None else t[t != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= size):
        raise ValueError(f"{name} values must lie in [0, {size}), got min {int(valid.min())}, max {int(valid.max())}")


def _check_same(attr: str, error: type, what: str, tensors: dict):
    values = {n: getattr(t, attr) for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(values.values())) > 1:
        raise error(f"{what}, got " + ", ".join(f"{n} {sep}{v}" for n, v in values.items()
                                                for sep in ["on " if attr == "device" else ""]))
    return next(iter(values.values()))


def check_same_device(**tensors) -> torch.device:
    return _check_same("device", ValueError, "all tensors must be on one device", tensors)


def check_same_dtype(**tensors) -> torch.dtype:
    return _check_same("dtype", TypeError, "all float inputs must share one dtype", tensors)


def host_readable(t: torch.Tensor) -> bool:
    """Whether an eager value check may read t on the host: free for CPU (and meta) tensors, a
    device->host copy that waits for the stream on an accelerator."""
    return t.device.type in ("cpu", "meta")


def check_positive_scalar(name: str, value) -> None:
    """A Python number or a one-element tensor that must be finite and > 0.

    Eager: a ValueError for a CPU tensor or a number; a tensor on an accelerator gets the traced
    form's device-side assert instead (no synchronisation per call; DGKERNELS_COMPILED_CHECKS=0
    turns it off)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar or a one-element tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if compiling() or not host_readable(value):
            # A scale on an accelerator (a learnable logit scale) is checked where it lives: a
            # host read would synchronise every call.
            v = value.detach()
            _device_assert(torch.isfinite(v) & (v > 0), f"{name} must be finite and > 0")
        elif value.device.type != "meta":
            v = float(value.detach())
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be finite and > 0, got {v}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a one-element tensor, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def check_choice(name: str, value, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
