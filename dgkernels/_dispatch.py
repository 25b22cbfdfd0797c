"""The one place that knows which backends exist and picks one for a call.

Order for CUDA tensors: triton -> cuda (compiled kernels) -> reference.
Order for CPU tensors:  cpp -> reference.  (triton on CPU tensors only under TRITON_INTERPRET=1,
and only when asked for by name.)
Overrides: the `backend=` keyword of each op, then the DGKERNELS_BACKEND environment variable (read
at every call), then `use_backend(...)` as a context manager. Asking for a backend that cannot
run the call raises BackendUnavailableError naming the reason.

What a backend supports is declared by the backend itself: every registered implementation has
`refusal(op, call) -> str` ('' = it runs the call), where `call` is a CallFacts (device type,
dtypes, a few op-specific sizes). This module adds what no backend module can know on its own:
whether the backend is installed and usable on this machine, and which device types it runs.
`select` alone combines the two, for an explicit request (refused: BackendUnavailableError with
the backend's reason) and for the automatic order (refusals are skipped).
"""
from __future__ import annotations

import contextlib
import functools
import operator
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
class CallFacts:
    """What a backend's `refusal` may look at: hashable, so the torch.compile path can hand its
    fields to a function whose result is a trace-time constant (build it with `call_facts`, which
    turns sizes into Python ints).

    device: device type ("cuda", "cpu", "meta"); dtypes: the floating dtypes of the call's
    tensors (empty: not stated, nothing refused for a dtype); sizes: sorted (name, value) pairs,
    e.g. (("D", 4), ("K", 1000)) for head_agreement, (("head_dim", 64),) for the prompt attention.
    """

    device: str
    dtypes: tuple = ()
    sizes: tuple = ()

    def size(self, name: str, default: int | None = None) -> int | None:
        return dict(self.sizes).get(name, default)

    def unsupported_dtype(self, supported) -> torch.dtype | None:
        """The first of this call's dtypes outside `supported`, or None."""
        return next((d for d in self.dtypes if d not in supported), None)


