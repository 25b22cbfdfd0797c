"""The one place that knows which backends exist and picks one for a call.

Order for CUDA tensors: triton -> cuda (compiled kernels) -> reference.
Order for CPU tensors:  cpp -> reference.  (triton on CPU tensors only under TRITON_INTERPRET=1,
and only when asked for by name.)
Overrides: the `backend=` keyword of each op, then the DGKERNELS_BACKEND environment variable (read
at every call), then `use_backend(...)` as a context manager. Asking for a backend that cannot
run the call raises BackendUnavailableError naming the reason.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import _extension

BACKENDS = ("triton", "cuda", "cpp", "reference")
_ENV = "DGKERNELS_BACKEND"
_override: list[str] = []
# op name -> backend -> implementation object (module or namespace with the backend's functions)
_REGISTRY: dict[str, dict[str, object]] = {}


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run this call; the message says why."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str = ""

    def __bool__(self) -> bool:  # `if dgkernels.backends()["cpp"]:`
        return self.available


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_reason() -> str:
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError:
        return "triton is not installed (no wheel for this platform, or not installed)"
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason
        return f"triton failed to import: {exc}"
    return ""


def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(name, True)
    if name == "cpp":
        ok, _, reason = _extension.load()
        return BackendStatus(name, ok, "" if ok else reason)
    if name == "cuda":
        ok, has_cuda, reason = _extension.load()
        if not ok or not has_cuda:
            return BackendStatus(name, False, reason)
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "no CUDA device is visible to torch")
        return BackendStatus(name, True)
    if name == "triton":
        reason = _triton_import_reason()
        if reason:
            return BackendStatus(name, False, reason)
        if not torch.cuda.is_available() and not triton_interpret():
            return BackendStatus(name, False, "no CUDA device is visible to torch (set TRITON_INTERPRET=1 to run the kernels on the CPU)")
        return BackendStatus(name, True)
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def backends() -> dict[str, BackendStatus]:
    """Which backends can run on this machine, with the reason for each one that cannot."""
    return {name: _status(name) for name in BACKENDS}


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend for every op called inside the block (an explicit `backend=` wins)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def register(op: str, backend: str, impl: object) -> None:
    """Declare that `impl` runs `op` on `backend` (called by each op family at import)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = impl


def implemented(op: str) -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if b in _REGISTRY.get(op, {}))


def _refusal(op: str, backend: str, device: torch.device) -> str:
    """Why `backend` cannot run `op` on `device` ('' if it can)."""
    if backend not in _REGISTRY.get(op, {}):
        return f"{op} has no {backend} implementation"
    status = _status(backend)
    if not status.available:
        return status.reason
    if backend == "cpp" and device.type != "cpu":
        return f"the cpp backend runs CPU tensors, got {device.type} tensors"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend runs CUDA tensors, got {device.type} tensors"
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
        return f"the triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type} tensors"
    if backend == "reference" and device.type == "meta":
        return ""
    return ""


def requested_backend(backend: str | None) -> str | None:
    """The backend named by the call, the environment or `use_backend`, in that order (or None)."""
    if backend is None:
        backend = os.environ.get(_ENV) or None
        if backend is not None:
            backend = backend.strip().lower()
            if backend in ("", "auto"):
                backend = None
    if backend is None and _override:
        backend = _override[-1]
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} (or DGKERNELS_BACKEND=auto)")
    return backend


def select(op: str, device: torch.device, backend: str | None = None) -> tuple[str, object]:
    """Pick the backend for one call of `op` on tensors living on `device`.

    Returns (backend name, implementation). Raises BackendUnavailableError when a named backend
    cannot run the call; in automatic mode falls through the order above, ending at reference.
    """
    name = requested_backend(backend)
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"no implementation of {op} is registered")
    if name is not None:
        why = _refusal(op, name, device)
        if why:
            raise BackendUnavailableError(f"dgkernels.{op}: backend {name!r} is unavailable: {why}")
        return name, impls[name]
    order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpp", "reference")
    reasons = []
    for cand in order:
        why = _refusal(op, cand, device)
        if not why:
            return cand, impls[cand]
        reasons.append(f"{cand}: {why}")
    raise BackendUnavailableError(f"dgkernels.{op}: no backend can run {device.type} tensors: " + "; ".join(reasons))


@torch.compiler.assume_constant_result
def _select_name(op: str, device_type: str, backend: str | None) -> str:
    return select(op, torch.device(device_type), backend)[0]


def select_name(op: str, device: torch.device, backend: str | None = None) -> str:
    """The name `select` would return, usable while torch.compile traces: it runs eagerly at trace
    time (environment, `use_backend` and availability are read then, never in the graph) and
    enters the graph as a constant. A compiled function keeps the backend it was traced with."""
    return _select_name(op, device.type, backend)


def impl_of(op: str, name: str) -> object:
    """The implementation registered for (op, backend name); called by the custom ops at run time."""
    return _REGISTRY[op][name]


def explain(op: str, device: torch.device | str = "cpu") -> dict[str, str]:
    """For each backend, '' if it would run `op` on `device`, else the reason it would not."""
    device = torch.device(device)
    return {b: _refusal(op, b, device) for b in BACKENDS}


Impl = Callable[..., object]


class LazyModule:
    """A backend implementation module imported on first use (keeps Triton out of `import dgkernels`)."""

    def __init__(self, module_name: str):
        self._name = module_name
        self._module = None

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        if self._module is None:
            import importlib

            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"LazyModule({self._name!r})"