def call_facts(device, dtype=None, **sizes) -> CallFacts:
    """CallFacts from a device (torch.device or its type), a dtype or sequence of dtypes, and sizes."""
    device_type = device if isinstance(device, str) else torch.device(device).type
    device_type = torch.device(device_type).type  # "cuda:1" -> "cuda"
    if dtype is None:
        dtypes = ()
    elif isinstance(dtype, torch.dtype):
        dtypes = (dtype,)
    elif isinstance(dtype, (tuple, list)):
        dtypes = tuple(dict.fromkeys(dtype))
    else:
        dtypes = (dtype,)  # refused just below
    for d in dtypes:
        if not isinstance(d, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or a sequence of them, got {d!r}")
    ints = {}
    for name, value in sizes.items():
        if isinstance(value, bool):
            raise TypeError(f"size {name} must be an int, got bool")
        try:
            # operator.index: while torch.compile traces, a symbolic size becomes its value (a
            # guard: a new size recompiles), which the trace-time selection needs as a constant
            ints[name] = operator.index(value)
        except TypeError:
            raise TypeError(f"size {name} must be an int, got {type(value).__name__}") from None
    return CallFacts(device_type, dtypes, tuple(sorted(ints.items())))


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
    """Declare that `impl` runs `op` on `backend` (called by each op family at import). `impl`
    declares what it supports with `refusal(op, call: CallFacts) -> str` (a LazyModule's is
    checked when it is first imported)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    if not isinstance(impl, LazyModule):
        _declaration(impl)
    _REGISTRY.setdefault(op, {})[backend] = impl


def _declaration(impl: object) -> Callable[[str, CallFacts], str]:
    refusal = getattr(impl, "refusal", None)
    if not callable(refusal):
        raise TypeError(f"backend implementation {impl!r} must define refusal(op, call) -> str")
    return refusal


def implemented(op: str) -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if b in _REGISTRY.get(op, {}))


def registered_ops() -> tuple[str, ...]:
    """Every op with at least one registered backend."""
    return tuple(_REGISTRY)


def _device_refusal(backend: str, device_type: str) -> str:
    """Which device types each backend runs (a property of the backend name: one compiled module
    serves both cpp and cuda)."""
    if backend == "cpp" and device_type != "cpu":
        return f"the cpp backend runs CPU tensors, got {device_type} tensors"
    if backend == "cuda" and device_type != "cuda":
        return f"the cuda backend runs CUDA tensors, got {device_type} tensors"
    if backend == "triton" and device_type != "cuda" and not (device_type == "cpu" and triton_interpret()):
        return f"the triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device_type} tensors"
    return ""


def _refusal(op: str, backend: str, call: CallFacts) -> str:
    """Why `backend` cannot run `op` for `call` ('' if it can): registration, availability on this
    machine, device type, then the backend's own declaration."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return f"{op} has no {backend} implementation"
    status = _status(backend)
    if not status.available:
        return status.reason
    why = _device_refusal(backend, call.device)
    if why:
        return why
    return _declaration(impl)(op, call)


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


def _order(device_type: str) -> tuple[str, ...]:
    return ("triton", "cuda", "reference") if device_type == "cuda" else ("cpp", "reference")


def _facts(device: torch.device, call: CallFacts | None) -> CallFacts:
    device = torch.device(device)
    if call is None:
        return CallFacts(device.type)
    if call.device != device.type:
        raise ValueError(f"the call facts are for {call.device} tensors, the call's device is {device}")
    return call


def select(op: str, device: torch.device, backend: str | None = None,
           call: CallFacts | None = None) -> tuple[str, object]:
    """Pick the backend for one call of `op` on tensors living on `device`, described by `call`
    (dtypes, sizes; None: the device alone).

    Returns (backend name, implementation). Raises BackendUnavailableError when a named backend
    cannot run the call; in automatic mode falls through the order above, ending at reference.
    """
    name, impls = select_all((op,), device, backend, call)
    return name, impls[0]


def select_all(ops: tuple[str, ...], device: torch.device, backend: str | None = None,
               call: CallFacts | None = None) -> tuple[str, tuple[object, ...]]:
    """One backend that runs every op of `ops` for `call` (ops that work together, as the three
    prompt ops of one encoding): (name, the implementation of each op)."""
    call = _facts(device, call)
    name = requested_backend(backend)
    for op in ops:
        if op not in _REGISTRY:
            raise KeyError(f"no implementation of {op} is registered")
    if name is not None:
        for op in ops:
            why = _refusal(op, name, call)
            if why:
                raise BackendUnavailableError(f"dgkernels.{op}: backend {name!r} is unavailable: {why}")
        return name, tuple(_REGISTRY[op][name] for op in ops)
    reasons = []
    for cand in _order(call.device):
        why = next((w for w in (_refusal(op, cand, call) for op in ops) if w), "")
        if not why:
            return cand, tuple(_REGISTRY[op][cand] for op in ops)
        reasons.append(f"{cand}: {why}")
    raise BackendUnavailableError(f"dgkernels.{'/'.join(ops)}: no backend can run {call.device} tensors: "
                                  + "; ".join(reasons))


@torch.compiler.assume_constant_result
def _select_name(ops: tuple, device_type: str, dtypes: tuple, sizes: tuple, backend: str | None) -> str:
    return select_all(ops, torch.device(device_type), backend, CallFacts(device_type, dtypes, sizes))[0]


def select_name(op: str | tuple[str, ...], device: torch.device, backend: str | None = None,
                call: CallFacts | None = None) -> str:
    """The name `select` (or `select_all` for a tuple of ops) would return, usable while
    torch.compile traces: it runs eagerly at trace time (environment, `use_backend` and
    availability are read then, never in the graph) and enters the graph as a constant. A
    compiled function keeps the backend it was traced with."""
    call = _facts(device, call)
    ops = (op,) if isinstance(op, str) else tuple(op)
    return _select_name(ops, call.device, call.dtypes, call.sizes, backend)


def impl_of(op: str, name: str) -> object:
    """The implementation registered for (op, backend name); called by the custom ops at run time."""
    return _REGISTRY[op][name]


def explain(op: str, device: torch.device | str = "cpu", dtype=None, **sizes) -> dict[str, str]:
    """For each backend, '' if it would run `op` on `device` for inputs of `dtype` (a dtype or a
    sequence of them; None: not stated) and the op-specific `sizes` (e.g. D=, K= for
    head_agreement, head_dim= for prompt_prefix_attention), else the reason it would not."""
    call = call_facts(device, dtype, **sizes)
    return {b: _refusal(op, b, call) for b in BACKENDS}


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

            module = importlib.import_module(self._name)
            _declaration(module)
            self._module = module
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"LazyModule({self._name!r})"
